# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""The tiny ResAD the unit tests train and score: random ResNet-18 levels, two coupling blocks, 64 px."""

from anomalib_resad import ResAD

TINY_SETTINGS = {
    "backbone": "resnet18",
    "layers": ["layer1", "layer2"],
    "pre_trained": False,
    "coupling_layers": 2,
    "pos_embed_dim": 16,
    "image_size": 64,
    "visualizer": False,
}


def tiny_resad(**overrides: object) -> ResAD:
    """A tiny ResAD; ``overrides`` replace or add constructor arguments."""
    return ResAD(**{**TINY_SETTINGS, **overrides})
