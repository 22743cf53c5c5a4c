"""The probe that every rank runs together (``erf_monitor.probe.distributed``).

In-process tests use a one-rank gloo group; the real thing runs in 2 CPU processes (gloo)
through ``tests/_distributed_script.py``, with timeouts so that a hang fails instead of
blocking CI.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

import erf_monitor as em
from conftest import HANG_GUARD_S
from erf_monitor.measure.metrics import finalise_map
from erf_monitor.probe.distributed import all_ranks_probe, sharding, share

SCRIPT = Path(__file__).with_name("_distributed_script.py")


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, padding=1),
        nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
    )  # fmt: skip


# -- what splitting the probe batch relies on ---------------------------------------------
@pytest.mark.parametrize("mode", ["luo", "replknet"])
def test_published_map_is_finalise_of_the_sum_of_per_sample_maps(mode: str) -> None:
    x = torch.randn(5, 2, 12, 12, generator=torch.Generator().manual_seed(1))
    res = em.compute_erf(net(), x, ["2", "4"], mode=mode, keep_per_sample=True)  # type: ignore[arg-type]
    for r in res.values():
        assert r.per_sample is not None and r.per_sample.shape == (5, 12, 12)
        expected = finalise_map(r.per_sample.double().sum(0), 5, r.mode)
        torch.testing.assert_close(r.heatmap, expected, rtol=1e-5, atol=1e-7)
        if mode == "luo":  # DESIGN §2: the mean over samples of the per-sample maps
            torch.testing.assert_close(r.heatmap, r.per_sample.mean(0), rtol=1e-5, atol=1e-7)


def test_per_sample_maps_do_not_depend_on_the_other_samples() -> None:
    # Eval mode: a sample's map is the same alone, in any batch and any chunking. This is
    # what lets every rank probe a share and the sums be added.
    model = nn.Sequential(net(), nn.BatchNorm2d(4)).train()
    x = torch.randn(4, 2, 12, 12, generator=torch.Generator().manual_seed(2))
    together = em.compute_erf(model, x, ["0.4"], keep_per_sample=True, chunk_size=3)
    for i in range(4):
        alone = em.compute_erf(model, x[i : i + 1], ["0.4"], keep_per_sample=True)
        got, want = together["0.4"].per_sample, alone["0.4"].per_sample
        assert got is not None and want is not None
        torch.testing.assert_close(got[i], want[0], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize(("n", "world"), [(8, 2), (3, 2), (1, 4), (5, 3)])
def test_shares_are_equal_sized_and_cover_every_sample_once(n: int, world: int) -> None:
    real: list[int] = []
    for rank in range(world):
        indices, k = share(n, rank, world)
        assert len(indices) == -(-n // world)  # the same number of samples on every rank
        assert all(0 <= i < n for i in indices)
        real += indices[:k]
    assert real == list(range(n))


# -- one rank, in process ----------------------------------------------------------------
@pytest.fixture
def one_rank_group(tmp_path: Path) -> Iterator[None]:
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_without_a_process_group_rank_zero_probes_alone() -> None:
    assert not all_ranks_probe(net(), True)
    assert sharding(net()) is None


def test_fsdp2_on_one_rank_matches_the_plain_probe(one_rank_group: None) -> None:
    from torch.distributed.fsdp import fully_shard

    x = torch.randn(3, 2, 12, 12, generator=torch.Generator().manual_seed(3))
    want = em.compute_erf(net(), x, ["2", "4"])
    model = net()
    fully_shard(model[2])
    fully_shard(model)
    assert sharding(model) == "fsdp2" and all_ranks_probe(model, "auto")
    w = em.watch(model, ["2", "4"], num_samples=3, probe_inputs=x, min_coverage=None)
    results = w.probe()
    assert results is not None
    for name in ("2", "4"):
        torch.testing.assert_close(results[name].heatmap, want[name].heatmap)
        assert results[name].trf == want[name].trf
    # Parameters are sharded again (DTensors), the model still trains.
    assert all(type(p).__name__ == "DTensor" for p in model.parameters())
    model(x).sum().backward()


class Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it (numeric TRF fallback)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(2, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        return self.b(y) if bool(y.sum() > -1e9) else y


def test_fsdp2_untraceable_model_exact_maps_without_trf(one_rank_group: None) -> None:
    # The numeric TRF fallback deep-copies the model, which FSDP forbids: the TRF is reported
    # unknown (ratio NaN), out loud; the maps are still exact.
    from torch.distributed.fsdp import fully_shard

    x = torch.randn(3, 2, 12, 12, generator=torch.Generator().manual_seed(5))
    want = em.compute_erf(Branchy(), x, ["b"])
    model = Branchy()
    fully_shard(model.b)
    fully_shard(model)
    w = em.watch(model, ["b"], probe_inputs=x, num_samples=3, min_coverage=None)
    with pytest.warns(em.ERFProbeWarning, match="could not be analysed.*deepcopy"):
        results = w.probe()
    assert results is not None and results["b"].trf is None
    torch.testing.assert_close(results["b"].heatmap, want["b"].heatmap)


def test_fsdp2_with_distributed_probe_false_is_refused(one_rank_group: None) -> None:
    from torch.distributed.fsdp import fully_shard

    model = fully_shard(net())
    w = em.watch(model, ["2"], probe_inputs=torch.randn(2, 2, 12, 12), distributed_probe=False)
    with pytest.warns(em.ERFProbeWarning, match="rank 0 cannot probe alone"):
        assert w.probe() is None
    w.step()  # the monitor is off: nothing more happens, nothing hangs
    assert w.history == {}


def test_fsdp1_is_refused_out_loud(one_rank_group: None) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FSDP1's own deprecation notes
        model = FullyShardedDataParallel(net(), device_id=torch.device("cpu"))
    assert sharding(model) == "fsdp1"
    w = em.watch(model, ["_fsdp_wrapped_module.2"], probe_inputs=torch.randn(2, 2, 12, 12))
    with pytest.warns(em.ERFProbeWarning, match=r"FullyShardedDataParallel \(FSDP1\).*fully_shard"):
        assert w.probe() is None
    strict = em.watch(model, ["_fsdp_wrapped_module.2"], probe_inputs=torch.randn(2, 2, 12, 12),
                      strict=True)  # fmt: skip
    with pytest.raises(em.ERFProbeError, match="FSDP1"):
        strict.probe()


# -- two processes ------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_two_ranks(tmp_path: Path, scenario: str) -> list[dict[str, Any]]:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), scenario, str(_free_port())],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,  # a hang fails here (collectives time out after 10 min)
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


def assert_same_maps(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6 * want[name].max())


@pytest.mark.slow
def test_fsdp2_two_processes(tmp_path: Path) -> None:
    ranks = run_two_ranks(tmp_path, "fsdp2")
    for r in ranks:
        # Training with the monitor is bit-for-bit the training without it.
        assert r["plain"].keys() == r["watched"].keys()
        for k in r["plain"]:
            assert torch.equal(r["plain"][k], r["watched"][k]), k
        # The sharded probe's maps are those of an unsharded copy with the same weights.
        assert_same_maps(r["maps"], r["reference"])
        # FSDP's own settings are as they were (no reshard after forward for the root only).
        assert r["flags"][0] == r["flags"][1]
        # A probe that failed on rank 1 only was skipped on both ranks ...
        assert r["failed_history"] == {} and r["failed_latest"]
    a, b = ranks
    # ... and reported once, by rank 0, naming the rank that failed (rank 1 only logs).
    assert len(a["failure_warnings"]) == 1 and b["failure_warnings"] == []
    for k in a["watched"]:
        assert torch.equal(a["watched"][k], b["watched"][k]), k
    for name in a["maps"]:
        assert torch.equal(a["maps"][name], b["maps"][name])
    assert torch.equal(a["probe"], b["probe"]) and a["probe"].shape[0] == 3
    assert a["trf"] == b["trf"] and a["trf"]["1.2"].size == (15.0, 15.0)
    assert {n: sorted(h) for n, h in a["history"].items()} == {
        n: [0, 2, 4] for n in ("0.2", "1.0", "1.2")
    }
    assert b["history"] == {}  # rank 0 logs and keeps the history
    assert len(list((tmp_path / "logs").glob("heatmaps/**/*.png"))) >= 9


@pytest.mark.slow
def test_ddp_with_distributed_probe_two_processes(tmp_path: Path) -> None:
    ranks = run_two_ranks(tmp_path, "ddp")
    a, b = ranks
    for r in ranks:
        assert_same_maps(r["maps"], r["reference"])
    for name in a["maps"]:
        assert torch.equal(a["maps"][name], b["maps"][name])
    assert {n: sorted(h) for n, h in a["history"].items()} == {
        n: [0, 1, 2] for n in ("0.2", "1.0", "1.2")
    }
    assert (tmp_path / "logs" / "metrics.csv").exists() and b["history"] == {}


@pytest.mark.slow
def test_hf_trainer_ddp_two_processes(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    a, b = (r for r in run_two_ranks(tmp_path, "hf_ddp"))
    # Default: the world process zero probes and logs alone.
    assert a["auto"]["maps"] is not None and b["auto"]["maps"] is None
    assert b["auto"]["history"] == {}
    # distributed_probe=True: both ranks probe their shares and get the same maps, those of
    # a probe of the whole batch; rank 0 logs.
    assert_same_maps(a["True"]["maps"], a["True"]["reference"])
    for name, heat in a["True"]["maps"].items():
        assert torch.equal(heat, b["True"]["maps"][name])
    steps = next(iter(a["True"]["history"].values()))
    assert sorted(steps) == [0, 2, 4] and b["True"]["history"] == {}
    for option in ("auto", "True"):
        files = list((tmp_path / option / "runs").rglob("erf/events.out.tfevents.*"))
        assert len(files) == 1  # written once, by rank 0
