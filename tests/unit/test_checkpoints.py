# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""Checkpoints: no code in them runs, and a model built otherwise becomes the checkpoint's own on restore."""

import pickle
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer

from anomalib_resad import ResAD
from tests.helpers.models import tiny_resad


class _TouchOnLoad:
    """Unpickling this creates a file: what a crafted checkpoint would do with a shell command instead."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.path,))


def crafted_checkpoint(directory: Path) -> tuple[Path, Path]:
    """A checkpoint whose pickle creates a marker file when loaded with ``weights_only=False``."""
    marker = directory / "code_ran"
    path = directory / "crafted.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}, "payload": _TouchOnLoad(marker)}, path)
    return path, marker


def test_the_crafted_checkpoint_would_run_code_if_unpickled(tmp_path: Path) -> None:
    """The test's own check: the payload is real (so the refusals below mean something)."""
    path, marker = crafted_checkpoint(tmp_path)
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_load_from_checkpoint_refuses_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, marker = crafted_checkpoint(tmp_path)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # even where torch's default was switched off
    with pytest.raises(pickle.UnpicklingError):
        ResAD.load_from_checkpoint(path)
    assert not marker.exists()


def test_constructing_a_model_reads_no_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, marker = crafted_checkpoint(tmp_path)
    monkeypatch.setattr(sys, "argv", ["anomalib", "predict", "--model", "ResAD", "--ckpt_path", str(path)])
    model = tiny_resad()
    assert not marker.exists()
    assert model.hparams["backbone"] == "resnet18"  # nothing replaced behind the user's back


def test_restoring_into_a_model_built_otherwise_builds_the_checkpoints_network(tmp_path: Path) -> None:
    torch.manual_seed(0)
    trained = tiny_resad(layers=["layer1", "layer2"], coupling_layers=2, image_size=64)
    with torch.no_grad():  # weights of its own, so equal outputs below mean the state dict was restored
        for parameter in trained.model.residual_flow.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    path = tmp_path / "model.ckpt"
    trainer = Trainer(logger=False, enable_checkpointing=False, accelerator="cpu", max_epochs=0)
    trainer.strategy.connect(trained)
    trainer.save_checkpoint(path)

    other = tiny_resad(layers=["layer2", "layer3"], coupling_layers=3, image_size=96)  # as a CLI default would be
    checkpoint = torch.load(path, weights_only=True)
    other.on_load_checkpoint(checkpoint)
    other.load_state_dict(checkpoint["state_dict"])
    assert list(other.model.feature_extractor.layers) == ["layer1", "layer2"]
    assert other.hparams["coupling_layers"] == 2 and other.hparams["image_size"] == 64
    images = torch.rand(3, 3, 64, 64)
    trained.model.eval(), other.model.eval()
    bank = trained.model.make_reference_bank(torch.rand(2, 3, 64, 64))
    trained.model.set_references(bank)
    other.model.set_references(bank)
    with torch.no_grad():
        torch.testing.assert_close(other.model(images).pred_score, trained.model(images).pred_score)
    # the references room encodes with the restored network and the checkpoint's pre-processing (64 px)
    assert other.references.encode.model is other.model
    assert other.pre_processor.transform.transforms[0].size == [64, 64]


def test_a_checkpoint_of_an_earlier_release_is_calibrated_again_on_load(tmp_path: Path) -> None:
    """Its scoring record lacks the defect-placed boundaries and its hyper-parameters hold the margin they replaced."""
    from anomalib_resad.calibration import Scoring
    from anomalib_resad.references import ReferenceSelection
    from tests.helpers.images import write_image

    torch.manual_seed(0)
    model = tiny_resad(image_size=64)
    paths = [str(write_image(tmp_path / f"{index}.png", size=(64, 64))) for index in range(3)]
    model.set_references(ReferenceSelection("widget", paths, str(tmp_path)))
    path = tmp_path / "old.ckpt"
    trainer = Trainer(logger=False, enable_checkpointing=False, accelerator="cpu", max_epochs=0)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    prefix = "model.anomaly_map_generator.stored."
    new_fields = ["fused_max", "fused_defects", "nearest_defects", "paper_defects"]
    for name in new_fields:
        del checkpoint["state_dict"][prefix + name]
    checkpoint["hyper_parameters"]["threshold_margin"] = checkpoint["hyper_parameters"].pop("sensitivity")
    torch.save(checkpoint, path)

    restored = ResAD.load_from_checkpoint(path, weights_only=True)
    assert float(restored.model.anomaly_map_generator.stored.nearest_defects) == 0.0  # filled, not yet measured
    assert restored._refresh_stored_scoring()  # what predict, test and export do first
    expected, measured = model.model.anomaly_map_generator.stored.get(), restored.model.anomaly_map_generator.stored
    for name in Scoring.names():
        torch.testing.assert_close(getattr(measured, name), getattr(expected, name), msg=name)
    assert all(float(getattr(measured, name)) > 0 for name in new_fields)
