"""Screenshots of what a user sees first: TensorBoard's default Time Series view and the HTML
report of the same run, taken in a real browser (headless Debian ``chromium``).

The run: a small Sequential net whose last layer's ERF must grow (a 3x3 convolution plus a
27x27 one behind a gate that training opens at step 50: coverage 6% before, 93% after),
watched at layers 0, 2 and 4 every 10 steps with a ``SummaryWriter``. TensorBoard is served
on 127.0.0.1 only. Writes docs/img/tensorboard_time_series.png and
docs/img/report_tensorboard_run.png. Run from the repository root (about a minute):

    python docs/scripts/make_dashboard_screenshots.py
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter

import erf_monitor as em
from erf_monitor.cli.report import build_report

IMG = Path(__file__).resolve().parents[1] / "img"
SIZE = 28


class Gate(nn.Module):
    """``local(x) + gate * wide(x)``, the gate ``clamp(1000 * relu(p), 0, 1)`` shut until
    ``p`` (trained with the loss ``-p``, SGD at 0.01, from -0.495) passes 0 at step 50."""

    def __init__(self) -> None:
        super().__init__()
        self.local = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.wide = nn.Conv2d(4, 4, SIZE - 1, padding=SIZE // 2 - 1, bias=False)
        for conv in (self.local, self.wide):
            nn.init.constant_(conv.weight, 0.05)
            conv.weight.requires_grad_(False)
        self.p = nn.Parameter(torch.tensor(-0.495))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.local(x) + torch.clamp(1000 * torch.relu(self.p), 0, 1) * self.wide(x)


def train(logdir: Path) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), Gate()
    )
    gate = net[4]
    assert isinstance(gate, Gate)
    opt = torch.optim.SGD([gate.p], lr=0.01)
    x = torch.randn(4, 1, SIZE, SIZE)
    writer = SummaryWriter(str(logdir / "growing"))
    watch = em.watch(net, layers=["0", "2", "4"], every_n_steps=10, logger=writer,
                     optimizer=opt, probe_inputs=x)  # fmt: skip
    with watch:
        watch.probe()  # step 0
        for _ in range(100):
            opt.zero_grad()
            (-gate.p + 0 * net(x).sum()).backward()
            opt.step()
    writer.close()


def shoot(url: str, out: Path, size: str) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        sys.exit("needs chromium (apt-get install -y chromium)")
    subprocess.run(
        [browser, "--headless=new", "--no-sandbox", "--enable-unsafe-swiftshader",
         "--hide-scrollbars", f"--window-size={size}", "--virtual-time-budget=20000",
         f"--screenshot={out}", url],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    print(f"wrote {out} ({out.stat().st_size // 1024} KB)")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        logdir = Path(tmp) / "logs"
        train(logdir)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        tensorboard = Path(sys.executable).with_name("tensorboard")
        server = subprocess.Popen(
            [str(tensorboard), "--logdir", str(logdir), "--host", "127.0.0.1", "--port",
             str(port), "--samples_per_plugin", "images=100"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            time.sleep(8)  # TensorBoard loads the event files
            url = f"http://127.0.0.1:{port}/?darkMode=false&forceSVG=true#timeseries"  # no WebGL
            shoot(url, IMG / "tensorboard_time_series.png", "1400,1100")
        finally:
            server.terminate()
            server.wait(timeout=60)
        page, _ = build_report(logdir, Path(tmp) / "report.html")
        shoot(page.as_uri(), IMG / "report_tensorboard_run.png", "1200,1000")


if __name__ == "__main__":
    main()
