# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""Small image files the unit tests write: seeded noise (distinct per file name) and near-uniform frames."""

import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def write_image(path: Path, mode: str = "RGB", size: tuple[int, int] = (20, 16)) -> Path:
    """Seeded noise of ``size`` (width, height) in ``mode``; images of different names differ (identical references
    are refused)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = {"RGB": 3, "RGBA": 4}.get(mode)
    shape = (size[1], size[0], channels) if channels else (size[1], size[0])
    seed = zlib.crc32(path.name.encode())
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, shape, dtype=np.uint8), mode=mode).save(path)
    return path


def write_constant(path: Path, value: int, specks: int = 0) -> Path:
    """A 32 x 32 grey frame of ``value`` whose first ``specks`` pixels take the opposite value."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((32, 32), value, dtype=np.uint8)
    pixels.flat[:specks] = 255 - value
    Image.fromarray(pixels, mode="L").save(path)
    return path
