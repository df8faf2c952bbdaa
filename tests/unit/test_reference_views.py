# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""reference_views: flipped / rotated views of the k references in the bank, calibrated leave-one-out by image."""

import random
from pathlib import Path

import pytest
import torch

from anomalib_resad import ResADConfigurationError, ResADInputError
from anomalib_resad.anomaly_map import CALIBRATION_THRESHOLDS
from anomalib_resad.feature_converter import flatten_levels
from anomalib_resad.reference_views import reference_views, view_count, view_rows
from anomalib_resad.references import ReferenceSelection
from tests.helpers.models import tiny_resad
from tests.unit.test_references import write_image

NEAREST = -CALIBRATION_THRESHOLDS + 3  # the nearest-neighbour threshold's place in the flat calibration


def test_views_are_the_symmetries_of_each_image_in_turn() -> None:
    images = torch.rand(3, 2, 5, 5)
    flips = reference_views(images, "flips")
    assert flips.shape == (12, 2, 5, 5)
    assert torch.equal(flips[4], images[1])  # each image's first view is itself
    assert torch.equal(flips[5], images[1].flip(-1)) and torch.equal(flips[6], images[1].flip(-2))
    assert torch.equal(flips[7], images[1].rot90(2, dims=(-2, -1)))  # both flips: half a turn
    dihedral = reference_views(images, "dihedral")
    assert dihedral.shape == (24, 2, 5, 5) and view_count("dihedral") == 8
    group = dihedral[view_rows(2, 8)]
    assert torch.equal(group[0], images[2])
    assert any(torch.equal(view, images[2].rot90(1, dims=(-2, -1))) for view in group)  # quarter turns
    assert any(torch.equal(view, images[2].rot90(3, dims=(-2, -1))) for view in group)
    assert len({tuple(view.flatten().tolist()) for view in group}) == 8  # eight different views
    assert reference_views(images, "none") is images


def test_bad_modes_and_non_square_rotations_are_named() -> None:
    with pytest.raises(ResADConfigurationError, match="reference_views 'rotations'"):
        view_count("rotations")
    with pytest.raises(ResADInputError, match=r"square.*4x6.*flips"):
        reference_views(torch.rand(2, 3, 4, 6), "dihedral")
    assert reference_views(torch.rand(2, 3, 4, 6), "flips").shape == (8, 3, 4, 6)
    with pytest.raises(ResADConfigurationError, match="reference_views"):
        tiny_resad(reference_views="rotate")


def test_calibration_scores_each_reference_against_the_other_images_views_only() -> None:
    """A reference never meets its own views in the leave-one-out bank (its mirror image would match it)."""
    torch.manual_seed(0)
    model = tiny_resad(reference_views="flips", nearest_averaging="off").model.eval()
    images = torch.rand(2, 3, 64, 64)
    bank = model.make_reference_bank(images)
    assert (bank.k, bank.views) == (2, [4, 4])  # the tiny model's two levels are the two deepest: both hold views
    assert bank.levels[0].shape[0] == 8 * 16 * 16  # 2 images x 4 views x the 16 x 16 grid of layer1
    features = model.reference_features(reference_views(images, "flips"))
    constants = bank.calibration[: model.num_levels]

    def nearest_max(index: int, others: slice) -> float:
        query = [level[index * 4 : index * 4 + 1] for level in features]
        bank_of_others = flatten_levels([level[others] for level in features])
        with torch.no_grad():
            return float(model.score_components(query, bank_of_others, constants, (64, 64)).nearest.max())

    expected = model.threshold_margin * max(nearest_max(0, slice(4, 8)), nearest_max(1, slice(0, 4)))
    assert float(bank.calibration[NEAREST]) == pytest.approx(expected, rel=1e-5)
    leaking = model.threshold_margin * max(nearest_max(0, slice(0, 8)), nearest_max(1, slice(0, 8)))
    assert leaking < 0.5 * expected  # with its own views in the bank a reference matches itself: far lower


def test_views_change_the_bank_and_training_draws_stay_plain(tmp_path: Path) -> None:
    paths = [str(write_image(tmp_path / f"ref{index}.png", size=(64, 64))) for index in range(3)]
    selection = ReferenceSelection("widget", paths)
    plain = tiny_resad(nearest_averaging="off", reference_views="none")
    flipped = tiny_resad(nearest_averaging="off", reference_views="dihedral")
    flipped.model.load_state_dict(plain.model.state_dict())
    plain_bank, flipped_bank = plain.references.bank(selection), flipped.references.bank(selection)
    assert (plain_bank.k, flipped_bank.k, flipped_bank.views) == (3, 3, [8, 8])
    # the first view of each image is the image: the plain bank is inside the larger one, image by image
    grid = 16 * 16
    for index in range(3):
        rows = slice(index * 8 * grid, (index * 8 + 1) * grid)
        torch.testing.assert_close(
            flipped_bank.levels[0][rows], plain_bank.levels[0][index * grid : (index + 1) * grid]
        )
    assert not torch.allclose(plain_bank.calibration, flipped_bank.calibration)  # views used, not just stored
    flipped.references.set_pools({"widget": paths})
    training = flipped.references.training_bank("widget", 2, random.Random(0))
    assert (training.k, training.level_views) == (2, [1, 1])  # training draws: the images alone


