# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""The server's class folder and request parsing, without a server (tests/e2e/test_serve.py runs one)."""

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalib_resad.serve import ClassStore, ServeError, decode_image, decode_map_png, encode_map_png, form_k


def test_a_failed_build_leaves_no_file_and_a_good_one_replaces_atomically(tmp_path: Path) -> None:
    store = ClassStore(tmp_path)

    def failing(path: Path) -> None:
        path.write_bytes(b"half a file")
        raise ServeError(422, "cannot calibrate")

    with pytest.raises(ServeError, match="cannot calibrate"):
        store.write("part", failing)
    assert list(tmp_path.iterdir()) == []  # neither the class nor its temporary file
    store.write("part", lambda path: path.write_bytes(b"first"))
    with pytest.raises(ServeError) as refused:
        store.write("part", lambda path: path.write_bytes(b"second"))
    assert refused.value.status == 409
    store.write("part", lambda path: path.write_bytes(b"second"), replace=True)
    assert (tmp_path / "part.npz").read_bytes() == b"second"
    (tmp_path / ".other.123.npz.partial").write_bytes(b"being written")
    assert store.names() == ["part"]


@pytest.mark.parametrize("name", ["../up", "a/b", "", ".hidden", "x" * 65, "sp ace"])
def test_class_names_that_are_not_plain_file_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ServeError) as refused:
        ClassStore(tmp_path).path(name)
    assert refused.value.status == 400


def test_uploaded_bytes_decode_like_anomalibs_read_image(tmp_path: Path) -> None:
    from anomalib.data.utils.image import read_image

    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 4), dtype=np.uint8)  # RGBA: converted to RGB
    Image.fromarray(pixels, mode="RGBA").save(tmp_path / "x.png")
    np.testing.assert_array_equal(decode_image((tmp_path / "x.png").read_bytes()), read_image(tmp_path / "x.png"))
    with pytest.raises(ServeError, match=r"'notes\.txt' is not an image") as refused:
        decode_image(b"plain text", "notes.txt")
    assert refused.value.status == 400


def test_the_map_png_keeps_16_bits(tmp_path: Path) -> None:
    values = np.random.default_rng(1).random((1, 13, 11))
    decoded = decode_map_png(encode_map_png(values))
    assert decoded.shape == (13, 11)
    assert np.abs(decoded - values[0]).max() <= 0.5 / 65535 + 1e-9
    with Image.open(io.BytesIO(base64.b64decode(encode_map_png(values)))) as image:
        assert image.format == "PNG" and image.mode.startswith("I;16")


@pytest.mark.parametrize(("value", "expected"), [(None, None), ("", None), ("2", 2), (" 8 ", 8)])
def test_k_field(value: str | None, expected: int | None) -> None:
    assert form_k(value) == expected


@pytest.mark.parametrize("value", ["1", "0", "-3", "four"])
def test_k_field_refusals(value: str) -> None:
    with pytest.raises(ServeError) as refused:
        form_k(value)
    assert refused.value.status == 400
