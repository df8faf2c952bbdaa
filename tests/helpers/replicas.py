# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""Tiny generated replicas of benchmark dataset layouts (the real ones cannot be downloaded here).

Each writes a few 32x32 images per category in the exact folder layout anomalib's datamodule of that dataset reads,
with masks for the anomalous test images. Images of a category share a base colour, so categories differ.
"""

from pathlib import Path

import numpy as np
from PIL import Image

LAYOUTS = ("MVTecAD", "MPDD", "Visa", "BTech", "MVTec3D")


def _image(rng: np.random.Generator, base: int) -> Image.Image:
    pixels = np.clip(base + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def _mask(rng: np.random.Generator) -> Image.Image:
    mask = np.zeros((32, 32), dtype=np.uint8)
    top, left = rng.integers(4, 20, size=2)
    mask[top : top + 8, left : left + 8] = 255
    return Image.fromarray(mask)


def _save(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def make_replica(layout: str, root: Path, categories: list[str], train: int = 4, good: int = 2, bad: int = 2) -> Path:
    """Write a replica of ``layout`` (one of :data:`LAYOUTS`) under ``root`` and return the datamodule root."""
    rng = np.random.default_rng(abs(hash(layout)) % 2**32)
    for index, category in enumerate(categories):
        base = 40 + 50 * index
        if layout in {"MVTecAD", "MPDD", "Visa"}:
            folder = root / "visa_pytorch" / category if layout == "Visa" else root / category
            defect, mask_suffix = ("bad", "") if layout == "Visa" else ("scratch", "_mask")
            for number in range(train):
                _save(_image(rng, base), folder / "train" / "good" / f"{number:03d}.png")
            for number in range(good):
                _save(_image(rng, base), folder / "test" / "good" / f"{number:03d}.png")
            for number in range(bad):
                _save(_image(rng, base + 30), folder / "test" / defect / f"{number:03d}.png")
                _save(_mask(rng), folder / "ground_truth" / defect / f"{number:03d}{mask_suffix}.png")
        elif layout == "BTech":
            folder = root / category
            for number in range(train):
                _save(_image(rng, base), folder / "train" / "ok" / f"{number:04d}.png")
            for number in range(good):
                _save(_image(rng, base), folder / "test" / "ok" / f"{number:04d}.png")
            for number in range(bad):
                _save(_image(rng, base + 30), folder / "test" / "ko" / f"{number:04d}.png")
                _save(_mask(rng), folder / "ground_truth" / "ko" / f"{number:04d}.png")
        elif layout == "MVTec3D":
            import tifffile

            folder = root / category
            splits = [("train", "good", train), ("test", "good", good), ("test", "crack", bad)]
            for split, label, count in splits:
                for number in range(count):
                    name = f"{number:03d}"
                    _save(
                        _image(rng, base + (30 if label != "good" else 0)),
                        folder / split / label / "rgb" / f"{name}.png",
                    )
                    (folder / split / label / "xyz").mkdir(parents=True, exist_ok=True)
                    tifffile.imwrite(folder / split / label / "xyz" / f"{name}.tiff", np.zeros((32, 32, 3), np.float32))
                    if split == "test":
                        mask = _mask(rng) if label != "good" else Image.fromarray(np.zeros((32, 32), np.uint8))
                        _save(mask, folder / split / label / "gt" / f"{name}.png")
        else:
            msg = f"unknown layout {layout}"
            raise ValueError(msg)
    return root
