"""``compute_erf_sharded``: the probe images shared over 2 CPU processes (gloo) give the
single-process maps, per-sample maps and fields; a failure on one rank reaches every rank."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import erf_monitor as em
from conftest import HANG_GUARD_S

SCRIPT = Path(__file__).with_name("_sharded_script.py")
sys.path.insert(0, str(SCRIPT.parent))
from _sharded_script import Gated, gated_inputs, inputs, make_model, small_trf  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("sharded")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), str(_free_port())],
        capture_output=True, text=True, timeout=HANG_GUARD_S,  # collectives time out after 120 s
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["luo", "replknet", "openerf"])
def test_maps_equal_one_process(ranks: list[dict[str, Any]], mode: str) -> None:
    want = em.compute_erf(make_model(), inputs(), ["2", "4"], mode=mode)  # type: ignore[arg-type]
    for got in ranks:  # every rank gets the whole batch's results
        assert got[f"{mode}/n"] == [5, 5]
        assert got[mode].keys() == {"2", "4"}
        for k, heat in got[mode].items():
            torch.testing.assert_close(heat, want[k].heatmap, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_fields_and_per_sample_maps_are_gathered_in_order(ranks: list[dict[str, Any]]) -> None:
    want = em.compute_erf(make_model(), inputs(), ["4"], keep_per_sample=True, position="corners")
    field = want["4"].field
    assert field is not None
    for got in ranks:
        assert list(got["field"]) == list(field)
        for key, (heat, per_sample) in got["field"].items():
            torch.testing.assert_close(heat, field[key].heatmap, rtol=1e-5, atol=1e-7)
            assert per_sample.shape == (5, 16, 16)  # the padded copy of the last share dropped
            torch.testing.assert_close(per_sample, field[key].per_sample, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_failures_reach_every_rank(ranks: list[dict[str, Any]]) -> None:
    for got in ranks:
        assert "failed on rank(s) [1]" in got["one_failed"]
        # The plain error where every rank failed: the unknown layer's own (a ValueError).
        assert got["all_failed"] == "UnknownLayerError"
        assert "cannot be sharded" in got["train_mode"]
    assert "boom on rank 1" in ranks[1]["one_failed"]


@pytest.mark.slow
def test_a_trf_contradicted_on_one_rank_is_unknown_on_every_rank(
    ranks: list[dict[str, Any]],
) -> None:
    # Only rank 1's images reach outside the given (too small) TRF; one process sees it in
    # the whole batch's map and reports the TRF unknown: so must every rank.
    model, given = nn.Sequential(Gated()), {"0": small_trf()}
    want = em.compute_erf(model, gated_inputs(), ["0"], trf=given)["0"]
    assert want.trf is None and want.trf_issue is not None
    alone = em.compute_erf(model, gated_inputs()[:3], ["0"], trf=given)["0"]
    assert alone.trf is not None  # rank 0's own images do not contradict it
    for got in ranks:
        trf, issue, heat = got["gated"]
        assert trf is None and "outside the clipped TRF" in issue
        torch.testing.assert_close(heat, want.heatmap, rtol=1e-5, atol=1e-7)


def test_one_process_is_compute_erf() -> None:
    from erf_monitor.probe.sharded import compute_erf_sharded

    got = compute_erf_sharded(make_model(), inputs(), ["4"], keep_per_sample=True)
    want = em.compute_erf(make_model(), inputs(), ["4"], keep_per_sample=True)
    torch.testing.assert_close(got["4"].heatmap, want["4"].heatmap, rtol=0, atol=0)
    assert got["4"].per_sample is not None and got["4"].per_sample.shape == (5, 16, 16)
