# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""Feature Converter: nearest-reference matching and residuals."""

import pytest
import torch
from torch.nn import functional as F  # noqa: N812

from anomalib_resad import ResADConfigurationError, ResADInputError
from anomalib_resad import feature_converter as converter_module
from anomalib_resad.feature_converter import FeatureConverter, ReferenceBank, nearest_reference, residual_features


def brute_force_nearest(query: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """One query at a time, cosine similarity by the textbook formula."""
    matched = []
    for vector in query:
        similarity = torch.stack([torch.dot(vector, row) / (vector.norm() * row.norm()) for row in bank])
        matched.append(bank[similarity.argmax()])
    return torch.stack(matched)


@pytest.mark.parametrize("block_elements", [1 << 20, 7])  # one block, and many tiny blocks
def test_nearest_reference_equals_brute_force(monkeypatch: pytest.MonkeyPatch, block_elements: int) -> None:
    monkeypatch.setattr(converter_module, "_MATCH_BLOCK_ELEMENTS", block_elements)
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(37, 6, generator=generator)
    bank = torch.randn(23, 6, generator=generator) * torch.rand(23, 1, generator=generator) * 5  # varied norms
    matched, similarity = nearest_reference(query, bank)
    torch.testing.assert_close(matched, brute_force_nearest(query, bank))
    torch.testing.assert_close(similarity, F.cosine_similarity(query, matched, dim=1))


def test_export_formulation_of_matching_equals_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """Exported graphs match with reductions instead of ArgMax: same first index, ties included."""
    generator = torch.Generator().manual_seed(1)
    query = torch.randn(50, 4, generator=generator)
    bank = torch.randn(30, 4, generator=generator)
    bank = torch.cat([bank, bank[:10]])  # a reference image drawn twice: exact ties must give the first index
    similarity = F.normalize(query, dim=1) @ F.normalize(bank, dim=1).T
    indices, best = converter_module._first_index_of_max(similarity)
    torch.testing.assert_close(indices, similarity.argmax(dim=1))
    torch.testing.assert_close(best, similarity.amax(dim=1))
    tied = torch.tensor([[0.5, 0.9, 0.9, 0.1], [0.3, 0.3, 0.2, 0.3], [-1.0, -2.0, -1.0, -1.0]])
    assert converter_module._first_index_of_max(tied)[0].tolist() == [1, 0, 0] == tied.argmax(dim=1).tolist()
    expected, expected_similarity = nearest_reference(query, bank)
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    exported, exported_similarity = nearest_reference(query, bank)
    assert torch.equal(exported, expected)
    torch.testing.assert_close(exported_similarity, expected_similarity)
    torch.testing.assert_close(expected, brute_force_nearest(query, bank))


@pytest.mark.parametrize("block_elements", [1 << 20, 100, 7])  # several images, one image, rows of one image
def test_coverage_is_each_reference_vectors_best_match_in_each_image(
    monkeypatch: pytest.MonkeyPatch, block_elements: int
) -> None:
    monkeypatch.setattr(converter_module, "_MATCH_BLOCK_ELEMENTS", block_elements)
    generator = torch.Generator().manual_seed(2)
    query = torch.randn(3, 9, 5, generator=generator)
    bank = torch.randn(11, 5, generator=generator)
    matched, similarity, coverage = converter_module.match_features(query, bank)
    cosine = F.cosine_similarity(query.unsqueeze(2), bank.view(1, 1, 11, 5), dim=3)  # (3, 9, 11)
    torch.testing.assert_close(coverage, cosine.amax(dim=1))  # per image, not over the batch
    torch.testing.assert_close(similarity, cosine.amax(dim=2))
    torch.testing.assert_close(matched, bank[cosine.argmax(dim=2)])
    forward_only = converter_module.match_features(query, bank, coverage=False)  # training: no reverse pass
    assert forward_only[2] is None
    torch.testing.assert_close(forward_only[0], matched, rtol=0, atol=0)
    torch.testing.assert_close(forward_only[1], similarity, rtol=0, atol=0)
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    exported = converter_module.match_features(query, bank)
    for eager_part, exported_part in zip((matched, similarity, coverage), exported, strict=True):
        torch.testing.assert_close(exported_part, eager_part)


def test_matching_uses_cosine_but_returns_raw_reference_vectors() -> None:
    bank = torch.tensor([[10.0, 0.0], [0.0, 0.1]])
    query = torch.tensor([[0.0, 3.0]])  # same direction as [0, 0.1]: the raw (un-normalised) vector comes back
    assert torch.equal(nearest_reference(query, bank)[0], bank[1:])
    query = torch.tensor([[1.0, 0.2]])  # L2-nearest is [0, 0.1], cosine-nearest is [10, 0]
    assert torch.equal(nearest_reference(query, bank)[0], bank[:1])


@pytest.mark.parametrize("residual", ["squared", "difference"])
def test_residual_of_reference_against_itself_is_zero(residual: str) -> None:
    converter = FeatureConverter(num_levels=2, residual=residual)
    references = [torch.rand(3, 8, 5, 5), torch.rand(3, 16, 3, 3)]
    converter.set_bank(ReferenceBank.from_features(references))
    residuals, similarities, _ = converter([level[1:2] for level in references])
    assert all(float(level.abs().max()) == 0.0 for level in residuals)
    assert all(torch.allclose(level, torch.ones_like(level)) for level in similarities)
    assert [tuple(level.shape) for level in residuals] == [(1, 8, 5, 5), (1, 16, 3, 3)]


def test_residual_forms() -> None:
    features, matched = torch.tensor([3.0, -1.0]), torch.tensor([1.0, 1.0])
    assert residual_features(features, matched, "squared").tolist() == [4.0, 4.0]
    assert residual_features(features, matched, "difference").tolist() == [2.0, -2.0]


def test_matching_is_global_over_positions_and_shots() -> None:
    """A query feature matches a reference at *another* position of *another* shot."""
    converter = FeatureConverter(num_levels=1, residual="difference")
    shots = torch.rand(2, 4, 3, 3)
    converter.set_bank(ReferenceBank.from_features([shots]))
    query = shots[1:2, :, 2:3, 0:1].expand(1, 4, 3, 3).clone()  # every position = shot 1, position (2, 0)
    assert float(converter([query])[0][0].abs().max()) == 0.0


def test_forward_matches_per_image_reference_computation() -> None:
    converter = FeatureConverter(num_levels=1)
    shots, query = torch.rand(2, 4, 3, 3), torch.rand(5, 4, 3, 3)
    converter.set_bank(ReferenceBank.from_features([shots]))
    bank = shots.permute(0, 2, 3, 1).reshape(-1, 4)
    expected = []
    for image in query:
        vectors = image.permute(1, 2, 0).reshape(-1, 4)
        index = (F.normalize(vectors, dim=1) @ F.normalize(bank, dim=1).T).argmax(1)
        expected.append(((vectors - bank[index]) ** 2).reshape(3, 3, 4).permute(2, 0, 1))
    torch.testing.assert_close(converter([query])[0][0], torch.stack(expected))


def test_explicit_bank_overrides_stored_one() -> None:
    converter = FeatureConverter(num_levels=1)
    converter.set_bank(ReferenceBank.from_features([torch.rand(2, 4, 3, 3)]))
    other = torch.rand(1, 4, 3, 3)
    bank = ReferenceBank.from_features([other])
    assert float(converter([other], bank.levels)[0][0].abs().max()) == 0.0


def test_missing_references_and_wrong_size_raise_clear_errors() -> None:
    converter = FeatureConverter(num_levels=1)
    with pytest.raises(ResADInputError, match="no reference images"):
        converter([torch.rand(1, 4, 3, 3)])
    converter.set_bank(ReferenceBank.from_features([torch.rand(2, 4, 3, 3)]))
    with pytest.raises(ResADInputError, match="another image size"):
        converter([torch.rand(1, 4, 5, 5)])


def test_bank_survives_state_dict_round_trip() -> None:
    converter = FeatureConverter(num_levels=2)
    converter.set_bank(ReferenceBank.from_features([torch.rand(3, 4, 3, 3), torch.rand(3, 8, 2, 2)]))
    restored = FeatureConverter(num_levels=2)
    restored.load_state_dict(converter.state_dict())
    assert restored.bank.k == 3
    assert restored.bank.grids == [(3, 3), (2, 2)]
    for original, copy in zip(converter.bank.levels, restored.bank.levels, strict=True):
        torch.testing.assert_close(original, copy)


def test_unknown_residual_type_is_refused() -> None:
    with pytest.raises(ResADConfigurationError, match="Unknown residual type"):
        FeatureConverter(num_levels=1, residual="absolute")
