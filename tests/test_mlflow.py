"""ERFMonitor with Lightning's ``MLFlowLogger`` against a local sqlite tracking store.

Everything is read back with mlflow's own client: metric histories, heatmap images, raw
maps and alert texts (mlflow 3 refuses the plain file store without MLFLOW_ALLOW_FILE_STORE;
a ``sqlite:///`` tracking URI is the local store it accepts).
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import erf_monitor as em

mlflow = pytest.importorskip("mlflow")
pytest.importorskip("lightning")
from lightning.pytorch.loggers import MLFlowLogger  # noqa: E402

from test_callback import LAYERS, make_module, make_trainer  # noqa: E402


def artifacts(client: Any, run_id: str) -> list[str]:
    out: list[str] = []
    todo: list[str | None] = [None]
    while todo:
        for info in client.list_artifacts(run_id, todo.pop()):
            (todo if info.is_dir else out).append(info.path)  # type: ignore[arg-type]
    return sorted(out)


@pytest.mark.slow
def test_lightning_mlflow_logger_metrics_images_maps_alerts(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = MLFlowLogger(
        experiment_name="erf", tracking_uri=uri, artifact_location=str(tmp_path / "artifacts")
    )
    cb = em.ERFMonitor(layers=LAYERS, every_n_steps=2, num_samples=4,
                       min_coverage={LAYERS[0]: 0.99})  # fmt: skip
    trainer = make_trainer("lightning.pytorch", tmp_path, [cb], max_steps=4, logger=logger)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the coverage alert (and mlflow's own notes)
        trainer.fit(make_module())
    client = mlflow.MlflowClient(tracking_uri=uri)
    run_id = logger.run_id
    for layer in LAYERS:
        history = client.get_metric_history(run_id, f"erf/{layer}/coverage")
        assert [m.step for m in history] == [0, 2, 4]
        assert [m.value for m in history] == pytest.approx(
            [cb.history[layer][s]["coverage"] for s in (0, 2, 4)]
        )
    assert [m.step for m in client.get_metric_history(run_id, "erf/probe_time_s")] == [0, 2, 4]
    paths = artifacts(client, run_id)
    pngs = [p for p in paths if p.endswith(".png")]
    npzs = [p for p in paths if p.endswith(".npz")]
    texts = [p for p in paths if p.startswith("erf_text/")]
    assert len(pngs) >= 3 * len(LAYERS) and len(npzs) == 3
    assert any(LAYERS[0] in p for p in texts)  # the coverage alert, as text
    # The raw maps read back are the maps the monitor measured.
    local = client.download_artifacts(run_id, npzs[-1], str(tmp_path / "dl"))
    with np.load(local, allow_pickle=False) as maps:
        assert cb.latest is not None
        key = next(k for k in maps.files if LAYERS[-1] in k)
        np.testing.assert_allclose(maps[key], cb.latest[LAYERS[-1]].heatmap.numpy())
    image = client.download_artifacts(run_id, pngs[0], str(tmp_path / "img"))
    from PIL import Image

    assert np.asarray(Image.open(io.BytesIO(Path(image).read_bytes()))).ndim == 3