def test_views_on_the_deepest_levels_only_keep_the_shallow_bank_plain() -> None:
    """``reference_view_levels=1``: the shallow level's bank is the images alone, the deepest holds the views; each
    level's leave-one-out bank drops the reference's own rows of that level."""
    torch.manual_seed(0)
    model = tiny_resad(reference_views="flips", reference_view_levels=1, nearest_averaging="off").model.eval()
    images = torch.rand(3, 3, 64, 64)
    bank = model.make_reference_bank(images)
    assert (bank.k, bank.views) == (3, [1, 4])
    assert bank.levels[0].shape[0] == 3 * 16 * 16 and bank.levels[1].shape[0] == 3 * 4 * 8 * 8
    plain = model.reference_features(images)
    torch.testing.assert_close(bank.levels[0], flatten_levels(plain)[0])
    model.set_references(bank)
    assert model.feature_converter.reference_grid[:, 0].tolist() == [3, 3]
    assert model.feature_converter.bank.views == [1, 4]
    features = model.bank_features(images)
    constants = bank.calibration[: model.num_levels]

    def nearest_max(index: int) -> float:
        query = [features[0][index : index + 1], features[1][index * 4 : index * 4 + 1]]
        others = [torch.cat([features[0][:index], features[0][index + 1 :]]),
                  torch.cat([features[1][: index * 4], features[1][(index + 1) * 4 :]])]  # fmt: skip
        with torch.no_grad():
            return float(model.score_components(query, flatten_levels(others), constants, (64, 64)).nearest.max())

    expected = model.threshold_margin * max(nearest_max(index) for index in range(3))
    assert float(bank.calibration[NEAREST]) == pytest.approx(expected, rel=1e-5)
    with torch.no_grad():  # and the bank scores queries (the averaged matching reshapes each level's bank by its grid)
        model.nearest_averaging = "on"
        model.set_references(model.make_reference_bank(images))
        output = model(torch.rand(2, 3, 64, 64))
    assert output.pred_score.shape == (2,) and bool(torch.isfinite(output.anomaly_map).all())


def test_default_is_dihedral_and_checkpoints_of_before_the_option_keep_the_images_alone() -> None:
    model = tiny_resad()
    assert model.model.reference_views == "dihedral" and model.model.bank_views == [8, 8]
    saved = {name: value for name, value in model.hparams.items() if name != "reference_views"}
    model.on_load_checkpoint({"hyper_parameters": saved})
    assert model.model.reference_views == "none" and model.hparams["reference_views"] == "none"
    current = tiny_resad()
    current.on_load_checkpoint({"hyper_parameters": dict(current.hparams)})
    assert current.model.reference_views == "dihedral"


def test_dihedral_views_need_a_square_image_size_and_the_default_falls_back_to_flips() -> None:
    with pytest.raises(ResADConfigurationError, match=r"square image_size; got 64x96.*reference_views flips"):
        tiny_resad(image_size=(64, 96), reference_views="dihedral")
    assert tiny_resad(image_size=(64, 96)).model.reference_views == "flips"  # documented default for non-square
    with pytest.raises(ResADConfigurationError, match="reference_view_levels must be >= 0"):
        tiny_resad(reference_view_levels=-1).model.bank_views  # noqa: B018


def test_no_level_with_views_is_the_plain_bank_and_a_changed_layout_makes_the_bank_again(tmp_path: Path) -> None:
    torch.manual_seed(0)
    images = torch.rand(2, 3, 64, 64)
    model = tiny_resad(nearest_averaging="off", reference_view_levels=0).model.eval()
    plain = tiny_resad(nearest_averaging="off", reference_views="none").model.eval()
    plain.load_state_dict(model.state_dict())
    zero, reference = model.make_reference_bank(images), plain.make_reference_bank(images)
    assert (zero.k, zero.views) == (2, [1, 1])
    for level, expected in zip(zero.levels, reference.levels, strict=True):
        torch.testing.assert_close(level, expected)
    torch.testing.assert_close(zero.calibration, reference.calibration)
    # the same files with another per-level layout of views: a new bank, not the cached one
    resad = tiny_resad(nearest_averaging="off")
    paths = [str(write_image(tmp_path / f"ref{index}.png", size=(64, 64))) for index in range(2)]
    selection = ReferenceSelection("widget", paths)
    both = resad.references.bank(selection)
    resad.model.reference_view_levels = 1
    deepest = resad.references.bank(selection)
    assert (both.views, deepest.views) == ([8, 8], [1, 8])
    assert deepest.levels[0].shape[0] == 2 * 16 * 16
