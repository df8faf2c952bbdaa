# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""Choosing, reading and recording the k normal reference images of a class.

Two sources, both deterministic:

* a folder: its images in sorted order (the first ``k`` when ``k`` is given, as the reference code takes the first
  shots in sorted order);
* a pool of normal images (a category's training split): ``k`` drawn without replacement with a seeded RNG, independent
  of the pool's order.

Example:
    >>> pool = [f"good/{index:03d}.png" for index in range(10)]
    >>> sample_references(pool, k=3, seed=42) == sample_references(list(reversed(pool)), k=3, seed=42)
    True
"""

import json
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from anomalib.data.utils.image import is_image_file
from PIL import Image, UnidentifiedImageError

from .errors import ResADInputError
from .images import read_rgb

logger = logging.getLogger(__name__)

# A frame is blank when nearly all its pixels share one value (std below ~2.5 grey levels, or 99 % of pixels equal):
# black, white and saturated frames, and near-empty scans (../shared/data has one all-white and one 99.9 %-white
# "normal" DeepPCB training image).
_BLANK_STD = 0.01
_BLANK_SHARE = 0.99


@dataclass
class ReferenceSelection:
    """Which images are the references of a class, and how they were chosen.

    Attributes:
        class_name (str): Class the references belong to.
        paths (list[str]): Reference image files, in the order used.
        source (str): Where they come from (a folder, or ``"<datamodule> train split"``).
        seed (int | None): Sampling seed (``None`` for a folder).
    """

    class_name: str
    paths: list[str] = field(default_factory=list)
    source: str = ""
    seed: int | None = None

    @property
    def k(self) -> int:
        """Number of reference images."""
        return len(self.paths)

    def to_dict(self) -> dict:
        """Plain-data form (stored in checkpoints and written next to results)."""
        return {**asdict(self), "k": self.k}

    @classmethod
    def from_dict(cls, data: dict) -> "ReferenceSelection":
        """Inverse of :meth:`to_dict`."""
        return cls(
            class_name=data["class_name"],
            paths=list(data["paths"]),
            source=data.get("source", ""),
            seed=data.get("seed"),
        )

    def save(self, path: str | Path) -> Path:
        """Write the selection as JSON (one file per class and draw makes a run reproducible)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


def check_k(k: int, available: int, where: str) -> None:
    """Raise a clear error when ``k`` is not a usable number of shots for ``available`` images."""
    if k < 1:
        msg = f"The number of reference images k must be at least 1, got {k}."
        raise ResADInputError(msg)
    if available == 0:
        msg = f"No normal reference images found in {where}. ResAD needs k normal images of the class."
        raise ResADInputError(msg)
    if k > available:
        msg = f"k={k} reference images requested but {where} has only {available}. Use k <= {available}."
        raise ResADInputError(msg)


def sample_references(
    pool: Sequence[str],
    k: int,
    seed: int,
    where: str = "the pool",
    usable: Callable[[str], bool] | None = None,
) -> list[str]:
    """Draw ``k`` distinct images from ``pool`` with a seeded RNG (independent of the pool's order).

    Args:
        pool (Sequence[str]): Candidate image paths.
        k (int): Number of references.
        seed (int): RNG seed.
        where (str): Description of the pool, for error messages.
        usable (Callable[[str], bool] | None): Images failing this test (blank frames) are passed over, in the
            seeded order, with a warning naming them - unless fewer than ``k`` pass it: then the pool is a uniform
            product and its first ``k`` images are used (with a warning). Defaults to ``None`` (all usable).

    Returns:
        list[str]: The chosen paths.
    """
    candidates = sorted(set(map(str, pool)))
    check_k(k, len(candidates), where)
    order = random.Random(seed).sample(candidates, len(candidates))
    chosen, skipped = [], []
    for path in order:
        if len(chosen) == k:
            break
        (chosen if usable is None or usable(path) else skipped).append(path)
    if len(chosen) < k:  # a uniform product (glass, paper, a painted panel): its frames are its normal images
        logger.warning(
            "%s holds fewer than k=%d images with visible structure; using uniform frames as references: %s",
            where,
            k,
            order[:k],
        )
        return order[:k]
    if skipped:
        logger.warning("Passed over uniform (blank) reference candidate(s) in %s: %s", where, skipped)
    return chosen


def is_blank_image(path: str | Path) -> bool:
    """Whether an image file is a blank frame (see :func:`is_blank`)."""
    try:
        return is_blank(read_rgb(path))
    except (OSError, UnidentifiedImageError, ValueError):
        return False  # unreadable files are reported by the loader with their own message


def is_blank(image: torch.Tensor) -> bool:
    """Whether an image ``(3, H, W)`` in ``[0, 1]`` is (nearly) constant: no content to compare against."""
    if float(image.std()) < _BLANK_STD:
        return True
    levels = (image.mean(dim=0) * 255).round().to(torch.int64).flatten()
    return float(torch.bincount(levels, minlength=256).max()) >= _BLANK_SHARE * levels.numel()


def list_folder_images(folder: str | Path) -> list[str]:
    """Sorted image files of a folder (recursively).

    Raises:
        ResADInputError: The folder does not exist or holds no images.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        msg = f"Reference folder '{folder}' does not exist. Pass a folder with k normal images of the class."
        raise ResADInputError(msg)
    images = sorted(str(path) for path in folder.rglob("*") if path.is_file() and is_image_file(path))
    if not images:
        msg = f"Reference folder '{folder}' holds no images (.png, .jpg, ...). Put k normal images of the class in it."
        raise ResADInputError(msg)
    return images


def folder_class_name(folder: str | Path) -> str:
    """The class a folder of reference images is of: ``<class>/train/good`` -> ``<class>``, else the folder's name.

    Example:
        >>> folder_class_name("datasets/boards/pcb_12300/train/good"), folder_class_name("refs/new_part")
        ('pcb_12300', 'new_part')
    """
    folder = Path(folder)
    return folder.parent.parent.name if folder.name == "good" and folder.parent.name == "train" else folder.name


def select_folder_references(folder: str | Path, k: int | None, class_name: str) -> ReferenceSelection:
    """References from a folder: all its images, or the first ``k`` in sorted order."""
    images = list_folder_images(folder)
    if k is not None:
        check_k(k, len(images), f"reference folder '{folder}'")
        images = images[:k]
    return ReferenceSelection(class_name=class_name, paths=images, source=str(Path(folder).expanduser()))


def check_reference_images(paths: Sequence[str], images: torch.Tensor, image_size: Sequence[int]) -> None:
    """Refuse references that carry no signal relative to the class; warn about a uniform class.

    * A blank (constant) frame among references that show structure is a dead-camera or empty frame, not the class:
      refused, named. When *every* reference is uniform the class is a uniform product (glass, paper, a painted
      panel): accepted, with a warning.
    * An image much smaller than the model's input (below a quarter of it on a side) is upscaled into a blur that holds
      nothing to compare: refused, named.

    Args:
        paths (Sequence[str]): The reference files.
        images (torch.Tensor): Their pixels as read, ``(k, 3, H, W)`` in ``[0, 1]``, or a list of ``(3, H_i, W_i)``.
        image_size (Sequence[int]): The model's input size ``(H, W)``.

    Raises:
        ResADInputError: Blank frames among structured references, or too small images.
    """
    small = [
        f"{path} ({int(image.shape[-1])}x{int(image.shape[-2])})"
        for path, image in zip(paths, images, strict=True)
        if image.shape[-2] * 4 < int(image_size[0]) or image.shape[-1] * 4 < int(image_size[-1])
    ]
    if small:
        msg = (
            f"Reference image(s) {small} are much smaller than the model's input {int(image_size[-1])}x"
            f"{int(image_size[0])}: upscaled, they hold no detail to compare against. Use images of at least "
            f"{(int(image_size[-1]) + 3) // 4}x{(int(image_size[0]) + 3) // 4} pixels."
        )
        raise ResADInputError(msg)
    blank = [path for path, image in zip(paths, images, strict=True) if is_blank(image)]
    if blank and len(blank) < len(paths):
        msg = (
            f"Reference image(s) {blank} are blank (uniform) frames while the other references show the part: they "
            "carry nothing of the class to compare against. Replace them with normal images of the class."
        )
        raise ResADInputError(msg)
    if blank:
        logger.warning("All %d reference images are uniform frames: a uniform product is scored as such.", len(blank))


def check_image_files(paths: Sequence[str]) -> None:
    """Raise one clear error listing every image file that cannot be read.

    Reads headers only (``PIL.Image.verify``), so it is cheap enough to run over a whole dataset before training.
    """
    unreadable = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image.verify()
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as error:  # noqa: PERF203
            unreadable.append(f"{path} ({type(error).__name__})")
    if unreadable:
        listed = "\n  ".join(unreadable[:20]) + ("\n  ..." if len(unreadable) > 20 else "")
        msg = (
            f"{len(unreadable)} image file(s) cannot be read (corrupt, truncated or not an image):\n  {listed}\n"
            "Replace or remove them; nothing is skipped silently."
        )
        raise ResADInputError(msg)


def load_images(
    paths: Sequence[str],
    transform: Callable[[torch.Tensor], torch.Tensor] | None,
    references_for: Sequence[int] | None = None,
) -> torch.Tensor:
    """Read images as RGB (grayscale, RGBA and 16-bit are converted: :mod:`.images`) and apply ``transform`` to each.

    Args:
        paths (Sequence[str]): Image files.
        transform (Callable | None): e.g. the model's pre-processing transform (resize + normalise).
        references_for (Sequence[int] | None): The images are a class's references for a model of this input size
            ``(H, W)``: check them first (:func:`check_reference_images`). Defaults to ``None``.

    Returns:
        torch.Tensor: ``(N, 3, H, W)`` batch.
    """
    raw = []
    for path in paths:
        try:
            raw.append(read_rgb(path))
        except (OSError, UnidentifiedImageError, ValueError) as error:  # noqa: PERF203
            msg = f"Cannot read image '{path}' ({error}). Replace it with a valid image file."
            raise ResADInputError(msg) from error
    if references_for is not None:
        check_reference_images(paths, raw, references_for)
    images = [transform(image) if transform is not None else image for image in raw]
    sizes = {tuple(image.shape[-2:]) for image in images}
    if len(sizes) > 1:
        msg = (
            f"Reference images have different sizes after pre-processing: {sorted(sizes)}. "
            "Use a pre-processor that resizes to a fixed size."
        )
        raise ResADInputError(msg)
    return torch.stack(images)
