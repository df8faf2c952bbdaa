# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""An embedded texture anomaly dataset, generated from the photographs that ship inside scikit-image.

No download: every class is a real photograph bundled in the ``scikit-image`` wheel (a dependency of anomalib).
Normal images are crops of it (training crops from the top 60 % of the photograph, test crops from the disjoint bottom
40 %). Defective test images carry one of three synthetic defects with an exact pixel mask:

* ``foreign``: a blob filled with another photograph's texture, matched to the local mean and contrast;
* ``scratch``: a thin random curve, brighter or darker than its surroundings;
* ``stain``: a blob whose brightness and colour are shifted.

The layout is MVTec AD's (``<class>/train/good``, ``test/good``, ``test/<defect>``, ``ground_truth/<defect>``), so
anomalib's ``MVTecAD`` or ``Folder`` read it directly. It is the default dataset of ``resad demo``: train on some
texture classes, detect anomalies in a class never seen in training.

Example:
    >>> root = generate_texture_dataset("/tmp/resad_textures", classes=["brick"], train=4, test=2)  # doctest: +SKIP
    >>> sorted(path.name for path in (root / "brick" / "test").iterdir())  # doctest: +SKIP
    ['foreign', 'good', 'scratch', 'stain']
"""

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage import data as skimage_data

DEFECT_TYPES = ("foreign", "scratch", "stain")

# class name -> (loader of a bundled photograph, crop size in source pixels)
TEXTURES: dict[str, tuple[Callable[[], np.ndarray], int]] = {
    "brick": (skimage_data.brick, 160),
    "grass": (skimage_data.grass, 160),
    "gravel": (skimage_data.gravel, 160),
    "tissue": (skimage_data.immunohistochemistry, 160),
    "stars": (skimage_data.hubble_deep_field, 240),
    "retina": (lambda: skimage_data.retina()[350:1050, 350:1050], 200),
}
# photographs used only as the source of "foreign" defect textures (never a class)
_FOREIGN_SOURCES: tuple[Callable[[], np.ndarray], ...] = (skimage_data.camera, skimage_data.coffee, skimage_data.rocket)


def _rgb(image: np.ndarray) -> np.ndarray:
    image = image.astype(np.float32) / 255.0
    return np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3]


def _crop(source: np.ndarray, size: int, rows: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    height, width = source.shape[:2]
    top_min, top_max = int(rows[0] * height), int(rows[1] * height) - size
    top = int(rng.integers(top_min, max(top_min, top_max) + 1))
    left = int(rng.integers(0, width - size + 1))
    return source[top : top + size, left : left + size]


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    pil = Image.fromarray(np.clip(image * 255, 0, 255).astype(np.uint8))
    return np.asarray(pil.resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0


def _blob(size: int, rng: np.random.Generator, area: tuple[float, float] = (0.01, 0.05)) -> np.ndarray:
    """An irregular connected blob covering ``area`` of the image, at a random place."""
    for _ in range(20):
        noise = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma=size / 16)
        center = rng.uniform(0.2, 0.8, size=2) * size
        yy, xx = np.mgrid[:size, :size]
        radius = size * np.sqrt(rng.uniform(*area) / np.pi)
        window = np.exp(-(((yy - center[0]) ** 2 + (xx - center[1]) ** 2) / (2 * radius**2)))
        field = window * (1 + 2 * noise / (noise.std() + 1e-8))
        threshold = np.quantile(field, 1 - rng.uniform(*area))
        labels, count = ndimage.label(field > threshold)
        if count:
            sizes = ndimage.sum(np.ones_like(field), labels, index=range(1, count + 1))
            blob = labels == (1 + int(np.argmax(sizes)))
            if blob.sum() >= 0.004 * size * size:
                return blob
    msg = "could not draw a defect blob"
    raise RuntimeError(msg)


def _scratch(size: int, rng: np.random.Generator) -> np.ndarray:
    """A thin random curve (a smoothed random walk)."""
    steps = int(rng.integers(size // 4, size // 2))
    angle = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, 0.08, steps))
    start = rng.uniform(0.25, 0.75, size=2) * size
    points = start + np.cumsum(np.stack([np.sin(angle), np.cos(angle)], axis=1), axis=0)
    mask = np.zeros((size, size), dtype=bool)
    rows, cols = np.clip(points.round().astype(int), 0, size - 1).T
    mask[rows, cols] = True
    return ndimage.binary_dilation(mask, iterations=int(rng.integers(1, 3)))


def _add_defect(
    image: np.ndarray,
    kind: str,
    rng: np.random.Generator,
    foreign: Sequence[np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    result = image.copy()
    if kind == "scratch":
        mask = _scratch(size, rng)
        shift = rng.choice([-1.0, 1.0]) * rng.uniform(0.25, 0.45)
        result[mask] = np.clip(result[mask] + shift, 0, 1)
        return result, mask
    mask = _blob(size, rng)
    if kind == "foreign":
        source = foreign[int(rng.integers(len(foreign)))]
        patch = _resize(_crop(source, min(source.shape[:2]) // 2, (0.0, 1.0), rng), size)
        local, patch_local = image[mask], patch[mask]
        patch = (patch - patch_local.mean()) / (patch_local.std() + 1e-6) * local.std() + local.mean()
        result[mask] = np.clip(patch[mask], 0, 1)
    else:  # stain: brightness and colour shift
        tint = rng.uniform(0.6, 1.4, size=3) * rng.choice([0.6, 1.5])
        result[mask] = np.clip(result[mask] * tint, 0, 1)
    return result, mask


def _save(image: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(image * 255, 0, 255).round().astype(np.uint8)).save(path)


def generate_texture_dataset(
    root: str | Path,
    classes: Sequence[str] = tuple(TEXTURES),
    train: int = 40,
    test: int = 12,
    image_size: int = 256,
    seed: int = 0,
) -> Path:
    """Write the texture dataset (idempotent: classes already complete are kept).

    Args:
        root (str | Path): Output folder; one sub-folder per class.
        classes (Sequence[str]): Classes, from :data:`TEXTURES`. Defaults to all.
        train (int): Normal training images per class. Defaults to ``40``.
        test (int): Normal test images per class, and defective test images per defect type. Defaults to ``12``.
        image_size (int): Side of the square images. Defaults to ``256``.
        seed (int): Seed of every random choice. Defaults to ``0``.

    Returns:
        Path: ``root``.
    """
    root = Path(root)
    unknown = sorted(set(classes) - set(TEXTURES))
    if unknown:
        msg = f"Unknown texture class(es) {unknown}; available: {sorted(TEXTURES)}."
        raise ValueError(msg)
    foreign = [_rgb(load()) for load in _FOREIGN_SOURCES]
    for class_index, name in enumerate(classes):
        marker = root / name / ".complete"
        if marker.is_file() and marker.read_text() == f"{train},{test},{image_size},{seed}":
            continue
        load, crop_size = TEXTURES[name]
        source = _rgb(load())
        rng = np.random.default_rng([seed, class_index, len(name)])
        for index in range(train):
            normal = _resize(_crop(source, crop_size, (0.0, 0.6), rng), image_size)
            _save(normal, root / name / "train/good" / f"{index:03d}.png")
        for index in range(test):
            normal = _resize(_crop(source, crop_size, (0.6, 1.0), rng), image_size)
            _save(normal, root / name / "test/good" / f"{index:03d}.png")
        for kind in DEFECT_TYPES:
            for index in range(test):
                normal = _resize(_crop(source, crop_size, (0.6, 1.0), rng), image_size)
                defective, mask = _add_defect(normal, kind, rng, foreign)
                _save(defective, root / name / "test" / kind / f"{index:03d}.png")
                _save(mask.astype(np.float32), root / name / "ground_truth" / kind / f"{index:03d}_mask.png")
        marker.write_text(f"{train},{test},{image_size},{seed}")
    return root
