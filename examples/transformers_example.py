"""``ERFTrainerCallback`` in a Hugging Face ``Trainer``: one line in ``callbacks=[...]``.

A small ConvNeXt built from a config (no download) trains on synthetic images; the callback
probes its stages every 10 optimizer steps and logs to a TensorBoard run of its own beside
the Trainer's (``runs/<date>_<host>/erf``, next to the loss's run).

Run:  python examples/transformers_example.py  [--out runs/hf]  then
      tensorboard --logdir runs/hf/runs
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.data import Dataset
from transformers import ConvNextConfig, ConvNextForImageClassification, Trainer, TrainingArguments

import erf_monitor as em


class Blobs(Dataset):
    """Images whose label is the quadrant holding a bright blob; HF-style dict samples."""

    def __init__(self, n: int = 512, size: int = 64) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = 0.1 * torch.randn(n, 3, size, size, generator=g)
        self.y = torch.randint(0, 4, (n,), generator=g)
        for i, label in enumerate(self.y.tolist()):
            r, c = (label // 2) * size // 2 + size // 4, (label % 2) * size // 2 + size // 4
            self.x[i, :, r - 3 : r + 3, c - 3 : c + 3] += 1.0

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def main(out: str = "runs/hf", steps: int = 40) -> em.ERFTrainerCallback:
    torch.manual_seed(0)
    config = ConvNextConfig(
        num_channels=3, hidden_sizes=[16, 32, 64], depths=[1, 1, 1], num_stages=3,
        num_labels=4, image_size=64,
    )  # fmt: skip
    model = ConvNextForImageClassification(config)
    # One depth-wise convolution per stage (their outputs are plain tensors).
    layers = [f"convnext.encoder.stages.{i}.layers.0.dwconv" for i in range(3)]
    monitor = em.ERFTrainerCallback(layers, every_n_steps=10, num_samples=8)
    args = TrainingArguments(
        output_dir=out, max_steps=steps, per_device_train_batch_size=32, learning_rate=2e-3,
        report_to=["tensorboard"], logging_steps=5, save_strategy="no", use_cpu=True,
        disable_tqdm=True, seed=0,
    )  # fmt: skip
    Trainer(model=model, args=args, train_dataset=Blobs(), callbacks=[monitor]).train()
    for layer, by_step in monitor.history.items():
        last = by_step[max(by_step)]
        print(
            f"{layer}: ERF {last['erf_size']:.0f}px, coverage {last['coverage']:.1%} "
            f"(steps {sorted(by_step)})"
        )
    return monitor


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="runs/hf")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    main(args.out, args.steps)
