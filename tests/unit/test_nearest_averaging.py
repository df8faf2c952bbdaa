# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""Per-class neighbourhood averaging of the nearest-neighbour term: defects, averaged matching, calibration, scoring."""

import pytest
import torch
from torch.nn import functional as F  # noqa: N812

from anomalib_resad import ResADConfigurationError, ResADInputError, ResADModel, feature_converter
from anomalib_resad.anomaly_map import (
    AVERAGING_GAIN,
    CALIBRATION_THRESHOLDS,
    AnomalyMapGenerator,
    ScoreCalibration,
    ScoreComponents,
    leave_one_out_calibration,
)
from anomalib_resad.feature_converter import FeatureConverter, ReferenceBank
from anomalib_resad.synthetic_defects import synthetic_defects


def test_defects_are_seeded_local_and_leave_the_global_random_state_alone() -> None:
    images = torch.rand(2, 3, 40, 48)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    first = synthetic_defects(images, count=6, seed=3)
    after = torch.rand(1)
    assert torch.equal(before, after)  # the Perlin generator's global draws were forked away
    assert torch.equal(first, synthetic_defects(images, count=6, seed=3))
    assert not torch.equal(first, synthetic_defects(images, count=6, seed=4))
    changed = (first != images.unsqueeze(1)).any(dim=2).float().mean(dim=(-2, -1))  # share of pixels per defect
    assert bool((changed > 0).all())  # every copy has a defect
    assert bool((changed[:, 1::3] < 0.1).all())  # spots and scratches are small
    assert bool((changed[:, 2::3] < 0.1).all())


def test_defects_commute_with_a_per_channel_normalisation() -> None:
    """Eager PyTorch pastes them into normalised images, OpenVINO's calibrator into pixels: the same defects."""
    pixels = torch.rand(2, 3, 32, 32)
    mean, std = torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1), torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    normalised_then = synthetic_defects((pixels - mean) / std, count=6, seed=0)
    then_normalised = (synthetic_defects(pixels, count=6, seed=0) - mean.unsqueeze(1)) / std.unsqueeze(1)
    torch.testing.assert_close(normalised_then, then_normalised, atol=1e-4, rtol=1e-4)


def test_averaged_distances_equal_brute_force_pooled_euclidean_matching() -> None:
    torch.manual_seed(0)
    references = [torch.rand(3, 4, 6, 5), torch.rand(3, 8, 3, 4)]
    query = [torch.rand(2, 4, 6, 5), torch.rand(2, 8, 3, 4)]
    converter = FeatureConverter(num_levels=2)
    bank = ReferenceBank.from_features(references)
    converter.set_bank(bank)
    for given in (None, bank.levels):  # the stored bank and a bank passed in (the exported graph's inputs)
        averaged = converter.averaged_distances(query, given, levels=2)
        for level in range(2):
            pooled_query = F.avg_pool2d(query[level], 3, stride=1, padding=1)
            pooled_bank = F.avg_pool2d(references[level], 3, stride=1, padding=1)
            q = pooled_query.permute(0, 2, 3, 1).reshape(-1, pooled_query.shape[1])
            b = pooled_bank.permute(0, 2, 3, 1).reshape(-1, pooled_bank.shape[1])
            expected = torch.cdist(q, b).amin(dim=1).reshape(averaged[level].shape)
            torch.testing.assert_close(averaged[level], expected, atol=1e-5, rtol=1e-4)


