# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""ClassReferences: one room for the k-shot references (selection, cached features, calibrated banks)."""

import random
from pathlib import Path

import pytest
import torch

from anomalib_resad import ResADInputError
from anomalib_resad.calibration import Scoring
from anomalib_resad.class_references import ClassReferences
from anomalib_resad.references import ReferenceSelection, load_images
from tests.helpers.images import write_constant, write_image
from tests.helpers.models import tiny_resad


class CountingEncoder:
    """Per-level features that identify each file, and a record of every file encoded."""

    def __init__(self) -> None:
        self.encoded: list[str] = []

    def __call__(self, paths, bank=False):
        self.encoded.extend(paths)
        views = 2 if bank else 1
        values = torch.tensor([float(abs(hash(path)) % 1000) for path in paths]).repeat_interleave(views)
        return [values.reshape(-1, 1, 1, 1).expand(-1, 2, 3, 3).clone()], (12, 12), (views,)


def calibrate(features, image_size, paths, views):
    scoring = Scoring.neutral(num_levels=1)
    scoring.level_constants = features[0].mean().reshape(1)
    return scoring


def test_each_image_is_encoded_once_across_banks_and_training_draws() -> None:
    encoder = CountingEncoder()
    references = ClassReferences(encoder, calibrate)
    references.set_pools({"widget": [f"w{index}.png" for index in range(5)]})
    rng = random.Random(0)
    for _ in range(20):
        bank = references.training_bank("widget", 3, rng)
        assert bank.k == 3 and bank.scoring is None  # training banks are not calibrated
    assert sorted(encoder.encoded) == sorted(set(encoder.encoded))  # never twice
    selection = ReferenceSelection("widget", ["w0.png", "w1.png"])
    first = references.bank(selection)
    assert references.bank(selection) is first  # built once per set of files
    assert first.scoring is not None


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
    references = tiny_resad().references  # the model's encoder checks a bank's images as references
    blank = str(write_constant(tmp_path / "white.png", 255))
    good = [str(write_image(tmp_path / f"good{index}.png", size=(64, 64))) for index in range(2)]
    with pytest.raises(ResADInputError, match=r"white\.png.*blank"):
        references.bank(ReferenceSelection("widget", [*good, blank]))
    references.set_pools({"widget": [*good, blank]})
    assert references.training_bank("widget", 3, random.Random(0)).k == 3  # training draws are not checked


def test_calibration_reads_only_the_reference_images(tmp_path: Path) -> None:
    """The class's constants and thresholds come from its k references: no test image is ever encoded for them."""
    model = tiny_resad()
    encoded: list[str] = []
    encode = model.references.encode

    def spy(paths, bank=False):
        encoded.extend(paths)
        return encode(paths, bank)

    model.references.encode = spy
    paths = [str(write_image(tmp_path / f"ref{index}.png", size=(64, 64))) for index in range(3)]
    bank = model.references.bank(ReferenceSelection("widget", paths))
    assert sorted(encoded) == sorted(paths)
    # and the record is the leave-one-out rule applied to exactly these features (and their synthetic defects)
    images = load_images(paths, model.pre_processor.transform)
    views = model.model.bank_views((64, 64))  # each image's 8 views on both levels of the tiny model
    expected = model.model.calibrate(model.references.features(paths, bank=True), (64, 64), images, views)
    for name, value in expected.tensors().items():
        torch.testing.assert_close(getattr(bank.scoring, name), value)


def test_the_stored_class_is_kept_where_pinned_and_other_classes_get_their_own_banks(tmp_path: Path) -> None:
    references = ClassReferences(CountingEncoder(), calibrate)
    pools = {name: [str(write_image(tmp_path / name / f"{index}.png")) for index in range(4)] for name in "abc"}
    references.set_pools(pools)

    def select(name: str) -> ReferenceSelection:
        return references.select(name, 2, seed=0)

    # nothing stored: the first class becomes the stored one, the others get banks of their own
    stored = references.prepare_evaluation(["b", "a", "c"], select, folder=False)
    assert stored.class_name == "a" and sorted(references.eval_banks) == ["b", "c"]
    references.stored, references.pinned = stored, True
    assert references.bank_of("a") is None and references.bank_of("b") is references.eval_banks["b"]
    # pinned references of a class being evaluated stay, even if a draw would give other images
    pinned = ReferenceSelection("c", pools["c"][2:])
    references.stored = pinned
    assert references.prepare_evaluation(["a", "c"], select, folder=False) is None
    assert sorted(references.eval_banks) == ["a"]
    # a folder of references wins over pinned ones, and holds one class only
    assert references.prepare_evaluation(["c"], select, folder=True).paths == select("c").paths
    with pytest.raises(ResADInputError, match="one class"):
        references.prepare_evaluation(["a", "c"], select, folder=True)


def test_after_training_the_pinned_class_is_calibrated_again_unless_its_files_are_gone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    references = ClassReferences(CountingEncoder(), calibrate)
    paths = [str(write_image(tmp_path / f"{index}.png")) for index in range(2)]
    selection = ReferenceSelection("widget", paths)
    references.store(selection, pinned=True)
    assert not references.needs_recalibration()
    references.forget_scoring()  # a training step changed the flows
    assert references.needs_recalibration()
    assert references.prepare_evaluation(["widget"], lambda name: selection, folder=False) is selection
    references.store(selection, pinned=True)
    references.forget_scoring()
    Path(paths[1]).unlink()  # a checkpoint made on another machine, trained further here
    assert not references.needs_recalibration()  # its record is kept: nothing to measure it again from
    assert "not on this machine" in caplog.text and paths[1] in caplog.text
    assert references.prepare_evaluation(["widget"], lambda name: selection, folder=False) is None
