# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""The same model and references give the same scores as recorded, in eager PyTorch and in OpenVINO.

A restructuring of the code must not move a score: this test scores fixed images with a fixed model (seeded random
flows on the offline EfficientNet-Lite0, the product's default scoring) and fixed references, and compares to the
values recorded in ``tests/data/recorded_scores.json``. A change that is *meant* to change scores records them again
in its own commit (``python -m tests.e2e.test_scores_unchanged``), with the measurement that justifies it.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.data.utils.image import read_image
from lightning.pytorch import Trainer, seed_everything

from anomalib_resad import ResAD
from anomalib_resad.data.textures import generate_texture_dataset
from anomalib_resad.deploy import ReferenceConditionedInferencer, export_deployment, make_references
from anomalib_resad.offline_weights import LITE0_BACKBONE, LITE0_LAYERS, efficientnet_lite0_weights
from anomalib_resad.references import select_folder_references

RECORD = Path(__file__).resolve().parents[1] / "data" / "recorded_scores.json"
# Another CPU (its SIMD kernels sum in another order) moves a score by up to ~2e-5; any real change to the
# scoring moves scores by far more than 1e-4.
TOLERANCE = 1e-4
CLASSES = ("brick", "gravel")  # one class whose references choose precise matching, one averaged (see the record)


def fixed_model(weights: Path) -> ResAD:
    """The product's default scoring on Lite0 with seeded, perturbed flows (no training: exactly reproducible).

    Every generator is seeded: the flows' soft permutations come from numpy's global one (scipy), not torch's.
    """
    seed_everything(0, verbose=False)
    model = ResAD(
        backbone=LITE0_BACKBONE,
        layers=list(LITE0_LAYERS),
        pre_trained=str(weights),
        image_size=96,
        coupling_layers=2,
        pos_embed_dim=16,
        k=3,
        visualizer=False,
    )
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in [*model.model.residual_flow.parameters(), *model.model.feature_constraintor.parameters()]:
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def summary(scores: np.ndarray, maps: np.ndarray) -> dict[str, list[float]]:
    """Scores, and each map's mean, maximum and a few pixels (enough to catch any moved value)."""
    maps = maps.reshape(len(maps), -1)
    pixels = maps[:, :: max(1, maps.shape[1] // 7)]
    return {
        "pred_score": scores.reshape(-1).tolist(),
        "map_mean": maps.mean(axis=1).tolist(),
        "map_max": maps.max(axis=1).tolist(),
        "map_pixels": pixels.reshape(-1).tolist(),
    }


def measure(work: Path) -> dict[str, dict[str, dict[str, list[float]]]]:
    """Eager and OpenVINO summaries per class, for the fixed model, references and test images."""
    textures = generate_texture_dataset(work / "textures", classes=list(CLASSES), train=6, test=2, image_size=96)
    model = fixed_model(efficientnet_lite0_weights(work / "lite0.pth"))
    checkpoint = work / "model.ckpt"
    trainer = Trainer(logger=False, enable_checkpointing=False, accelerator="cpu", max_epochs=0)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(checkpoint)
    deployment = export_deployment(checkpoint, work / "deployment")
    inferencer = ReferenceConditionedInferencer(deployment)
    measured: dict[str, dict[str, dict[str, list[float]]]] = {"eager": {}, "openvino": {}}
    for name in CLASSES:
        folder = textures / name / "train" / "good"
        images = sorted((textures / name / "test").rglob("*.png"))
        model.set_references(select_folder_references(folder, 3, name))
        batch = torch.stack([read_image(path, as_tensor=True) for path in images])
        with torch.no_grad():
            output = model(batch)  # pre- and post-processing included, as `anomalib predict` scores
        measured["eager"][name] = summary(output.pred_score.numpy(), output.anomaly_map.numpy())
        inferencer.add_class(name, make_references(deployment, folder, work / f"{name}.npz", k=3, class_name=name))
        predictions = [inferencer.predict(path, class_name=name) for path in images]
        measured["openvino"][name] = summary(
            np.concatenate([np.asarray(p.pred_score).reshape(-1) for p in predictions]),
            np.concatenate([np.asarray(p.anomaly_map).reshape(1, -1) for p in predictions]),
        )
    return measured


@pytest.mark.slow
def test_scores_are_the_recorded_ones(tmp_path: Path) -> None:
    recorded = json.loads(RECORD.read_text())
    measured = measure(tmp_path)
    for runtime in ("eager", "openvino"):
        for name in CLASSES:
            for field, values in recorded[runtime][name].items():
                np.testing.assert_allclose(
                    measured[runtime][name][field], values, rtol=TOLERANCE, atol=TOLERANCE, err_msg=f"{runtime} {name}"
                )


if __name__ == "__main__":  # record the scores again (a change meant to change them, in its own commit)
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        values = measure(Path(folder))
    RECORD.parent.mkdir(parents=True, exist_ok=True)
    RECORD.write_text(json.dumps(values, indent=1) + "\n")
    sys.stdout.write(f"recorded {RECORD}\n")
