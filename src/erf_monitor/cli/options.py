"""The option groups several commands share, each defined once, and how help pages read.

Every ``add_*`` function adds its options to a command's parser in a fixed order (the order
``--help`` lists them); the help texts that differ between commands are its arguments. They add
plain options rather than titled argument groups, so each command's help stays one list.
"""

from __future__ import annotations

import argparse
import textwrap
from typing import Any

from erf_monitor.core.modes import DEFINITIONS, MODES

__all__ = [
    "MODEL_HELP",
    "MODE_HELP",
    "Formatter",
    "add_command",
    "add_figure_options",
    "add_model_inputs",
    "add_output_options",
    "add_position_option",
    "add_probe_options",
    "add_run_options",
    "wrap",
]

MODEL_HELP = """\
MODEL is one of:
  torchvision:NAME         a torchvision model, randomly initialised (e.g. torchvision:resnet50)
  timm:NAME                a timm model, randomly initialised (needs timm installed)
  path/to/file.py:FACTORY  imports file.py and calls FACTORY() -> nn.Module.
                           WARNING: this form RUNS THE CODE IN THAT FILE; use only files you
                           trust. It is the only form that executes user code.
No weights are downloaded: models are randomly initialised (seeded with --seed) unless
--pretrained loads weights from a local file: the torch.hub / Hugging Face cache that
torchvision and timm fill when they download weights elsewhere (--pretrained alone), or a
checkpoint file (--pretrained=PATH; read with torch.load(weights_only=True) or safetensors).

Images (--images DIR) are preprocessed the way the model expects: the torchvision weights'
transforms, timm's data config, or --size/--mean/--std (which override those).
"""

#: The exact definition of each ``--mode`` (the text saved with every result).
MODE_HELP = "MODE (--mode) is one of:\n" + "".join(
    textwrap.fill(
        DEFINITIONS[name], 88, initial_indent=f"  {name:<10} ", subsequent_indent=" " * 13
    )
    + "\n"
    for name in MODES
)


class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after every option's help (unless it says its own, or there is none:
    ``None``, an off flag); the descriptions' and epilogs' line breaks kept."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def wrap(text: str) -> str:
    """A description as help pages print it: filled to 88 columns."""
    return textwrap.fill(text, 88)


def add_command(
    subparsers: Any, name: str, *, help: str, description: str, epilog: str | None = None
) -> argparse.ArgumentParser:
    """A command's parser: its one-line ``help`` in the command list, its ``description``
    filled, the ``epilog`` as written."""
    return subparsers.add_parser(
        name, help=help, description=wrap(description), epilog=epilog, formatter_class=Formatter
    )


def add_probe_options(
    parser: argparse.ArgumentParser,
    *,
    samples: int,
    samples_help: str = "probe batch size",
    layers_help: str = "layer names or globs",
    size_help: str = "N or HxW",
    input_help: str = "noise (seeded) or a .npy file, loaded without pickle",
) -> None:
    """The options that say what is probed, shared by analyze, compare and replay."""
    parser.add_argument("--layers", nargs="+", default=["auto"], help=layers_help)
    parser.add_argument("--input-size", default="224", help=size_help, metavar="SIZE")
    parser.add_argument("--channels", type=int, default=3, help="input channels for noise")
    parser.add_argument("--samples", type=int, default=samples, help=samples_help)
    parser.add_argument("--mode", choices=MODES, default="luo", help="ERF convention (MODE below)")
    parser.add_argument("--input", default="noise", help=input_help)


def add_model_inputs(
    parser: argparse.ArgumentParser, *, images: str, weights: str | None, checkpoints: str
) -> None:
    """The options analyze, compare and replay share: real images and how they are
    preprocessed, local weights and the head's size (the help texts name who they apply to;
    ``weights=None``: ``--pretrained`` is refused, so not shown)."""
    parser.add_argument(
        "--images",
        default=None,
        metavar="DIR",
        help=f"a folder of images (searched recursively; the first --samples are used), {images}",
    )
    parser.add_argument("--size", default=None, help="image size N or HxW (with --images)")
    parser.add_argument("--mean", default=None, help="per-channel mean, e.g. 0.5,0.5,0.5")
    parser.add_argument("--std", default=None, help="per-channel std, e.g. 0.5,0.5,0.5")
    parser.add_argument(
        "--pretrained",
        nargs="?",
        const="cache",
        default=None,
        metavar="PATH",
        help=argparse.SUPPRESS
        if weights is None
        else f"{weights} pretrained weights from the local torch.hub / Hugging Face cache "
        "(never downloaded); =PATH, a checkpoint file",
    )
    parser.add_argument(
        "--num-classes",
        type=int,
        default=None,
        metavar="N",
        help=f"build torchvision/timm models with an N-class head ({checkpoints})",
    )


def add_position_option(parser: argparse.ArgumentParser, *, help: str) -> None:
    """``--position``: which output unit(s) seed the ERF."""
    parser.add_argument("--position", default="centre", metavar="POS", help=help)


def add_run_options(parser: argparse.ArgumentParser, *, seed_help: str) -> None:
    """How a probe runs: ``--seed`` (``seed_help`` says what it seeds), ``--chunk-size`` and
    ``--device``."""
    parser.add_argument("--seed", type=int, default=0, help=seed_help)
    parser.add_argument("--chunk-size", type=int, default=None, help="samples per backward")
    parser.add_argument("--device", default="cpu", help="torch device")


def add_figure_options(
    parser: argparse.ArgumentParser, *, log_scale_help: str, format_help: str
) -> None:
    """How figures are drawn and saved: ``--log-scale`` and ``--format``."""
    from erf_monitor.viz.export import FORMATS

    parser.add_argument("--log-scale", action="store_true", help=log_scale_help)
    parser.add_argument("--format", choices=FORMATS, default="png", help=format_help)


def add_output_options(
    parser: argparse.ArgumentParser,
    *,
    out: str,
    out_help: str,
    skip_existing_help: str | None = None,
) -> None:
    """Where results go and what is shown meanwhile: ``--skip-existing`` (where the command
    resumes), ``--out`` (default ``out``) and ``--quiet``."""
    if skip_existing_help is not None:
        parser.add_argument("--skip-existing", action="store_true", help=skip_existing_help)
    parser.add_argument("--out", default=out, help=out_help)
    parser.add_argument("--quiet", action="store_true", help="no progress display")
