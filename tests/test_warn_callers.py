"""A warning never crashes the user's program, whatever kind of caller runs it.

erf-monitor reports its warnings at the user's own line. Each kind of ``__main__`` that
CPython or a notebook creates is run here in a real subprocess: a script file, ``python -c``,
a script read from stdin, compiled code ``exec``-ed into a notebook-like ``__main__`` (whose
loader cannot give source) and IPython. The coverage alert must be printed, at the user's
line, and the program must go on to its last line.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

#: A net whose 5 px field covers < 1% of a 64 px input: the first probe alerts. The line
#: marked ALERT is where the user's optimizer step (the probe) runs, so where the warning must
#: point.
WATCH = textwrap.dedent(
    """\
    import torch, warnings
    from torch import nn
    import erf_monitor as em
    warnings.simplefilter("always")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    w = em.watch(net, layers=["2"], optimizer=opt, every_n_steps=1, summary=False,
                 min_coverage=0.05)
    net(torch.randn(2, 3, 64, 64)).mean().backward()
    opt.step()  # ALERT (the first probe runs at the optimizer step)
    w.remove()
    print("TRAINING WENT ON")
    """
)

LIGHTNING = textwrap.dedent(
    """\
    import torch, warnings
    import lightning.pytorch as pl
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    import erf_monitor as em
    warnings.simplefilter("always")

    class Lit(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                                     nn.Conv2d(4, 4, 3, padding=1))
        def forward(self, x):
            return self.net(x)
        def training_step(self, batch, _):
            return self(batch[0]).mean()
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    data = DataLoader(TensorDataset(torch.randn(8, 3, 64, 64)), batch_size=4)
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False,
                         callbacks=[em.ERFMonitor(layers=["net.2"], every_n_steps=1,
                                                  summary=False, min_coverage=0.05)])
    trainer.fit(Lit(), data)  # ALERT
    print("TRAINING WENT ON")
    """
)


def _alert_line(src: str) -> int:
    return next(i for i, line in enumerate(src.splitlines(), 1) if "# ALERT" in line)


ALERT_LINE = {src: _alert_line(src) for src in (WATCH, LIGHTNING)}


def _run(args: list[str], tmp_path: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="", MPLBACKEND="Agg")
    return subprocess.run(
        [sys.executable, *args], input=stdin, capture_output=True, text=True, cwd=tmp_path, env=env
    )


def _notebook_main(code: str, filename: str) -> str:
    """A program that runs ``code`` as a notebook kernel does: compiled under a cell's file
    name and exec-ed into a fresh ``__main__`` whose loader cannot give source."""
    return textwrap.dedent(
        f"""\
        import sys, types

        class NoSource:
            def get_source(self, name):
                raise ImportError(f"{{name!r}} is not a built-in module")

        main = types.ModuleType("__main__")
        main.__loader__ = NoSource()
        main.__builtins__ = __builtins__
        sys.modules["__main__"] = main
        exec(compile({code!r}, {filename!r}, "exec"), main.__dict__)
        """
    )


CALLERS = ["script", "python -c", "stdin", "notebook exec", "ipython"]


def _program(caller: str, code: str, tmp_path: Path) -> tuple[list[str], str | None, str]:
    """(arguments, stdin, the file name the warning must name) for one kind of caller."""
    if caller == "script":
        path = tmp_path / "train.py"
        path.write_text(code)
        return [str(path)], None, str(path)
    if caller == "python -c":
        return ["-c", code], None, "<string>"
    if caller == "stdin":
        return ["-"], code, "<stdin>"
    if caller == "notebook exec":
        cell = "/tmp/ipykernel_1/3215.py"
        return ["-c", _notebook_main(code, cell)], None, cell
    pytest.importorskip("IPython")
    runner = (
        "from IPython.core.interactiveshell import InteractiveShell\n"
        f"res = InteractiveShell.instance().run_cell({code!r}, store_history=True)\n"
        "res.raise_error()\n"
    )
    return ["-c", runner], None, "<ipython-input-1-"


@pytest.mark.parametrize("caller", CALLERS)
def test_alert_from_watch_never_ends_the_run(caller: str, tmp_path: Path) -> None:
    args, stdin, filename = _program(caller, WATCH, tmp_path)
    proc = _run(args, tmp_path, stdin)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TRAINING WENT ON" in proc.stdout, proc.stderr[-3000:]
    assert "ERFCoverageWarning" in proc.stderr and "covers only" in proc.stderr, proc.stderr
    if caller != "ipython":  # IPython numbers its cells (<ipython-input-1-hash>)
        assert f"{filename}:{ALERT_LINE[WATCH]}: ERFCoverageWarning" in proc.stderr, proc.stderr
    else:
        assert f":{ALERT_LINE[WATCH]}: ERFCoverageWarning" in proc.stderr, proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("caller", ["python -c", "stdin", "notebook exec"])
def test_alert_from_lightning_never_ends_the_run(caller: str, tmp_path: Path) -> None:
    pytest.importorskip("lightning.pytorch")
    args, stdin, filename = _program(caller, LIGHTNING, tmp_path)
    proc = _run(args, tmp_path, stdin)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TRAINING WENT ON" in proc.stdout, proc.stderr[-3000:]
    # Lightning formats warnings its own way ("file:line: message", no category)
    assert f"{filename}:{ALERT_LINE[LIGHTNING]}: " in proc.stderr, proc.stderr
    assert "covers only" in proc.stderr, proc.stderr


def test_warning_machinery_failure_is_logged_not_raised(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import warnings

    from erf_monitor.core import warn as _warn
    from erf_monitor.core.errors import ERFCoverageWarning

    def broken(*args: object, **kwargs: object) -> None:
        raise ImportError("'__main__' is not a built-in module")

    monkeypatch.setattr(warnings, "warn", broken)
    _warn.warn("covers only 1%", ERFCoverageWarning)  # must not raise
    assert any("covers only 1%" in r.getMessage() for r in caplog.records)


def test_warning_filters_set_to_error_still_raise() -> None:
    import warnings

    from erf_monitor.core import warn as _warn
    from erf_monitor.core.errors import ERFCoverageWarning

    with warnings.catch_warnings():
        warnings.simplefilter("error", ERFCoverageWarning)
        with pytest.raises(ERFCoverageWarning):
            _warn.warn("covers only 1%", ERFCoverageWarning)
