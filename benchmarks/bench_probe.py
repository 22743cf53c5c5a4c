"""Probe cost against the plain approach and a training step, measured side by side in one run.

Run ``python benchmarks/bench_probe.py`` (or ``make bench``); ``--quick`` for a smoke run,
``--device cuda`` on a GPU (timings are synchronised). Every timed variant runs once per
repeat, interleaved and in a rotating order, so that load from other processes hits all
variants alike; medians and their ratios are printed (rich tables) and optionally written as
JSON (``--json``).

Variants (all on the same ``--samples`` probe images, model in eval mode unless noted):

* ``plain``: RepLKNet ``erf/visualize_erf.py`` style: one image at a time, one layer per pass,
  a full forward of the whole model and ``torch.autograd.grad`` w.r.t. the image each.
* ``probe``: ``compute_erf`` with its defaults (cropping ``"auto"``), TRFs precomputed once
  (as :class:`~erf_monitor.ERFMonitor` caches them).
* ``probe_nocrop``: ``compute_erf(..., crop=False)``: one forward with early exit, one batched
  input-only backward per layer, no cropping.
* ``probe_frozen``: ``probe`` with every parameter's ``requires_grad`` switched off around
  the call (an ablation: does skipping weight-gradient graph nodes help?).
* ``train_step``: one training step on the same images: forward in train mode, cross-entropy
  on random labels, ``backward()`` (parameter gradients), gradients dropped.

Peak extra memory (``--memory``, on by default) is measured in fresh subprocesses (CPU: peak
RSS growth over the process with model and data loaded; CUDA: ``max_memory_allocated``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torchvision
from _timing import interleaved
from torch import nn

import erf_monitor as em

DEFAULT_LAYERS = ("layer1", "layer2", "layer3", "layer4")


# ----------------------------------------------------------------------------- variants


def plain_reference(
    model: nn.Module, x: torch.Tensor, layers: Sequence[str]
) -> dict[str, torch.Tensor]:
    """One image at a time, one layer per pass, full forward + input gradient each."""
    model.eval()
    modules = dict(model.named_modules())
    maps = {}
    for name in layers:
        total = torch.zeros(x.shape[2:], device=x.device)
        for i in range(x.shape[0]):
            xi = x[i : i + 1].detach().clone().requires_grad_(True)
            captured: list[torch.Tensor] = []
            handle = modules[name].register_forward_hook(
                lambda _m, _i, out, cap=captured: cap.append(out) if not cap else None
            )
            try:
                model(xi)
            finally:
                handle.remove()
            out = captured[0]
            centre: tuple[int | slice, ...] = (0, slice(None), *(s // 2 for s in out.shape[2:]))
            seed = out[centre].sum()
            (grad,) = torch.autograd.grad(seed, xi)
            total += grad[0].abs().sum(0)
        maps[name] = (total / x.shape[0]).cpu()
    return maps


def probe(model: nn.Module, x: torch.Tensor, layers: Sequence[str], trfs: Any, **kw: Any) -> Any:
    return em.compute_erf(model, x, list(layers), trf=trfs, **kw)


def probe_frozen(model: nn.Module, x: torch.Tensor, layers: Sequence[str], trfs: Any) -> Any:
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        return probe(model, x, layers, trfs)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def train_step(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> None:
    model.train()
    loss = nn.functional.cross_entropy(model(x), labels)
    loss.backward()
    for p in model.parameters():
        p.grad = None


# ----------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def on(device: torch.device) -> Callable[[Callable[[], Any]], float]:
    """The timer of :func:`_timing.interleaved` for ``device`` (synchronised on CUDA)."""
    return lambda fn: timed(fn, device)


def median(ts: Sequence[float]) -> float:
    return statistics.median(ts)


# ----------------------------------------------------------------------------- memory


def _memory_child(args: argparse.Namespace) -> None:
    """Subprocess body: load model + data, run one variant, print the peak extra memory."""
    device = torch.device(args.device)
    model, x, labels, trfs = setup(args.model, args.size, args.samples, args.layers, device)
    fn = make_variants(model, x, labels, trfs, args.layers, plain=False)[args.memory_child]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        extra = torch.cuda.max_memory_allocated(device) - base
    else:  # RSS sampled every 2 ms by a thread, after returning freed heap to the OS
        import ctypes
        import gc
        import threading

        gc.collect()
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        base = peak = _rss_bytes()
        done = threading.Event()

        def poll() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, _rss_bytes())
                time.sleep(0.002)

        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
        try:
            fn()
        finally:
            done.set()
            thread.join()
        extra = max(peak, _rss_bytes()) - base
    print(json.dumps({"extra_bytes": int(extra)}))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_memory(args: argparse.Namespace, size: int, variant: str) -> float:
    cmd = [
        sys.executable,
        __file__,
        "--memory-child",
        variant,
        "--size",
        str(size),
        "--model",
        args.model,
        "--samples",
        str(args.samples),
        "--device",
        args.device,
        "--layers",
        *args.layers,
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["extra_bytes"] / 2**20


# ----------------------------------------------------------------------------- setup


def setup(
    model_name: str, size: int, samples: int, layers: Sequence[str], device: torch.device
) -> tuple[nn.Module, torch.Tensor, torch.Tensor, Any]:
    torch.manual_seed(0)
    model = getattr(torchvision.models, model_name)().to(device).eval()
    x = torch.randn(samples, 3, size, size, device=device)
    labels = torch.randint(0, 1000, (samples,), device=device)
    trfs = em.theoretical_rf(model, (3, size, size), list(layers))
    return model, x, labels, trfs


def make_variants(
    model: nn.Module,
    x: torch.Tensor,
    labels: torch.Tensor,
    trfs: Any,
    layers: Sequence[str],
    plain: bool = True,
    ablations: bool = True,
) -> dict[str, Callable[[], Any]]:
    trainee = copy.deepcopy(model)
    variants: dict[str, Callable[[], Any]] = {}
    if plain:
        variants["plain"] = lambda: plain_reference(model, x, layers)
    variants["probe"] = lambda: probe(model, x, layers, trfs)
    variants["probe_nocrop"] = lambda: probe(model, x, layers, trfs, crop=False)
    if ablations:
        variants["probe_frozen"] = lambda: probe_frozen(model, x, layers, trfs)
    variants["train_step"] = lambda: train_step(trainee, x, labels)
    return variants


def machine(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "load_avg": os.getloadavg(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# ----------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--model", default="resnet50", help="a torchvision model name")
    ap.add_argument("--layers", nargs="+", default=list(DEFAULT_LAYERS))
    ap.add_argument("--sizes", nargs="+", type=int, default=[224, 640])
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="small sizes, one repeat, no scaling")
    ap.add_argument("--no-plain", action="store_true", help="skip the (slow) plain reference")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    ap.add_argument("--no-scaling", action="store_true", help="skip samples/layers/size sweeps")
    ap.add_argument(
        "--scaling-sizes", nargs="+", type=int, default=[], help="extra sizes for the size sweep"
    )
    ap.add_argument("--only-scaling", action="store_true", help="skip the main comparison")
    ap.add_argument("--json", help="also write all measurements to this JSON file")
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_child:
        _memory_child(args)
        return {}
    if args.quick:
        args.sizes, args.repeats, args.no_scaling = [96, 192], 1, True
        args.model = "resnet18" if args.model == "resnet50" else args.model

    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 110))
    device = torch.device(args.device)
    info = machine(device)
    console.print(f"[bold]erf-monitor probe benchmark[/]  {info}")
    report: dict[str, Any] = {"machine": info, "args": vars(args), "sizes": {}, "scaling": {}}

    main_table = Table(title=f"{args.model}, {args.samples} samples, layers {args.layers}")
    for col in ("size", "variant", "median s", "all s", "peak extra MiB"):
        main_table.add_column(col, justify="right")
    ratio_table = Table(title="Ratios (medians of the same run)")
    for col in ("size", "ratio", "value"):
        ratio_table.add_column(col, justify="right")

    for size in [] if args.only_scaling else args.sizes:
        t0 = time.perf_counter()
        model, x, labels, trfs = setup(args.model, size, args.samples, args.layers, device)
        trf_s = time.perf_counter() - t0
        variants = make_variants(model, x, labels, trfs, args.layers, plain=not args.no_plain)
        # Warm-up: the plain reference on one image only (it is linear in the images).
        for name, fn in variants.items():
            if name != "plain":
                fn()
        if "plain" in variants:
            plain_reference(model, x[:1], args.layers)
        times = interleaved(variants, args.repeats, timer=on(device))
        med = {k: median(v) for k, v in times.items()}
        mem: dict[str, float] = {}
        if not args.no_memory:
            for name in ("probe", "probe_nocrop", "train_step"):
                mem[name] = measure_memory(args, size, name)
        for name, ts in times.items():
            main_table.add_row(
                str(size),
                name,
                f"{med[name]:.3f}",
                " ".join(f"{t:.2f}" for t in ts),
                f"{mem[name]:.0f}" if name in mem else "",
            )
        ratios: dict[str, float] = {}
        if "plain" in med:
            ratios["plain / probe (speed-up)"] = med["plain"] / med["probe"]
            ratios["plain / probe_nocrop"] = med["plain"] / med["probe_nocrop"]
        ratios["probe / train_step"] = med["probe"] / med["train_step"]
        ratios["probe_nocrop / train_step"] = med["probe_nocrop"] / med["train_step"]
        ratios["crop off / crop on"] = med["probe_nocrop"] / med["probe"]
        if "probe_frozen" in med:
            ratios["probe / probe_frozen"] = med["probe"] / med["probe_frozen"]
        if mem:
            ratios["memory probe / train_step"] = mem["probe"] / max(mem["train_step"], 1.0)
            ratios["memory probe_nocrop / train_step"] = mem["probe_nocrop"] / max(
                mem["train_step"], 1.0
            )
        for k, v in ratios.items():
            ratio_table.add_row(str(size), k, f"{v:.2f}")
        groups = em_plan(trfs, args.layers, size)
        report["sizes"][str(size)] = {
            "times_s": times,
            "median_s": med,
            "ratios": ratios,
            "memory_mib": mem,
            "trf_analysis_s": trf_s,
            "crop_plan": groups,
        }
        console.print(f"size {size}: crop plan {groups} (TRF analysis + setup {trf_s:.1f} s)")

    if report["sizes"]:
        console.print(main_table)
        console.print(ratio_table)
    if not args.no_scaling:
        report["scaling"] = scaling(args, device, console)
    report["machine"]["load_avg_end"] = os.getloadavg()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


def em_plan(trfs: Any, layers: Sequence[str], size: int) -> list[str]:
    from erf_monitor.probe.crop import plan_groups

    units = {n: [trfs[n].output_centre] for n in layers}
    by_index = {n: {trfs[n].output_centre: trfs[n]} for n in layers}
    groups = plan_groups(units, by_index, (size, size), "auto", False)
    return [
        f"{'+'.join(g.layers)}@{'full' if g.window is None else 'x'.join(map(str, g.window.shape))}"
        for g in groups
    ]


def scaling(args: argparse.Namespace, device: torch.device, console: Any) -> dict[str, Any]:
    """How the probe's cost grows with samples, layers and resolution (crop on and off)."""
    from rich.table import Table

    out: dict[str, Any] = {}
    base = min(args.sizes)
    model, x, labels, trfs = setup(args.model, base, max(8, args.samples), args.layers, device)
    table = Table(title=f"Scaling ({args.model}; median of {args.repeats}; seconds)")
    for col in ("sweep", "value", "probe", "probe_nocrop", "train_step"):
        table.add_column(col, justify="right")

    def run(x_: torch.Tensor, layers: Sequence[str], trfs_: Any) -> dict[str, float]:
        v = make_variants(model, x_, labels[: x_.shape[0]], trfs_, layers, plain=False)
        v.pop("probe_frozen")
        return {
            k: median(ts)
            for k, ts in interleaved(v, args.repeats, warmup=True, timer=on(device)).items()
        }

    for n in (1, 2, 4, 8, 16)[: 5 if x.shape[0] >= 16 else 4]:
        r = run(x[:n], args.layers, trfs)
        out[f"samples={n}"] = r
        table.add_row(f"samples @{base}", str(n), *(f"{r[k]:.3f}" for k in r))
    for k in range(1, len(args.layers) + 1):
        layers = list(args.layers[:k])
        r = run(x[: args.samples], layers, trfs)
        out[f"layers={'+'.join(layers)}"] = r
        table.add_row(f"layers @{base}", "+".join(layers), *(f"{r[k]:.3f}" for k in r))
    for size in sorted({base, 320, 448, *args.scaling_sizes}):
        m2, x2, l2, t2 = setup(args.model, size, min(args.samples, 4), args.layers, device)
        v = make_variants(m2, x2, l2, t2, args.layers, plain=False)
        v.pop("probe_frozen")
        r = {
            k: median(ts)
            for k, ts in interleaved(v, args.repeats, warmup=True, timer=on(device)).items()
        }
        out[f"size={size} (4 samples)"] = r
        table.add_row("size (4 samples)", str(size), *(f"{r[k]:.3f}" for k in r))
    console.print(table)
    return out


if __name__ == "__main__":
    main()
