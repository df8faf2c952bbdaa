# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""ClassReferences: one room for the k-shot references (selection, cached features, calibrated banks)."""

import random
from pathlib import Path

import pytest
import torch

from anomalib_resad import ResADInputError
from anomalib_resad.class_references import ClassReferences
from anomalib_resad.references import ReferenceSelection, load_images
from tests.helpers.models import tiny_resad
from tests.unit.test_references import write_constant, write_image


class CountingEncoder:
    """Per-level features that identify each file, and a record of every file encoded."""

    def __init__(self) -> None:
        self.encoded: list[str] = []

    def __call__(self, paths, views=1):
        self.encoded.extend(paths)
        values = torch.tensor([float(abs(hash(path)) % 1000) for path in paths]).repeat_interleave(views)
        return [values.reshape(-1, 1, 1, 1).expand(-1, 2, 3, 3).clone()], (12, 12)


def calibrate(features, image_size, paths):
    return torch.cat([features[0].mean().reshape(1), torch.tensor([1.0, 1.0, 1.0])])


def test_each_image_is_encoded_once_across_banks_and_training_draws() -> None:
    encoder = CountingEncoder()
    references = ClassReferences(encoder, calibrate)
    references.set_pools({"widget": [f"w{index}.png" for index in range(5)]})
    rng = random.Random(0)
    for _ in range(20):
        bank = references.training_bank("widget", 3, rng)
        assert bank.k == 3 and bank.calibration is None  # training banks are not calibrated
    assert sorted(encoder.encoded) == sorted(set(encoder.encoded))  # never twice
    selection = ReferenceSelection("widget", ["w0.png", "w1.png"])
    first = references.bank(selection)
    assert references.bank(selection) is first  # built once per set of files
    assert first.calibration is not None


def test_small_cache_still_gives_correct_features() -> None:
    encoder = CountingEncoder()
    references = ClassReferences(encoder, calibrate, cache_bytes=10)  # smaller than one image's features
    features = references.features(["a.png", "b.png", "a.png"])[0]
    assert torch.equal(features[0], features[2])
    assert not torch.equal(features[0], features[1])


def test_selection_from_folder_or_seeded_pool(tmp_path: Path) -> None:
    references = ClassReferences(CountingEncoder(), calibrate)
    pool = [str(write_image(tmp_path / "pool" / f"{index}.png")) for index in range(6)]
    references.set_pools({"widget": pool})
    drawn = references.select("widget", 3, seed=4)
    assert drawn == references.select("widget", 3, seed=4) and drawn.seed == 4
    assert references.select("widget", 3, seed=5).paths != drawn.paths
    folder = references.select("widget", 2, folder=tmp_path / "pool")
    assert folder.paths == sorted(pool)[:2]
    with pytest.raises(ResADInputError, match="No reference images for class 'other'"):
        references.select("other", 2)
    with pytest.raises(ResADInputError, match="does not exist"):
        references.select("widget", 2, folder=tmp_path / "missing")


def test_blank_reference_frames_are_refused_by_name(tmp_path: Path) -> None:
    references = ClassReferences(CountingEncoder(), calibrate)
    blank = str(write_constant(tmp_path / "white.png", 255))
    good = str(write_image(tmp_path / "good.png"))
    with pytest.raises(ResADInputError, match=r"white\.png.*blank"):
        references.bank(ReferenceSelection("widget", [good, blank]))


def test_calibration_reads_only_the_reference_images(tmp_path: Path) -> None:
    """The class's constants and thresholds come from its k references: no test image is ever encoded for them."""
    model = tiny_resad()
    encoded: list[str] = []
    encode = model.references.encode

    def spy(paths, views=1):
        encoded.extend(paths)
        return encode(paths, views)

    model.references.encode = spy
    paths = [str(write_image(tmp_path / f"ref{index}.png", size=(64, 64))) for index in range(3)]
    bank = model.references.bank(ReferenceSelection("widget", paths))
    assert sorted(encoded) == sorted(paths)
    # and the calibration is the leave-one-out rule applied to exactly these features
    images = load_images(paths, model.pre_processor.transform)  # nearest_averaging="auto" reads the images too
    views = model.model.bank_views  # the default bank holds each image's 8 views on both levels of the tiny model
    expected = model.model.calibrate(model.references.features(paths, max(views)), (64, 64), images, views)
    torch.testing.assert_close(bank.calibration, expected)
