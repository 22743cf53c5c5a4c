"""ERFMonitor with Lightning's ``MLFlowLogger`` on a local sqlite tracking store.

Run:  python examples/mlflow_example.py  [--out runs/mlflow]  then
      mlflow ui --backend-store-uri sqlite:///runs/mlflow/mlflow.db
(MLflow 3 refuses a plain directory store unless MLFLOW_ALLOW_FILE_STORE=true; a
``sqlite:///`` URI is the local store it accepts.)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning.pytorch as pl
import mlflow
import torch
from lightning.pytorch.loggers import MLFlowLogger
from lightning_example import LitCNN
from torch.utils.data import DataLoader, TensorDataset

import erf_monitor as em


def main(out: str = "runs/mlflow", steps: int = 30) -> em.ERFMonitor:
    Path(out).mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{Path(out).resolve() / 'mlflow.db'}"
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(256, 3, 32, 32), torch.randint(0, 4, (256,)))
    logger = MLFlowLogger(
        experiment_name="erf-monitor", tracking_uri=uri,
        artifact_location=str(Path(out).resolve() / "artifacts"),
    )  # fmt: skip
    monitor = em.ERFMonitor(layers=["backbone.2", "backbone.7"], every_n_steps=10, num_samples=8)
    trainer = pl.Trainer(
        # log_every_n_steps: Lightning's default (50) would log no loss in a run this short
        max_steps=steps, logger=logger, callbacks=[monitor], log_every_n_steps=1,
        enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=False, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(LitCNN(), DataLoader(data, batch_size=32, shuffle=True))
    # Read the run back with MLflow's own client.
    client = mlflow.MlflowClient(tracking_uri=uri)
    loss = client.get_metric_history(logger.run_id, "train/loss")
    print(f"train/loss: {len(loss)} values, {loss[0].value:.3f} -> {loss[-1].value:.3f}")
    for layer in monitor.layers or []:
        history = client.get_metric_history(logger.run_id, f"erf/{layer}/coverage")
        print(f"{layer}: coverage " + ", ".join(f"{m.step}: {m.value:.1%}" for m in history))
    print("artifacts:", ", ".join(a.path for a in client.list_artifacts(logger.run_id)))
    return monitor


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="runs/mlflow")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    main(args.out, args.steps)
