# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""Per-class neighbourhood averaging of the nearest-neighbour term: defects, averaged matching, calibration, scoring."""

import pytest
import torch
from torch.nn import functional as F  # noqa: N812

from anomalib_resad import ResADModel, feature_converter
from anomalib_resad.anomaly_map import AnomalyMapGenerator
from anomalib_resad.calibration import AVERAGING_GAIN, BOUNDARY_FLOOR, ScoreComponents, Scoring, leave_one_out_scoring
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
    maps = {"anomaly_map": value.view(1, 1, 1, 1), "nearest_map": torch.tensor(nearest).view(1, 1, 1, 1),
            "averaged_map": torch.tensor(averaged).view(1, 1, 1, 1)}  # fmt: skip
    return ScoreComponents(map_max=value, dissimilarity=value, level_max_log_likelihood=torch.zeros(1, 1),
                           nearest=torch.tensor([nearest]), reverse_dissimilarity=value,
                           averaged_nearest=torch.tensor([averaged]), **maps)  # fmt: skip


@pytest.mark.parametrize(
    ("defect_nearest", "defect_averaged", "expected"),
    [
        (2.0, 2.0 * (1 + AVERAGING_GAIN) + 0.05, 1.0),  # the averaged matching lifts the defects clearly more
        (2.0, 2.0 * (1 + AVERAGING_GAIN) - 0.05, 0.0),  # not by the required gain: precise
        (2.0, 1.0, 0.0),
    ],
)
def test_averaging_follows_the_defects(defect_nearest: float, defect_averaged: float, expected: float) -> None:
    normal = [_components(1.0, 1.0), _components(0.5, 0.8)]  # maxima: nearest 1.0, averaged 1.0
    scoring = leave_one_out_scoring(
        lambda index, constants: normal[index], 2, 1,
        lambda index, constants: _components(defect_nearest, defect_averaged),
    )  # fmt: skip
    assert float(scoring.averaging) == expected
    assert float(scoring.averaged_max) == pytest.approx(1.0)
    # the defects' boundary is read from the matching the class chose
    assert float(scoring.nearest_defects) == pytest.approx(defect_averaged if expected else defect_nearest)
    precise = leave_one_out_scoring(lambda index, constants: normal[index], 2, 1)  # no defects: precise
    assert float(precise.averaging) == 0.0


def test_averaging_changes_the_nearest_term_and_fuses_the_averaged_map() -> None:
    generator = AnomalyMapGenerator(num_levels=2)
    log_likelihoods = [(torch.randn(2, 4, 4), torch.randn(2, 4, 4)) for _ in range(2)]
    similarities = [torch.rand(2, 4, 4) for _ in range(2)]
    coverage = [torch.ones(2, 3) for _ in range(2)]
    averaged = [torch.rand(2, 4, 4) * 3 for _ in range(2)]  # Euclidean distances
    values = {"map_max": 1.0, "nearest_max": 4.0, "averaged_max": 8.0, "dissimilarity_max": 100.0,
              "reverse_dissimilarity_max": 100.0}  # fmt: skip
    values |= {"fused_max": 1.0, "fused_defects": 0.0, "nearest_defects": 0.0, "paper_defects": 0.0}  # at the floor
    precise = Scoring(torch.zeros(2), averaging=torch.tensor(0.0),
                      **{name: torch.tensor(value) for name, value in values.items()})  # fmt: skip
    chosen = Scoring(**{**precise.tensors(), "averaging": torch.tensor(1.0)})
    parts = generator.components(log_likelihoods, similarities, coverage, (16, 16), torch.zeros(2), averaged)
    torch.testing.assert_close(parts.averaged_nearest, parts.averaged_map.flatten(start_dim=1).amax(dim=1))
    off_map, off = generator(log_likelihoods, similarities, coverage, (16, 16), precise, averaged)
    on_map, on = generator(log_likelihoods, similarities, coverage, (16, 16), chosen, averaged)
    precise_map = (parts.anomaly_map / 1.0 + parts.nearest_map / 4.0) / 2 / BOUNDARY_FLOOR  # precise classes
    torch.testing.assert_close(off_map, precise_map)
    torch.testing.assert_close(on_map, (parts.anomaly_map / 1.0 + parts.averaged_map / 8.0) / 2 / BOUNDARY_FLOOR)
    # the image score is the maximum of the map the class gets
    torch.testing.assert_close(off, off_map.flatten(start_dim=1).amax(dim=1))
    torch.testing.assert_close(on, on_map.flatten(start_dim=1).amax(dim=1))
    torch.testing.assert_close(parts.nearest, parts.nearest_map.flatten(start_dim=1).amax(dim=1))
    generator.scoring = "paper"
    without = generator(log_likelihoods, similarities, coverage, (16, 16), chosen, averaged)[0]
    # the reference's scoring: the flows' map alone
    torch.testing.assert_close(without, parts.anomaly_map / BOUNDARY_FLOOR)


def test_model_chooses_its_matching_from_its_references_and_scores_with_it() -> None:
    torch.manual_seed(0)
    model = ResADModel("resnet18", ["layer1", "layer2"], pre_trained=False, coupling_layers=2, pos_embed_dim=16).eval()
    bank = model.make_reference_bank(torch.rand(2, 3, 64, 64))
    assert float(bank.scoring.averaged_max) > 0 and float(bank.scoring.averaging) in {0.0, 1.0}
    model.set_references(bank)
    with torch.no_grad():
        assert bool(torch.isfinite(model(torch.rand(2, 3, 64, 64)).pred_score).all())


def test_nearest_distance_keeps_small_distances_among_large_features() -> None:
    """Centred on the bank: a query 1e-2 away from features of size 1e3 keeps its distance (float32)."""
    bank = torch.full((4, 8), 1000.0) + torch.arange(4.0).unsqueeze(1)
    query = (bank[1] + 0.01).reshape(1, 1, 8)
    distance = float(feature_converter.nearest_distance(query, bank))
    assert distance == pytest.approx(0.01 * 8**0.5, rel=0.05)


def test_every_scoring_gets_its_boundary_from_the_defects() -> None:
    """One calibration serves every scoring (the side-by-side protocol scores all three from one record)."""
    torch.manual_seed(0)
    model = ResADModel("resnet18", ["layer1", "layer2"], pre_trained=False, coupling_layers=2, pos_embed_dim=16,
                       scoring="paper").eval()  # fmt: skip
    scoring = model.make_reference_bank(torch.rand(2, 3, 64, 64)).scoring
    for name in ("fused", "nearest", "paper"):
        assert float(getattr(scoring, f"{name}_defects")) > 0, name
    assert 0 < float(scoring.fused_max) <= 1 + 1e-6
