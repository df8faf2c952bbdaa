# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""Backbone: level validation, local weights files, lazy loading, normalisation."""

from pathlib import Path

import pytest
import timm
import torch

from anomalib_resad import ResADConfigurationError
from anomalib_resad.feature_extractor import ResADFeatureExtractor, backbone_normalization
from anomalib_resad.offline_weights import LITE0_BACKBONE, LITE0_LAYERS


def test_unknown_level_lists_the_available_ones() -> None:
    with pytest.raises(ResADConfigurationError, match=r"no feature level\(s\) \['layer9'\].*'layer1', 'layer2'"):
        ResADFeatureExtractor("resnet18", ["layer1", "layer9"], pre_trained=False)


def test_unknown_backbone_is_named() -> None:
    with pytest.raises(ResADConfigurationError, match="Unknown timm backbone 'resnet_does_not_exist'"):
        ResADFeatureExtractor("resnet_does_not_exist", ["layer1"], pre_trained=False)


def test_missing_weights_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ResADConfigurationError, match="does not exist"):
        ResADFeatureExtractor("resnet18", ["layer1"], pre_trained=str(tmp_path / "missing.pth"))


def test_levels_come_back_shallow_to_deep_with_their_shapes() -> None:
    extractor = ResADFeatureExtractor("resnet18", ["layer1", "layer3"], pre_trained=False)
    features = extractor(torch.rand(2, 3, 64, 64))
    assert [tuple(feature.shape) for feature in features] == [(2, 64, 16, 16), (2, 256, 4, 4)]
    assert extractor.out_dims == [64, 256]
    assert not any(parameter.requires_grad for parameter in extractor.parameters())


def test_levels_out_of_order_are_refused() -> None:
    with pytest.raises(ResADConfigurationError, match=r"shallow to deep: \['layer1', 'layer2'\]"):
        ResADFeatureExtractor("resnet18", ["layer2", "layer1"], pre_trained=False)


def test_local_weights_file_loads_lazily_and_exactly(lite0_weights: Path) -> None:
    extractor = ResADFeatureExtractor(LITE0_BACKBONE, LITE0_LAYERS, pre_trained=str(lite0_weights))
    assert extractor._pending_weights is not None  # loaded lazily, on the first forward pass
    images = torch.rand(1, 3, 64, 64)
    features = extractor(images)
    assert extractor._pending_weights is None
    reference = timm.create_model(
        LITE0_BACKBONE,
        features_only=True,
        out_indices=(1, 2, 3),
        pretrained=True,
        pretrained_cfg_overlay={"file": str(lite0_weights)},
    ).eval()
    with torch.no_grad():
        for ours, expected in zip(features, reference(images), strict=True):
            torch.testing.assert_close(ours, expected)


def test_weights_of_another_architecture_are_refused_clearly(tmp_path: Path) -> None:
    weights = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18").state_dict(), weights)
    extractor = ResADFeatureExtractor(LITE0_BACKBONE, LITE0_LAYERS, pre_trained=str(weights))
    with pytest.raises(ResADConfigurationError, match="does not fit backbone 'tf_efficientnet_lite0'"):
        extractor(torch.rand(1, 3, 32, 32))


def test_weights_restored_from_a_state_dict_are_not_overwritten(lite0_weights: Path) -> None:
    source = ResADFeatureExtractor(LITE0_BACKBONE, LITE0_LAYERS, pre_trained=False)
    restored = ResADFeatureExtractor(LITE0_BACKBONE, LITE0_LAYERS, pre_trained=str(lite0_weights))
    restored.load_state_dict(source.state_dict())
    assert restored._pending_weights is None
    images = torch.rand(1, 3, 32, 32)
    for ours, expected in zip(restored(images), source(images), strict=True):
        torch.testing.assert_close(ours, expected)


def test_a_state_dict_saved_before_the_first_forward_holds_the_pretrained_weights(lite0_weights: Path) -> None:
    """A checkpoint saved before any image went through must not keep the random placeholder weights."""
    saved = ResADFeatureExtractor(LITE0_BACKBONE, LITE0_LAYERS, pre_trained=str(lite0_weights)).state_dict()
    used = ResADFeatureExtractor(LITE0_BACKBONE, LITE0_LAYERS, pre_trained=str(lite0_weights))
    restored = ResADFeatureExtractor(LITE0_BACKBONE, LITE0_LAYERS, pre_trained=False)
    restored.load_state_dict(saved)
    images = torch.rand(1, 3, 32, 32)
    for ours, expected in zip(restored(images), used(images), strict=True):
        torch.testing.assert_close(ours, expected)


def test_normalisation_follows_the_backbone() -> None:
    assert backbone_normalization("tf_efficientnet_lite0") == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert backbone_normalization("wide_resnet50_2")[0] == pytest.approx((0.485, 0.456, 0.406))
