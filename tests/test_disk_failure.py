"""A failing disk under a TensorBoard logger never makes ``fit()`` raise because of the monitor.

The failures are made by the operating system in a separate process, mid-run:

* ``RLIMIT_FSIZE``: no file may grow past its size at step 2 (what a full disk does to every
  file that is still written to); ``SIGXFSZ`` ignored, so writes fail with ``EFBIG``;
* a file where the monitor's run directory should be.

Before the monitor wrote its own event file, its (large) heatmap records went through
Lightning's ``SummaryWriter``, whose writer thread kept the ``OSError`` and raised it again in
``TensorBoardLogger.finalize``: ``fit()`` failed at teardown. Without the monitor the same run
ends normally; with it, it must too.

The file sink under the same limit, set while a probe is being logged and lifted at the next:
every file it leaves is whole (no torn CSV row, no empty PNG, no temporary file).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import HANG_GUARD_S
from erf_monitor.sinks._tensorboard import tb_tag

pytest.importorskip("lightning.pytorch")
pytest.importorskip("tensorboard")
resource = pytest.importorskip("resource")  # POSIX only

SCRIPT = textwrap.dedent(
    """
    import json, resource, shutil, signal, sys, warnings
    from pathlib import Path
    import torch, lightning.pytorch as pl
    from torch import nn
    from lightning.pytorch.loggers import TensorBoardLogger
    import erf_monitor as em

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
                                     nn.Conv2d(8, 4, 3, padding=2, dilation=2))
        def forward(self, x):
            return self.net(x)
        def training_step(self, batch, _):
            return nn.functional.cross_entropy(self(batch[0]).mean((2, 3)), batch[1])
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class Break(pl.Callback):
        def __init__(self, how):
            self.how = how
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step != 2:
                return
            log_dir = Path(trainer.logger.log_dir)
            if self.how == "fsize":  # nothing may grow any more
                biggest = max(p.stat().st_size for p in log_dir.rglob("*") if p.is_file())
                resource.setrlimit(resource.RLIMIT_FSIZE, (biggest, hard))
            else:  # a file where the monitor's directory should be
                shutil.rmtree(log_dir / "erf", ignore_errors=True)
                (log_dir / "erf").write_text("not a directory")

    def fit(root, how, monitor):
        data = torch.utils.data.TensorDataset(torch.randn(64, 1, 32, 32),
                                              torch.randint(0, 4, (64,)))
        callbacks = [Break(how)]
        if monitor:
            callbacks.append(em.ERFMonitor(layers=["net.0", "net.2"], every_n_steps=2,
                                           num_samples=4, summary=False))
        trainer = pl.Trainer(max_steps=6, logger=TensorBoardLogger(root, name=how),
                             callbacks=callbacks, accelerator="cpu", log_every_n_steps=50,
                             enable_progress_bar=False, enable_checkpointing=False,
                             enable_model_summary=False)
        out = {"how": how, "monitor": monitor}
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            try:
                trainer.fit(Net(), torch.utils.data.DataLoader(data, batch_size=8))
                out["raised"] = None
            except Exception as exc:
                out["raised"] = f"{type(exc).__name__}: {exc}"
            finally:
                resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        out["steps"] = trainer.global_step
        out["warnings"] = [str(w.message) for w in rec if "erf-monitor" in str(w.message)]
        out["probed"] = sorted(callbacks[-1].history.get("net.2", {})) if monitor else []
        return out

    root = sys.argv[1]
    runs = [fit(root, "fsize", False), fit(root, "fsize", True), fit(root, "file", True)]
    print("RESULT" + json.dumps(runs))
    """
)


def test_failing_disk_never_fails_fit(tmp_path: Path) -> None:
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "MPLBACKEND": "Agg"}
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "logs")],
        capture_output=True, text=True, timeout=HANG_GUARD_S, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    control, fsize, file_ = json.loads(line.removeprefix("RESULT"))
    assert control["raised"] is None and control["steps"] == 6
    for run in (fsize, file_):
        assert run["raised"] is None, run  # fit() ended normally with the monitor attached
        assert run["steps"] == 6 and run["probed"] == [0, 2, 4, 6], run
        # the failure was reported, once per sink call kind, in two lines
        assert run["warnings"] and all(len(w.splitlines()) <= 2 for w in run["warnings"]), run
    assert any("File too large" in w for w in fsize["warnings"]), fsize["warnings"]
    assert "Exception in thread" not in proc.stderr  # no writer thread died
    # The monitor's event file holds the probe before the failure and no partial record.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ours = EventAccumulator(str(tmp_path / "logs" / "fsize" / "version_1" / "erf"))
    ours.Reload()
    assert [e.step for e in ours.Scalars(tb_tag("erf/net.2/coverage"))] == [0]
    assert [e.step for e in ours.Images(tb_tag("erf/net.2/heatmap"))] == [0]


FILE_SINK_SCRIPT = textwrap.dedent(
    """
    import json, resource, signal, sys, warnings
    from pathlib import Path
    import torch
    from torch import nn
    import erf_monitor as em
    from erf_monitor.sinks import FileSink, Sink

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    out = Path(sys.argv[1])

    class Limit(Sink):
        # Logged to before the FileSink: during the probe of step 2 no file may grow more
        # than 40 bytes past metrics.csv's size (mid-row for the CSV, mid-file for every
        # image and map); from the probe of step 3 on there is room again.
        def log_scalars(self, scalars, step):
            if step == 2:
                size = (out / "metrics.csv").stat().st_size
                resource.setrlimit(resource.RLIMIT_FSIZE, (size + 40, hard))
            elif step == 3:
                resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        w = em.watch(net, ["0", "2"], logger=[Limit(), FileSink(out)], every_n_steps=1,
                     probe_inputs=torch.randn(2, 1, 24, 24), summary=False, min_coverage=None)
        for _ in range(4):
            w.step()
        w.close()
    print("RESULT" + json.dumps({"probed": sorted(w.history["2"]),
                                 "warnings": [str(x.message) for x in rec]}))
    """
)


def test_file_size_limit_mid_probe_leaves_only_whole_files(tmp_path: Path) -> None:
    """A file-size limit set while a probe is logged, then lifted: every row of metrics.csv
    is whole (the torn one was cut back), no file is empty or left under a temporary name,
    the steps before and after are all there, and the report shows them."""
    import csv

    from erf_monitor.cli.report import build_report

    script = tmp_path / "run.py"
    script.write_text(FILE_SINK_SCRIPT)
    out = tmp_path / "erf"
    proc = subprocess.run(
        [sys.executable, str(script), str(out)], capture_output=True, text=True,
        timeout=HANG_GUARD_S, env={**os.environ, "MPLBACKEND": "Agg"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    result = json.loads(line.removeprefix("RESULT"))
    assert result["probed"] == [1, 2, 3, 4]
    failed = [w for w in result["warnings"] if "File too large" in w]
    assert {w.split(".")[1].split(" ")[0] for w in failed} == {
        "log_scalars", "log_image", "log_arrays"
    }, result["warnings"]  # fmt: skip
    with (out / "metrics.csv").open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["step", "key", "value"]
    assert all(len(r) == 3 for r in rows), [r for r in rows if len(r) != 3]
    keys: dict[int, list[str]] = {}
    for step, key, value in rows[1:]:
        float(value)
        keys.setdefault(int(step), []).append(key)
    assert sorted(keys) == [1, 3, 4]  # step 2's rows: none, not half of one
    assert keys[1] == keys[3] == keys[4]  # no key glued onto another row
    files = [p for p in out.rglob("*") if p.is_file()]
    assert [p for p in files if p.stat().st_size == 0] == []
    assert [p.name for p in files if p.name.endswith(".tmp") or p.name.startswith(".")] == []
    assert sorted(p.name for p in (out / "heatmaps" / "2").iterdir()) == [
        "step_1.png", "step_3.png", "step_4.png"
    ]  # fmt: skip
    _, runs = build_report(out)
    assert [s for s, _ in runs[0].frames["2"]] == [1, 3, 4]
    assert [s for s, _ in runs[0].metrics["2"]["erf_size"]] == [1, 3, 4]
