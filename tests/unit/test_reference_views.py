# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""Flipped / rotated views of the k references in the deepest levels' banks, scored leave-one-out by image."""

import random
from pathlib import Path

import pytest
import torch

from anomalib_resad import ResADConfigurationError, ResADInputError
from anomalib_resad.feature_converter import flatten_levels
from anomalib_resad.reference_views import level_views, reference_views, view_count
from anomalib_resad.references import ReferenceSelection
from tests.helpers.images import write_image
from tests.helpers.models import tiny_resad


def test_views_are_the_symmetries_of_each_image_in_turn() -> None:
    images = torch.rand(3, 2, 5, 5)
    flips = reference_views(images, "flips")
    assert flips.shape == (12, 2, 5, 5)
    assert torch.equal(flips[4], images[1])  # each image's first view is itself
    assert torch.equal(flips[5], images[1].flip(-1)) and torch.equal(flips[6], images[1].flip(-2))
    assert torch.equal(flips[7], images[1].rot90(2, dims=(-2, -1)))  # both flips: half a turn
    dihedral = reference_views(images, "dihedral")
    assert dihedral.shape == (24, 2, 5, 5) and view_count("dihedral") == 8
    group = dihedral[16:24]
    assert torch.equal(group[0], images[2])
    assert any(torch.equal(view, images[2].rot90(1, dims=(-2, -1))) for view in group)  # quarter turns
    assert any(torch.equal(view, images[2].rot90(3, dims=(-2, -1))) for view in group)
    assert len({tuple(view.flatten().tolist()) for view in group}) == 8  # eight different views
    assert reference_views(images, "none") is images


def test_views_follow_the_input_shape_on_the_two_deepest_levels() -> None:
    assert level_views((224, 224), num_levels=3) == [1, 8, 8]  # dihedral for a square input
    assert level_views((64, 96), num_levels=3) == [1, 4, 4]  # a quarter turn would change the size: flips
    assert level_views((64, 64), num_levels=1) == [8]
    with pytest.raises(ResADConfigurationError, match="reference_views 'rotations'"):
        view_count("rotations")
    with pytest.raises(ResADInputError, match=r"square.*4x6.*flips"):
        reference_views(torch.rand(2, 3, 4, 6), "dihedral")


def test_each_reference_is_scored_against_the_other_images_views_only() -> None:
    """A reference never meets its own views in the leave-one-out bank (its mirror image would match it)."""
    torch.manual_seed(0)
    model = tiny_resad(layers=["layer1", "layer2", "layer3"]).model.eval()
    images = torch.rand(3, 3, 64, 64)
    bank = model.make_reference_bank(images)
    assert (bank.k, bank.views) == (3, [1, 8, 8])
    assert bank.levels[0].shape[0] == 3 * 16 * 16 and bank.levels[1].shape[0] == 3 * 8 * 8 * 8
    torch.testing.assert_close(bank.levels[0], flatten_levels(model.reference_features(images))[0])
    features = model.bank_features(images)
    constants = bank.scoring.level_constants

    def nearest_max(index: int, leak: bool = False) -> float:
        query = [level[index * count : index * count + 1] for level, count in zip(features, bank.views, strict=True)]
        others = [
            level if leak else torch.cat([level[: index * count], level[(index + 1) * count :]])
            for level, count in zip(features, bank.views, strict=True)
        ]
        with torch.no_grad():
            return float(model.score_components(query, flatten_levels(others), constants, (64, 64)).nearest.max())

    assert float(bank.scoring.nearest_max) == pytest.approx(max(nearest_max(index) for index in range(3)), rel=1e-5)
    leaking = max(nearest_max(index, leak=True) for index in range(3))
    assert leaking < 0.5 * float(bank.scoring.nearest_max)  # with its own views in the bank: far lower
    model.set_references(bank)
    assert model.feature_converter.bank.views == [1, 8, 8]  # recorded with the bank, not derived from shapes
    with torch.no_grad():  # the bank scores queries (the averaged matching reshapes each level's bank by its grid)
        output = model(torch.rand(2, 3, 64, 64))
    assert output.pred_score.shape == (2,) and bool(torch.isfinite(output.anomaly_map).all())


def test_evaluation_banks_hold_the_views_and_training_draws_stay_plain(tmp_path: Path) -> None:
    paths = [str(write_image(tmp_path / f"ref{index}.png", size=(64, 64))) for index in range(3)]
    resad = tiny_resad()
    bank = resad.references.bank(ReferenceSelection("widget", paths))
    plain = flatten_levels(resad.references.features(paths))
    assert (bank.k, bank.views) == (3, [8, 8])
    grid = 16 * 16  # the first view of each image is the image: the plain features are inside the bank
    for index in range(3):
        rows = slice(index * 8 * grid, (index * 8 + 1) * grid)
        torch.testing.assert_close(bank.levels[0][rows], plain[0][index * grid : (index + 1) * grid])
    resad.references.set_pools({"widget": paths})
    training = resad.references.training_bank("widget", 2, random.Random(0))
    assert (training.k, training.views) == (2, [1, 1])  # training draws: the images alone
    assert tiny_resad(image_size=(64, 96)).model.bank_views((64, 96)) == [4, 4]  # non-square: flips
