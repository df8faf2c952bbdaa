# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""Training through anomalib's Engine on tiny generated data: stages, synthetic anomalies, grayscale images."""

import shutil
from pathlib import Path

import pytest
import torch
from anomalib.data import Folder, MVTecAD
from anomalib.engine import Engine
from PIL import Image

from anomalib_resad import ResAD
from anomalib_resad.data import MultiClassDataModule
from anomalib_resad.loss import ResADLoss
from tests.helpers.models import tiny_resad as helper_tiny_resad


def tiny_resad(**overrides: object) -> ResAD:
    return helper_tiny_resad(**{"train_k": 2, "k": 2, "evaluator": False, **overrides})


@pytest.fixture
def anomalous_positions_seen(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Records, for every flow-loss call in training, the share of anomalous positions."""
    seen: list[float] = []
    original = ResADLoss.flow_loss

    def spy(self: ResADLoss, level: int, log_normal: torch.Tensor, log_abnormal: torch.Tensor, mask: torch.Tensor):
        seen.append(float(mask.mean()))
        return original(self, level, log_normal, log_abnormal, mask)

    monkeypatch.setattr(ResADLoss, "flow_loss", spy)
    return seen


def fit(model: ResAD, datamodule: object, tmp_path: Path, epochs: int) -> Engine:
    engine = Engine(max_epochs=epochs, accelerator="cpu", default_root_dir=tmp_path, logger=False,
                    enable_progress_bar=False)  # fmt: skip
    engine.fit(model, datamodule=datamodule)
    return engine


def test_first_stage_uses_normal_images_only_then_anomalies(
    texture_root: Path, tmp_path: Path, anomalous_positions_seen: list[float]
) -> None:
    datamodule = MultiClassDataModule(
        sources=[{"datamodule": "MVTecAD", "root": str(texture_root), "categories": ["grass", "gravel"]}],
        train_batch_size=8,
        num_workers=0,
    )
    fit(tiny_resad(first_stage_epochs=1), datamodule, tmp_path, epochs=2)
    batches_per_epoch = len(anomalous_positions_seen) // 2
    first, second = anomalous_positions_seen[:batches_per_epoch], anomalous_positions_seen[batches_per_epoch:]
    assert max(first) == 0.0  # stage 1: anomalous images are left out
    assert max(second) > 0.0  # stage 2: the source classes' real anomalies with their masks


def test_single_category_trains_normal_only_unless_synthetic_anomalies(
    texture_root: Path, tmp_path: Path, anomalous_positions_seen: list[float]
) -> None:
    datamodule = MVTecAD(root=texture_root, category="grass", train_batch_size=8, eval_batch_size=8, num_workers=0)
    fit(tiny_resad(first_stage_epochs=0), datamodule, tmp_path / "plain", epochs=1)
    assert anomalous_positions_seen and max(anomalous_positions_seen) == 0.0
    anomalous_positions_seen.clear()
    torch.manual_seed(0)
    fit(tiny_resad(first_stage_epochs=0, synthetic_anomalies=True), datamodule, tmp_path / "synthetic", epochs=1)
    assert max(anomalous_positions_seen) > 0.0


def test_grayscale_training_images_are_converted(texture_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "gray"
    shutil.copytree(texture_root / "gravel", root)
    for path in root.rglob("*.png"):
        if "ground_truth" not in path.parts:
            Image.open(path).convert("L").save(path)
    datamodule = Folder(
        name="gray_gravel", root=root, normal_dir="train/good", abnormal_dir="test/foreign",
        normal_test_dir="test/good", mask_dir="ground_truth/foreign", train_batch_size=4, eval_batch_size=4,
        num_workers=0,
    )  # fmt: skip
    model = tiny_resad(first_stage_epochs=0)
    engine = fit(model, datamodule, tmp_path / "run", epochs=1)
    results = engine.test(model, datamodule=datamodule)
    assert model.reference_selection is not None and model.reference_selection.class_name == "gray_gravel"
    assert results and "image_AUROC" not in results[0]  # evaluator disabled: the run itself is the check