def test_nearest_distance_is_blocked_without_changing_the_result(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(1)
    query, bank = torch.randn(3, 50, 6) * 10, torch.randn(40, 6) * 10
    expected = torch.cdist(query.reshape(-1, 6), bank).amin(dim=1).reshape(3, 50)
    monkeypatch.setattr(feature_converter, "_MATCH_BLOCK_ELEMENTS", 40 * 7)  # blocks of 7 rows, across images
    torch.testing.assert_close(feature_converter.nearest_distance(query, bank), expected, atol=1e-4, rtol=1e-4)
    assert float(feature_converter.nearest_distance(bank[None, :5], bank).abs().max()) < 1e-2  # own vectors: ~0


def _components(nearest: float, averaged: float) -> ScoreComponents:
    value = torch.tensor([1.0])
    return ScoreComponents(None, value, value, value, torch.zeros(1, 1), torch.tensor([nearest]), value,
                           torch.tensor([averaged]))  # fmt: skip


@pytest.mark.parametrize(
    ("defect_nearest", "defect_averaged", "expected"),
    [
        (2.0, 2.0 * (1 + AVERAGING_GAIN) + 0.05, 1.0),  # the averaged matching lifts the defects clearly more
        (2.0, 2.0 * (1 + AVERAGING_GAIN) - 0.05, 0.0),  # not by the required gain: precise
        (2.0, 1.0, 0.0),
    ],
)
def test_auto_averaging_follows_the_defects(defect_nearest: float, defect_averaged: float, expected: float) -> None:
    normal = [_components(1.0, 1.0), _components(0.5, 0.8)]  # thresholds: nearest 1.0, averaged 1.0
    calibration = leave_one_out_calibration(
        lambda index, constants: normal[index],
        2,
        1,
        nearest_averaging="auto",
        score_defects=lambda index, constants: _components(defect_nearest, defect_averaged),
    )
    assert calibration.averaging == expected
    assert calibration.averaged_nearest_threshold == pytest.approx(1.0)
    forced = leave_one_out_calibration(lambda index, constants: normal[index], 2, 1, nearest_averaging="on")
    assert forced.averaging == 1.0
    with pytest.raises(ResADConfigurationError, match="score_defects"):
        leave_one_out_calibration(lambda index, constants: normal[index], 2, 1, nearest_averaging="auto")


def test_averaging_changes_the_nearest_term_and_fuses_the_averaged_map() -> None:
    generator = AnomalyMapGenerator(num_levels=2, nearest_score=True, dissimilarity_check=False)
    log_likelihoods = [(torch.randn(2, 4, 4), torch.randn(2, 4, 4)) for _ in range(2)]
    similarities = [torch.rand(2, 4, 4) for _ in range(2)]
    averaged = [torch.rand(2, 4, 4) * 3 for _ in range(2)]  # Euclidean distances
    base = ScoreCalibration(torch.zeros(2), 1.0, 2.0, 1.0, 4.0, 1.0, averaged_nearest_threshold=8.0)
    parts = generator.components(log_likelihoods, similarities, (16, 16), torch.zeros(2), None, averaged)
    torch.testing.assert_close(parts.averaged_nearest, parts.averaged_map.flatten(start_dim=1).amax(dim=1))
    off_map, off = generator(log_likelihoods, similarities, (16, 16), base.to_tensor(), None, averaged)
    base.averaging = 1.0
    on_map, on = generator(log_likelihoods, similarities, (16, 16), base.to_tensor(), None, averaged)
    torch.testing.assert_close(off_map, (parts.anomaly_map / 1.0 + parts.nearest_map / 4.0) / 2)  # precise classes
    torch.testing.assert_close(on_map, (parts.anomaly_map / 1.0 + parts.averaged_map / 8.0) / 2)
    # the image score is the maximum of the map the class gets
    torch.testing.assert_close(off, off_map.flatten(start_dim=1).amax(dim=1))
    torch.testing.assert_close(on, on_map.flatten(start_dim=1).amax(dim=1))
    torch.testing.assert_close(parts.nearest, parts.nearest_map.flatten(start_dim=1).amax(dim=1))
    flows_only = AnomalyMapGenerator(num_levels=2, nearest_score=False, dissimilarity_check=False)
    without = flows_only(log_likelihoods, similarities, (16, 16), base.to_tensor(), None, averaged)[0]
    torch.testing.assert_close(without, parts.anomaly_map)  # the reference's scoring: the flows' map alone
    assert len(base.to_tensor()) == 2 + CALIBRATION_THRESHOLDS


def test_old_calibrations_load_with_averaging_off() -> None:
    generator = AnomalyMapGenerator(num_levels=2, nearest_score=True)
    old = torch.tensor([0.1, 0.2, 1.0, 2.0, 3.0, 4.0, 5.0])  # L + 5: before the averaged threshold
    generator.load_state_dict({"global_level_constants": torch.zeros(2), "calibration": old})
    assert generator.calibration.tolist()[:7] == pytest.approx(old.tolist())
    assert generator.calibration.tolist()[7:] == [0.0, 0.0]


@pytest.mark.parametrize("averaging", ["auto", "on"])
def test_model_calibrates_and_scores_with_averaging(averaging: str) -> None:
    torch.manual_seed(0)
    model = ResADModel("resnet18", ["layer1", "layer2"], pre_trained=False, coupling_layers=2, pos_embed_dim=16,
                       nearest_averaging=averaging).eval()  # fmt: skip
    references = torch.rand(2, 3, 64, 64)
    bank = model.make_reference_bank(references)
    calibration = ScoreCalibration.from_tensor(bank.calibration)
    assert calibration.averaged_nearest_threshold > 0
    if averaging == "on":
        assert calibration.averaging == 1.0
    model.set_references(bank)
    with torch.no_grad():
        stored = model(torch.rand(2, 3, 64, 64)).pred_score
        assert bool(torch.isfinite(stored).all())
    if averaging == "auto":  # the choice reads the reference images themselves
        with pytest.raises(ResADInputError, match="reference images"):
            model.calibrate(model.reference_features(references), (64, 64))


def test_nearest_components_equal_the_full_scoring() -> None:
    """The averaging choice scores defects without the flows: the same two values and maps as the full scoring."""
    torch.manual_seed(0)
    model = ResADModel("resnet18", ["layer1", "layer2", "layer3"], pre_trained=False, coupling_layers=2,
                       pos_embed_dim=16).eval()  # fmt: skip
    references, query = torch.rand(3, 3, 64, 64), torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        bank = [level.permute(0, 2, 3, 1).reshape(-1, level.shape[1]) for level in model.reference_features(references)]
        features = model.feature_extractor(query)
        full = model.score_components(features, bank, torch.zeros(3), (64, 64))
        deepest = features[-2:]
        similarities = model.feature_converter(deepest, bank[-2:]).similarities
        averaged = model.feature_converter.averaged_distances(deepest, bank[-2:], 2)
        light = model.anomaly_map_generator.nearest_components(similarities, averaged, (64, 64))
        with_maps = model.anomaly_map_generator.nearest_components(similarities, averaged, (64, 64), maps=True)
    assert light.nearest_map is None and light.averaged_map is None  # the calibration keeps no maps
    torch.testing.assert_close(light.nearest, full.nearest)
    torch.testing.assert_close(light.averaged_nearest, full.averaged_nearest)
    torch.testing.assert_close(with_maps.nearest_map, full.nearest_map)  # the maps on request (benchmarks)
    torch.testing.assert_close(with_maps.averaged_map, full.averaged_map)
    assert bool((full.averaged_nearest > 0).all())


def test_nearest_distance_keeps_small_distances_among_large_features() -> None:
    """Centred on the bank: a query 1e-2 away from features of size 1e3 keeps its distance (float32)."""
    bank = torch.full((4, 8), 1000.0) + torch.arange(4.0).unsqueeze(1)
    query = (bank[1] + 0.01).reshape(1, 1, 8)
    distance = float(feature_converter.nearest_distance(query, bank))
    assert distance == pytest.approx(0.01 * 8**0.5, rel=0.05)


def test_auto_scores_no_defects_without_the_nearest_neighbour_term() -> None:
    model = ResADModel("resnet18", ["layer1", "layer2"], pre_trained=False, coupling_layers=2, pos_embed_dim=16,
                       nearest_score=False).eval()  # fmt: skip
    references = torch.rand(2, 3, 64, 64)
    calibration = model.calibrate(model.reference_features(references), (64, 64))  # no images needed
    assert float(calibration[-1]) == 0.0
