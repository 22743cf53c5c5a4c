"""Availability flags for optional packages, in one place.

Nothing here imports an optional package: the flags only ask ``importlib`` whether it *could*
be imported. Features that need a package call :func:`require` when they are constructed, so
users get one clear message with the pip command instead of an ``ImportError`` deep inside.
"""

from __future__ import annotations

import importlib.util

__all__ = [
    "LIGHTNING_AVAILABLE",
    "MLFLOW_AVAILABLE",
    "PL_AVAILABLE",
    "TENSORBOARD_AVAILABLE",
    "WANDB_AVAILABLE",
    "package_available",
    "require",
]


def package_available(name: str) -> bool:
    """Whether ``name`` (a top-level or dotted module name) can be imported, without importing it.

    Args:
        name: module name, e.g. ``"wandb"`` or ``"lightning.pytorch"``.

    Returns:
        ``True`` if ``importlib`` finds a spec for the module.

    Examples:
        >>> package_available("numpy")
        True
        >>> package_available("surely_not_a_package_xyz")
        False
    """
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a missing parent package raises for dotted names
        return False


LIGHTNING_AVAILABLE: bool = package_available("lightning")
PL_AVAILABLE: bool = package_available("pytorch_lightning")
TENSORBOARD_AVAILABLE: bool = package_available("tensorboard")
WANDB_AVAILABLE: bool = package_available("wandb")
MLFLOW_AVAILABLE: bool = package_available("mlflow")


def require(package: str, extra: str | None = None, feature: str | None = None) -> None:
    """Raise a helpful ``ModuleNotFoundError`` if ``package`` is not installed.

    Args:
        package: the importable module name, e.g. ``"wandb"``.
        extra: the erf-monitor extra that installs it (``pip install erf-monitor[extra]``);
            ``None`` suggests ``pip install <package>``.
        feature: what needs the package, for the message (defaults to ``package``).

    Raises:
        ModuleNotFoundError: if the package cannot be imported.

    Examples:
        >>> require("numpy")
        >>> require("surely_not_a_package_xyz", "xyz")
        Traceback (most recent call last):
        ...
        ModuleNotFoundError: surely_not_a_package_xyz is not installed: pip install erf-monitor[xyz]
    """
    if package_available(package):
        return
    what = feature or package
    command = f"pip install erf-monitor[{extra}]" if extra else f"pip install {package}"
    raise ModuleNotFoundError(
        f"{what} is not installed: {command}"
        if what == package
        else f"{what} needs {package}, which is not installed: {command}",
        name=package,
    )
