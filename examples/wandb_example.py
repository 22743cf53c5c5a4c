"""ERFMonitor with Weights & Biases (offline unless you are logged in).

Run:  WANDB_MODE=offline python examples/wandb_example.py
Heatmaps appear under ``erf/<layer>/heatmap``, scalars under ``erf/<layer>/...`` plotted
against ``erf/step``; coverage alerts also go to ``wandb.alert``.
"""

from __future__ import annotations

import argparse
import os

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning_example import LitCNN
from torch.utils.data import DataLoader, TensorDataset

import erf_monitor as em


def main(save_dir: str = "runs/wandb", steps: int = 30) -> em.ERFMonitor:
    os.environ.setdefault("WANDB_MODE", "offline")
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(256, 3, 32, 32), torch.randint(0, 4, (256,)))
    monitor = em.ERFMonitor(layers="auto", every_n_steps=10, num_samples=8)
    logger = WandbLogger(project="erf-monitor-example", save_dir=save_dir)
    trainer = pl.Trainer(
        max_steps=steps, logger=logger, callbacks=[monitor], enable_checkpointing=False,
        enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(LitCNN(), DataLoader(data, batch_size=32, shuffle=True))
    logger.experiment.finish()
    print("watched layers:", monitor.layers)
    return monitor


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--save-dir", default="runs/wandb")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    main(args.save_dir, args.steps)
