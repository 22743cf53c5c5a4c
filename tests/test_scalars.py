"""``ERFResult.scalars(names)``: a selection computes only what is asked, with today's keys."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import erf_monitor as em
from erf_monitor.measure.result import METRIC_GROUPS, select_metrics


@pytest.fixture(scope="module")
def result() -> em.ERFResult:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=2,
                        dilation=2))  # fmt: skip
    return em.compute_erf(net, torch.randn(4, 1, 40, 40), ["2"])["2"]


def fresh(r: em.ERFResult) -> em.ERFResult:
    return r.with_heatmap(r.heatmap)  # no cache carried over


def test_a_selection_is_a_subset_of_the_full_dict_with_the_same_values(
    result: em.ERFResult,
) -> None:
    full = fresh(result).scalars()
    covered: set[str] = set()
    for group in METRIC_GROUPS:
        part = fresh(result).scalars([group])
        assert part == {k: v for k, v in full.items() if k in part}, group
        assert list(part) == [k for k in full if k in part]  # the full dict's order
        covered |= set(part)
    assert covered == set(full)  # every key belongs to a group
    assert fresh(result).scalars(["coverage", "disc_mass_r*", "sigma_x"]) == {
        "coverage": full["coverage"],
        "sigma_x": full["sigma_x"],
        **{k: v for k, v in full.items() if k.startswith("disc_mass_r")},
    }
    assert fresh(result).scalars([]) == {}


def test_metrics_not_asked_for_are_not_computed(result: em.ERFResult) -> None:
    r = fresh(result)
    r.scalars(["extent", "moments", "shape", "disc_mass_r*"])
    assert r._fits == {}  # the Gaussian fit did not run
    r.scalars(["gauss_fit_r2"])
    assert list(r._fits) == [False]


def test_keys_a_result_does_not_have_are_left_out_and_typos_are_errors(
    result: em.ERFResult,
) -> None:
    assert "disc_mass_r60" not in fresh(result).scalars(["disc_mass_r60"])  # 40 px map
    line = em.compute_erf(nn.Sequential(nn.Conv1d(1, 1, 3)), torch.randn(2, 1, 20), ["0"])["0"]
    assert "axis_angle" not in line.scalars(["axis_angle", "sigma_x"])
    with pytest.raises(ValueError, match="unknown metric 'covrage'"):
        result.scalars(["covrage"])
    assert select_metrics(["openerf"]) == list(METRIC_GROUPS["openerf"])
    assert math.isfinite(result.scalars(["gaussian_r2"])["gaussian_r2"])


def test_every_name_users_may_ask_for_is_computed_by_scalars() -> None:
    """One catalogue: the names ``metrics=`` accepts (``METRIC_NAMES``) are the keys of
    ``METRIC_GROUPS``, and each one, asked for as a probe asks, gives ``scalars()`` entries."""
    from erf_monitor.measure.result import METRIC_NAMES, PER_AXIS
    from erf_monitor.sinks._metrics import metric_patterns

    patterns = {p for group in METRIC_GROUPS.values() for p in group}
    named = {f"{n}_?" if n in PER_AXIS else n for n in METRIC_NAMES}
    assert {n for n in named if not n.startswith("disc_mass_r")} | {"disc_mass_r*"} == patterns
    assert len(set(METRIC_NAMES)) == len(METRIC_NAMES)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 2, 3, padding=1))
    r = em.compute_erf(net, torch.randn(2, 1, 96, 96), ["2"], position="corners")["2"]
    full = r.scalars()
    for name in METRIC_NAMES:
        part = r.scalars(metric_patterns([name]))
        assert part, name
        assert part == {k: v for k, v in full.items() if k in part}, name
