# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""Cost measurement on modules whose multiply-adds, latency and memory are known."""

import math
import sys
import time

import pytest
import torch
from torch import nn

from anomalib_resad.experiments.cost import (
    COST_COLUMNS,
    OPENVINO_COST_COLUMNS,
    count_macs,
    measure_cost,
    measure_openvino_cost,
    peak_memory_mib,
)
from tests.helpers.models import tiny_resad


class Sleeper(nn.Module):
    """A forward pass that takes ``seconds`` whatever the batch size, and one 4 x 5 linear layer."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds
        self.linear = nn.Linear(5, 4)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        return self.linear(images.mean(dim=(1, 2)))  # (B, 3, H, 5) -> (B, 5) -> (B, 4)


class Allocator(nn.Module):
    """Holds 4 MiB of float32 per image while it runs."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        work = torch.ones(len(images), 1024, 1024)
        return (work * 2).sum() + images.sum()


def test_linear_multiply_adds_are_exact() -> None:
    layer = nn.Linear(4, 3)
    assert count_macs(layer, torch.zeros(1, 4)) == 4 * 3  # the bias add is not a multiply-add
    assert count_macs(layer, torch.zeros(5, 4)) == 5 * 4 * 3


def test_convolution_multiply_adds_are_exact() -> None:
    conv = nn.Conv2d(3, 8, kernel_size=3, bias=False)
    assert count_macs(conv, torch.zeros(1, 3, 10, 12)) == 8 * 3 * 9 * (8 * 10)


def test_measure_cost_counts_one_image_and_times_each_batch_size() -> None:
    module = Sleeper(0.02).train()
    cost = measure_cost(module, (2, 5), repeats=3, warmup=1)
    assert cost.macs_per_image == 5 * 4  # per image, although the throughput batch holds 16
    assert 20 <= cost.ms_per_image_b1 < 200
    # one pass of 16 images takes as long as one of 1 image: about 16 / 0.02 s = 800 images/s
    assert 16 / 0.2 < cost.images_per_s_b16 <= 16 / 0.02
    assert module.training, "the module's mode is restored"
    assert set(cost.as_row()) == set(COST_COLUMNS)
    assert cost.as_row()["GMACs_per_image"] == pytest.approx(20e-9)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS is read from /proc on Linux")
def test_peak_memory_grows_with_the_batch() -> None:
    cost = measure_cost(Allocator(), (4, 4), repeats=1, warmup=0)
    assert 64 * 0.9 <= cost.peak_mem_MiB_b16 < 64 * 3  # 16 images x 4 MiB, plus the product's temporary
    small = peak_memory_mib(lambda: Allocator()(torch.zeros(1, 3, 4, 4)), torch.device("cpu"))
    assert not math.isnan(small)
    assert small < cost.peak_mem_MiB_b16 / 2


def test_openvino_cost_exports_the_model_with_its_references_and_times_it() -> None:
    model = tiny_resad(evaluator=False).eval()
    model.model.set_references(model.model.make_reference_bank(torch.rand(2, 3, 64, 64)))
    cost = measure_openvino_cost(model, (64, 64), repeats=2, warmup=1)
    assert set(cost) == set(OPENVINO_COST_COLUMNS)
    assert 0 < cost["openvino_ms_per_image_b1"] < 10_000
    assert cost["openvino_images_per_s_b16"] > 0
    assert not model.training and next(model.parameters()).device.type == "cpu"


def test_openvino_cost_of_a_model_that_cannot_be_exported_is_nan_and_says_why(caplog: pytest.LogCaptureFixture) -> None:
    cost = measure_openvino_cost(Sleeper(0.0), (2, 5))  # a plain nn.Module: no anomalib export
    assert all(math.isnan(value) for value in cost.values())
    assert "OpenVINO cost of Sleeper not measured: export failed" in caplog.text


def test_openvino_cost_of_an_export_that_cannot_run_a_batch_is_nan_per_column(caplog: pytest.LogCaptureFixture) -> None:
    """anomalib 2.7's PatchCore export fixes the batch it was traced with and cannot be reshaped: NaN, logged, no
    crash of the grid (this happened in `resad evaluate` before the check)."""
    from anomalib.models import Patchcore

    patchcore = Patchcore(backbone="resnet18", layers=["layer2", "layer3"], pre_trained=False, post_processor=False,
                          evaluator=False, visualizer=False)  # fmt: skip
    patchcore.model.memory_bank = torch.randn(50, 384)
    cost = measure_openvino_cost(patchcore.eval(), (64, 64), repeats=1, warmup=0)
    assert all(math.isnan(value) for value in cost.values())
    assert "OpenVINO cost of Patchcore at batch 1 not measured: its exported graph does not run it" in caplog.text
    assert "at batch 16 not measured" in caplog.text
