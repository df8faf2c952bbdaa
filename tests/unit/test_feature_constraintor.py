# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""Feature Constraintor: per-level Conv3x3 + BatchNorm + ReLU."""

import torch

from anomalib_resad.feature_constraintor import FeatureConstraintor


def test_one_conv_bn_relu_per_level_with_shapes_kept_and_non_negative_outputs() -> None:
    constraintor = FeatureConstraintor([4, 8])
    inputs = [torch.randn(2, 4, 5, 5), torch.randn(2, 8, 3, 3)]
    outputs = constraintor(inputs)
    assert [tuple(output.shape) for output in outputs] == [(2, 4, 5, 5), (2, 8, 3, 3)]
    assert all(float(output.min()) >= 0 for output in outputs)
    conv = constraintor.levels[0].conv
    assert conv.kernel_size == (3, 3)
    assert conv.padding == (1, 1)


def test_levels_share_nothing() -> None:
    torch.manual_seed(0)
    constraintor = FeatureConstraintor([4, 4]).eval()
    first = [torch.randn(1, 4, 3, 3), torch.randn(1, 4, 3, 3)]
    changed = [torch.randn(1, 4, 3, 3), first[1]]
    assert torch.equal(constraintor(first)[1], constraintor(changed)[1])
    assert not torch.equal(constraintor.levels[0].conv.weight, constraintor.levels[1].conv.weight)


def test_the_occ_gradient_reaches_every_level() -> None:
    constraintor = FeatureConstraintor([4, 6])
    outputs = constraintor([torch.randn(2, 4, 3, 3), torch.randn(2, 6, 2, 2)])
    sum(output.norm() for output in outputs).backward()
    assert all(level.conv.weight.grad is not None and level.conv.weight.grad.abs().sum() > 0
               for level in constraintor.levels)  # fmt: skip
