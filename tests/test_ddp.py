"""ERFMonitor under DDP with 2 CPU processes (gloo), in a subprocess so that pytest stays sane."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import HANG_GUARD_S

pytest.importorskip("lightning")
if not torch.distributed.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available", allow_module_level=True)

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from erf_monitor.sinks._tensorboard import tb_tag

SCRIPT = textwrap.dedent(
    """
    import sys, warnings
    from pathlib import Path

    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    import lightning.pytorch as L
    from lightning.pytorch.loggers import TensorBoardLogger

    import erf_monitor as em

    out, max_steps, on_insufficient = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    distributed_probe = sys.argv[4] == "True"


    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(
                nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Dropout(0.2),
            )
            self.head = nn.Linear(8, 4)

        def forward(self, x):
            return self.head(self.net(x).mean((2, 3)))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

        def train_dataloader(self):
            g = torch.Generator().manual_seed(0)
            ds = TensorDataset(torch.randn(64, 3, 16, 16, generator=g),
                               torch.randint(0, 4, (64,), generator=g))
            return DataLoader(ds, batch_size=8, shuffle=True)


    if __name__ == "__main__":
        L.seed_everything(0)
        at_end = on_insufficient == "raise"  # an alert that only the end of training decides
        cov = 0.9 if on_insufficient == "stop" else {"net.3": 0.5} if at_end else None
        cb = em.ERFMonitor(layers=["net.0", "net.3"], every_n_steps=2, num_samples=4,
                           min_coverage=cov,
                           on_insufficient=on_insufficient,
                           distributed_probe=distributed_probe or "auto")
        trainer = L.Trainer(
            strategy="ddp", devices=2, accelerator="cpu", max_steps=max_steps,
            logger=TensorBoardLogger(str(out), name="tb", version=0),
            enable_progress_bar=False, enable_model_summary=False,
            enable_checkpointing=False, callbacks=[cb],
        )
        module = Module()
        if at_end:  # a 15x15 kernel with its weight at the centre: TRF all, ERF a few px
            module.net[0] = nn.Conv2d(3, 8, 15, padding=7)
            with torch.no_grad():
                module.net[0].weight.zero_()
                module.net[0].weight[:, :, 7, 7] = 1.0
        raised = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                trainer.fit(module)
            except em.ERFCoverageWarning as exc:
                raised = str(exc)
        rank = trainer.global_rank
        # parameters only: BatchNorm running stats are rank-local under DDP (no SyncBatchNorm)
        params = {k: v.detach().clone() for k, v in module.named_parameters()}
        latest = None if cb.latest is None else {n: r.heatmap for n, r in cb.latest.items()}
        torch.save({"model": params, "steps": trainer.global_step,
                    "history": cb.history, "probe_batch": cb.probe_batch, "latest": latest,
                    "raised": raised},
                   out / f"rank{rank}.pt")
    """
)


def run_ddp(
    tmp_path: Path, max_steps: int, on_insufficient: str, distributed_probe: bool = False
) -> list[dict]:
    script = tmp_path / "ddp_script.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # Lightning picks a free MASTER_PORT
    args = [str(tmp_path), str(max_steps), on_insufficient, str(distributed_probe)]
    proc = subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


def assert_same_weights(ranks: list[dict]) -> None:
    a, b = ranks[0]["model"], ranks[1]["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path: Path) -> None:
    ranks = run_ddp(tmp_path, 4, "warn")
    assert ranks[0]["steps"] == ranks[1]["steps"] == 4
    assert_same_weights(ranks)
    # rank 0 probes, rank 1 does not (and never waited for it)
    assert sorted(ranks[0]["history"]["net.3"]) == [0, 2, 4]
    assert ranks[1]["history"] == {} and ranks[1]["probe_batch"] is None
    ours = list((tmp_path / "tb").rglob("erf/events.out.tfevents.*"))
    assert len(ours) == 1  # the monitor's events, written once (by rank 0)
    ea = EventAccumulator(str(ours[0].parent), size_guidance={"images": 0, "scalars": 0})
    ea.Reload()
    assert [e.step for e in ea.Scalars(tb_tag("erf/net.3/coverage"))] == [0, 2, 4]
    assert len(ea.Images(tb_tag("erf/net.0/heatmap"))) == 3


@pytest.mark.slow
def test_ddp_stop_is_agreed_by_all_ranks(tmp_path: Path) -> None:
    ranks = run_ddp(tmp_path, 50, "stop")  # rank 0 alerts at step 0; a hang would time out
    assert ranks[0]["steps"] == ranks[1]["steps"] < 50
    assert_same_weights(ranks)


@pytest.mark.slow
def test_ddp_raise_at_the_end_on_every_rank(tmp_path: Path) -> None:
    """Only rank 0 holds the history and decides; every rank raises its decision (a rank
    left training would wait forever in the next collective)."""
    ranks = run_ddp(tmp_path, 4, "raise")
    assert ranks[0]["steps"] == ranks[1]["steps"] == 4
    assert "at the end of training" in ranks[0]["raised"]
    assert "see rank 0's log" in ranks[1]["raised"]


@pytest.mark.slow
def test_ddp_distributed_probe_splits_the_batch(tmp_path: Path) -> None:
    ranks = run_ddp(tmp_path, 4, "warn", distributed_probe=True)
    a, b = ranks
    assert a["steps"] == b["steps"] == 4
    assert_same_weights(ranks)  # training is unchanged
    # Both ranks probed (their shares of rank 0's batch) and hold the same maps; rank 0 logs.
    assert torch.equal(a["probe_batch"], b["probe_batch"])
    assert a["latest"].keys() == b["latest"].keys() == {"net.0", "net.3"}
    for name in a["latest"]:
        assert torch.equal(a["latest"][name], b["latest"][name])
    assert sorted(a["history"]["net.3"]) == [0, 2, 4] and b["history"] == {}
    files = list((tmp_path / "tb").rglob("erf/events.out.tfevents.*"))
    assert len(files) == 1  # the monitor's events, written once (by rank 0)
