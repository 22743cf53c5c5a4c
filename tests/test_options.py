"""MonitorOptions: one validated, documented set of options shared by every front-end."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import torch
from torch import nn

import erf_monitor as em
from erf_monitor.monitor.engine import MonitorEngine
from erf_monitor.monitor.options import MonitorKwargs


def net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 2, 3))


def test_kwargs_typeddict_matches_the_dataclass() -> None:
    fields = {f.name for f in dataclasses.fields(em.MonitorOptions)}
    assert set(typing.get_type_hints(MonitorKwargs)) == fields - {"layers"}


def test_every_field_is_documented_in_the_docstring() -> None:
    doc = em.MonitorOptions.__doc__ or ""
    for f in dataclasses.fields(em.MonitorOptions):
        assert f"        {f.name}: " in doc, f.name


def test_front_ends_share_options_and_keywords_override() -> None:
    opts = em.MonitorOptions(layers=["2"], every_n_steps=7, num_samples=3, min_coverage=None)
    cb = em.ERFMonitor(options=opts, num_samples=5)
    w = em.watch(net(), options=opts)
    assert cb._engine.options == opts.replace(num_samples=5)
    assert w._engine.options == opts
    assert (cb.every_n_steps, w.every_n_steps) == (7, 7)
    # Positional layers win over the options' layers.
    assert em.ERFMonitor(["0"], options=opts)._engine.layers == ["0"]


def test_watch_keeps_its_own_default_period_only_without_options() -> None:
    assert em.watch(net()).every_n_steps == 100
    assert em.ERFMonitor().every_n_steps == 500
    assert em.watch(net(), options=em.MonitorOptions()).every_n_steps == 500


def test_bad_values_and_unknown_names_fail_at_construction() -> None:
    with pytest.raises(TypeError, match=r"Unknown option\(s\) \['every_n_step'\]"):
        em.ERFMonitor(every_n_step=3)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="num_samples"):
        em.watch(net(), num_samples=0)
    with pytest.raises(TypeError, match="options must be a MonitorOptions"):
        MonitorEngine({"layers": "auto"})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no validation loader"):
        em.watch(net(), options=em.MonitorOptions(probe_inputs="val"))


def test_options_are_normalised_and_immutable() -> None:
    opts = em.MonitorOptions(layers=["a", "b"], min_coverage={"a": 1}, render_kwargs=None)  # type: ignore[arg-type]
    assert opts.layers == ("a", "b")
    assert opts.min_coverage == {"a": 1.0}
    assert opts.render_kwargs == {}
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.num_samples = 3  # type: ignore[misc]
    assert em.MonitorOptions(probe_inputs=torch.zeros(2, 1, 4, 4)).source == "tensor"
