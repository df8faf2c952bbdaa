# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""A checkpoint is enough on the anomalib command line: its settings replace the ones left at their defaults."""

import sys
from pathlib import Path

import pytest
import torch

from anomalib_resad.checkpoint_settings import adopt_checkpoint_settings, checkpoint_settings_from_command_line


def build(backbone: str = "wide_resnet50_2", layers: tuple = ("layer1",), k: int = 4, lr: float = 1.0) -> None:
    """Stands for ResAD.__init__: only its signature (the defaults) matters here."""


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "model.ckpt"
    hparams = {"backbone": "tf_efficientnet_lite0", "layers": ["blocks.1", "blocks.2"], "k": 2, "lr": 5.0}
    torch.save({"hyper_parameters": hparams, "state_dict": {}}, path)
    return path


def test_only_the_anomalib_command_with_a_checkpoint_is_read(checkpoint: Path) -> None:
    assert checkpoint_settings_from_command_line(["/venv/bin/python", "--ckpt_path", str(checkpoint)]) == {}
    assert checkpoint_settings_from_command_line(["/venv/bin/anomalib", "predict"]) == {}
    found = checkpoint_settings_from_command_line(["/venv/bin/anomalib", "predict", f"--ckpt_path={checkpoint}"])
    assert found == {"backbone": "tf_efficientnet_lite0", "layers": ["blocks.1", "blocks.2"], "k": 2}  # not lr


def test_defaults_take_the_checkpoint_values_explicit_ones_stay(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "argv", ["anomalib", "predict", "--ckpt_path", str(checkpoint)])
    adopted = adopt_checkpoint_settings(
        {"backbone": "wide_resnet50_2", "layers": ("layer1",), "k": 8, "lr": 1.0}, build
    )
    assert adopted == {"backbone": "tf_efficientnet_lite0", "layers": ["blocks.1", "blocks.2"]}  # k=8 was given
    # an explicitly different structure is not mixed with the checkpoint's: the checkpoint will be refused instead
    adopted = adopt_checkpoint_settings({"backbone": "resnet18", "layers": ("layer1",), "k": 4, "lr": 1.0}, build)
    assert adopted == {"k": 2}
