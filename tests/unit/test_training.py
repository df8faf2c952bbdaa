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
from anomalib_resad.calibration import Scoring
from anomalib_resad.data import MultiClassDataModule
from anomalib_resad.loss import ResADLoss
from anomalib_resad.references import ReferenceSelection, load_images
from tests.helpers.images import write_image
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


def fresh_scoring(model: ResAD) -> Scoring:
    """The stored class's record measured now, with the model's current weights, from the same reference files."""
    selection = model.references.stored
    size = (64, 64)
    features = model.references.features(selection.paths, bank=True)
    images = load_images(selection.paths, model.pre_processor.transform)
    return model.model.calibrate(features, size, images, model.model.bank_views(size))


def assert_same_scoring(held: dict[str, torch.Tensor], fresh: Scoring) -> None:
    for name, value in fresh.tensors().items():
        torch.testing.assert_close(held[name], value, rtol=1e-6, atol=1e-8, msg=name)


def test_the_stored_scoring_is_measured_with_the_final_weights(texture_root: Path, tmp_path: Path) -> None:
    """The flows' constants and maxima of the stored class fit the weights that score with them - after training, in
    the model and in its checkpoint - not the weights of the first epoch's validation (where they were once kept)."""
    datamodule = MVTecAD(root=texture_root, category="grass", train_batch_size=8, eval_batch_size=8, num_workers=0)
    model = tiny_resad(first_stage_epochs=0, lr=1e-2)  # a large step: each epoch moves the flows' maxima visibly
    seen: list[float] = []
    original = ResAD.on_validation_epoch_start

    def spy(self: ResAD) -> None:
        seen.append(float(self.model.anomaly_map_generator.stored.get().map_max))
        original(self)

    ResAD.on_validation_epoch_start = spy
    try:
        engine = fit(model, datamodule, tmp_path, epochs=3)
    finally:
        ResAD.on_validation_epoch_start = original
    assert len(seen) == 3 and len(set(seen)) == 3, seen  # every validation scored with that epoch's own record
    stored = model.model.anomaly_map_generator.stored.get()
    assert_same_scoring(stored.tensors(), fresh_scoring(model))
    state = torch.load(engine.trainer.checkpoint_callback.best_model_path, weights_only=True)["state_dict"]
    prefix = "model.anomaly_map_generator.stored."
    assert_same_scoring({name[len(prefix) :]: value for name, value in state.items() if name.startswith(prefix)},
                        stored)  # fmt: skip


def test_a_checkpoint_saved_without_validation_holds_the_final_scoring(texture_root: Path, tmp_path: Path) -> None:
    """Fine-tuning a model whose references were set, with no validation data: the saved record is measured again."""
    datamodule = MVTecAD(root=texture_root, category="grass", train_batch_size=8, eval_batch_size=8, num_workers=0)
    model = tiny_resad(first_stage_epochs=0, lr=1e-2)
    datamodule.setup()
    paths = sorted(datamodule.train_data.samples.image_path.astype(str))[:2]
    model.set_references(ReferenceSelection("grass", paths))
    before = float(model.model.anomaly_map_generator.stored.get().map_max)
    engine = Engine(max_epochs=2, accelerator="cpu", default_root_dir=tmp_path, logger=False,
                    enable_progress_bar=False, limit_val_batches=0)  # fmt: skip
    engine.fit(model, datamodule=datamodule)
    state = torch.load(engine.trainer.checkpoint_callback.best_model_path, weights_only=True)["state_dict"]
    prefix = "model.anomaly_map_generator.stored."
    saved = {name[len(prefix) :]: value for name, value in state.items() if name.startswith(prefix)}
    assert float(saved["map_max"]) != before
    assert_same_scoring(saved, fresh_scoring(model))
    assert model.references.pinned  # calibrated again, still the references the user set


def test_an_export_after_a_training_step_bakes_in_the_final_scoring(tmp_path: Path) -> None:
    """Weights changed since the last calibration (a step after the last evaluation or save, e.g. exported in
    memory): the export itself measures the stored class again before baking it in."""
    model = tiny_resad()
    paths = [str(write_image(tmp_path / f"ref{index}.png", size=(64, 64))) for index in range(2)]
    model.set_references(ReferenceSelection("widget", paths))
    before = float(model.model.anomaly_map_generator.stored.get().map_max)
    with torch.no_grad():  # what an optimizer step does to the flows
        for parameter in model.model.residual_flow.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    model.on_train_batch_end()
    assert model.references.needs_recalibration()
    model.to_torch(tmp_path / "export")
    assert not model.references.needs_recalibration()
    stored = model.model.anomaly_map_generator.stored.get()
    assert float(stored.map_max) != before
    assert_same_scoring(stored.tensors(), fresh_scoring(model))
