# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""Reference selection and image reading."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomalib_resad import ResADInputError
from anomalib_resad.references import (
    ReferenceSelection,
    check_image_files,
    load_images,
    sample_references,
    select_folder_references,
)
from tests.helpers.images import write_constant, write_image


def test_sampling_is_seeded_and_independent_of_pool_order() -> None:
    pool = [f"good/{index:03d}.png" for index in range(30)]
    first = sample_references(pool, 4, seed=7)
    assert first == sample_references(list(reversed(pool)), 4, seed=7)
    assert first != sample_references(pool, 4, seed=8)
    assert len(set(first)) == 4


@pytest.mark.parametrize(("k", "message"), [(0, "at least 1"), (5, "has only 3")])
def test_bad_k_is_refused(k: int, message: str) -> None:
    with pytest.raises(ResADInputError, match=message):
        sample_references(["a.png", "b.png", "c.png"], k, seed=0)


def test_empty_pool_is_refused() -> None:
    with pytest.raises(ResADInputError, match="No normal reference images"):
        sample_references([], 2, seed=0)


def test_folder_references_are_the_first_k_in_sorted_order(tmp_path: Path) -> None:
    for name in ["c.png", "a.png", "b.jpg", "notes.txt"]:
        (write_image(tmp_path / name) if name.endswith(("png", "jpg")) else (tmp_path / name).write_text("x"))
    selection = select_folder_references(tmp_path, 2, "widget")
    assert [Path(path).name for path in selection.paths] == ["a.png", "b.jpg"]
    assert select_folder_references(tmp_path, None, "widget").k == 3
    with pytest.raises(ResADInputError, match="has only 3"):
        select_folder_references(tmp_path, 4, "widget")


def test_missing_or_empty_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ResADInputError, match="does not exist"):
        select_folder_references(tmp_path / "nowhere", 2, "widget")
    with pytest.raises(ResADInputError, match="holds no images"):
        select_folder_references(tmp_path, 2, "widget")


def test_grayscale_and_rgba_images_become_rgb(tmp_path: Path) -> None:
    paths = [str(write_image(tmp_path / "gray.png", "L")), str(write_image(tmp_path / "rgba.png", "RGBA"))]
    images = load_images(paths, transform=None)
    assert tuple(images.shape) == (2, 3, 16, 20)
    assert float(images.max()) <= 1.0


def test_corrupt_files_are_all_listed(tmp_path: Path) -> None:
    good = write_image(tmp_path / "good.png")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:40])
    text = tmp_path / "text.png"
    text.write_text("not an image")
    with pytest.raises(ResADInputError, match=r"2 image file\(s\) cannot be read") as error:
        check_image_files([str(good), str(truncated), str(text)])
    assert "truncated.png" in str(error.value)
    assert "text.png" in str(error.value)
    with pytest.raises(ResADInputError, match="Cannot read image"):
        load_images([str(text)], transform=None)


def test_images_of_different_sizes_need_a_resizing_transform(tmp_path: Path) -> None:
    paths = [str(write_image(tmp_path / "a.png", size=(8, 8))), str(write_image(tmp_path / "b.png", size=(9, 8)))]
    with pytest.raises(ResADInputError, match="different sizes"):
        load_images(paths, transform=None)


def test_selection_is_written_as_json(tmp_path: Path) -> None:
    selection = ReferenceSelection("widget", ["a.png", "b.png"], "train split", seed=3)
    data = json.loads(selection.save(tmp_path / "refs" / "widget.json").read_text())
    assert data == {"class_name": "widget", "paths": ["a.png", "b.png"], "source": "train split", "seed": 3, "k": 2}
    assert ReferenceSelection.from_dict(data) == selection


def test_blank_frames_are_recognised(tmp_path: Path) -> None:
    from anomalib_resad.references import is_blank_image

    assert is_blank_image(write_constant(tmp_path / "white.png", 255))
    assert is_blank_image(write_constant(tmp_path / "black.png", 0))
    assert is_blank_image(write_constant(tmp_path / "specks.png", 255, specks=5))  # 99.5 % one value
    assert not is_blank_image(write_image(tmp_path / "noise.png"))


def test_blank_references_are_refused_only_beside_references_that_show_the_part(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from anomalib_resad.references import is_blank_image

    good = [str(write_image(tmp_path / "pool" / f"{index}.png", size=(32, 32))) for index in range(3)]
    blank = str(write_constant(tmp_path / "pool" / "9_blank.png", 255))
    with pytest.raises(ResADInputError, match=r"9_blank\.png.*blank \(uniform\) frames while the other"):
        load_images([good[0], blank], transform=None, references_for=(64, 64))
    uniform = [str(write_constant(tmp_path / "glass" / f"{index}.png", 200 + index)) for index in range(2)]
    with caplog.at_level("WARNING"):  # a uniform product: accepted, and said
        assert load_images(uniform, transform=None, references_for=(64, 64)).shape == (2, 3, 32, 32)
    assert "uniform product" in caplog.text
    for seed in range(10):  # whatever the seed, the blank frame is never drawn, and the draw is still seeded
        drawn = sample_references([*good, blank], 3, seed, usable=lambda path: not is_blank_image(path))
        assert sorted(drawn) == sorted(good)
    # a pool without k structured images is a uniform product: drawn all the same (anomalib's plain dummy data)
    assert len(sample_references([good[0], blank], 2, 0, usable=lambda path: not is_blank_image(path))) == 2


def test_references_much_smaller_than_the_input_are_refused(tmp_path: Path) -> None:
    tiny = [str(write_image(tmp_path / f"{index}.png", size=(16, 16))) for index in range(2)]
    with pytest.raises(ResADInputError, match=r"16x16\).*much smaller than the model's input 224x224.*56x56"):
        load_images(tiny, transform=None, references_for=(224, 224))
    assert load_images(tiny, transform=None, references_for=(64, 64)).shape == (2, 3, 16, 16)  # a quarter: fine


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path: Path) -> None:
    from anomalib_resad.images import is_high_bit_depth, read_rgb

    ramp = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    image = read_rgb(tmp_path / "deep.png")
    assert image.shape == (3, 32, 32) and is_high_bit_depth(tmp_path / "deep.png")
    torch.testing.assert_close(image[0], torch.from_numpy(ramp / 65535.0).float())
    assert float(image.mean()) == pytest.approx(0.5, abs=0.01)  # clipped to 8 bits it would be nearly all white
    assert not is_high_bit_depth(write_image(tmp_path / "plain.png"))
