"""Draw the coverage alert policy's cases into docs/img/alerts.png (a second on a CPU).

The curves are made up (probes every 100 steps, 2,000 steps of training, ``min_coverage``
5%); where and why each alert fires is decided by the monitor's own policy,
:class:`erf_monitor.monitor.alerts.AlertPolicy` with its defaults. Run from the repository root:

    python docs/scripts/make_alert_figure.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from erf_monitor.monitor.alerts import AlertPolicy, projected

OUT = Path(__file__).resolve().parents[1] / "img" / "alerts.png"
THRESHOLD, EVERY, END = 0.05, 100, 2000
STEPS = np.arange(0, END + 1, EVERY)


def grows(s: np.ndarray) -> np.ndarray:
    return 0.012 + 0.4 / (1 + np.exp(-(s - 900) / 150))


def capped(s: np.ndarray) -> np.ndarray:
    return 0.01 + 0.015 * (1 - np.exp(-s / 400))


#: (title, coverage at each probe, the most its TRF allows)
CASES = [
    ("grows past the bound: never alerted", grows(STEPS), 1.0),
    ("TRF too small (3% at most): alerted at once", capped(STEPS), 0.03),
    ("stalls: alerted after the warm-up", 0.012 + 0.006 * (1 - np.exp(-STEPS / 200)), 1.0),
    # its trend always promises the bound, but training ends at 4.9%
    ("grows, but too slowly: alerted at the end", 0.012 + 0.00083 * np.sqrt(STEPS), 1.0),
]


def main() -> None:
    policy = AlertPolicy()
    fig = Figure(figsize=(11, 6.4), dpi=110, layout="constrained")
    axes = fig.subplots(2, 2, sharex=True)
    for ax, (title, cov, best) in zip(axes.flat, CASES):
        points = [(int(s), float(c)) for s, c in zip(STEPS, cov)]
        fired = None
        for i in range(len(points)):
            last = i == len(points) - 1
            reason = policy.decide(points[: i + 1], THRESHOLD, best=best, final=last)
            if reason is not None:
                fired = (i, reason)
                break
        ax.axvspan(0, policy.warmup_steps, color="0.93", lw=0)
        ax.text(20, 0.04, f"warm-up: {policy.warmup_steps} steps", fontsize=8, color="0.4",
                transform=ax.get_xaxis_transform())  # fmt: skip
        ax.axhline(THRESHOLD, color="tab:red", lw=1, ls="--", label="min_coverage 5%")
        if best < 1:
            ax.axhline(best, color="0.3", lw=1, ls=":", label="what its TRF allows")
        ax.plot(STEPS, cov, "o-", ms=3.5, color="tab:blue", label="coverage at each probe")
        if fired is not None:
            i, reason = fired
            step, value = points[i]
            if reason == "stalled":  # the trend over the last `patience` probes, carried on
                run = points[i - policy.patience + 1 : i + 1]
                ahead = projected(run, step - points[0][0])
                ax.plot([step, 2 * step], [value, ahead], color="tab:orange", ls="--", lw=1.2,
                        label="trend: as many steps again")  # fmt: skip
            ax.plot([step], [value], marker="*", ms=16, color="tab:red", ls="none",
                    label=f"alert at step {step} ({reason!r})")  # fmt: skip
        ax.set_title(title, fontsize=10)
        ax.set_yscale("log")
        ax.set_ylim(0.005, 0.6)
        ax.set_xlim(-50, END + 50)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(0.0, 0.93))
    for ax in axes[1]:
        ax.set_xlabel("training step")
    for ax in axes[:, 0]:
        ax.set_ylabel("coverage (log scale)")
    fig.suptitle(
        f"The coverage alert (defaults: patience={policy.patience} probes, "
        f"alert_warmup={policy.warmup_steps} steps; a probe every {EVERY} steps)",
        fontsize=11,
    )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT)
    print(f"wrote {OUT} ({OUT.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
