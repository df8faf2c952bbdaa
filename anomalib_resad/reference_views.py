# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""Flipped and rotated views of a class's k reference images: a larger bank from the same k shots.

With k = 2 or 4 normal images, a query feature often has no close match in the bank only because the references
show that structure in another orientation (a circuit track running the other way, a crack or grain turned). A
class's evaluation bank therefore also holds each reference image's mirror images and rotations on the two deepest
levels - the ones the nearest-neighbour score reads: the 8 symmetries of the square (``"dihedral"``) for a square
input, its 4 flips (``"flips"``) otherwise (a quarter turn would change the image's size). The shallowest level, the
costliest to match (stride 4), keeps the images alone. Not in the reference code; measured on the development
settings and the held-out-domain folds (docs/benchmark.md).

Only the reference *bank* changes - the query images, the model and its training are untouched - and a class's
scoring stays leave-one-out by *image*: a reference is scored against the other references' views, never against its
own (:func:`~anomalib_resad.calibration.leave_one_out_banks`). Images are flipped, not features: a convolutional
backbone's features of a flipped image are not the flipped features.

Example:
    >>> images = torch.arange(8.0).reshape(2, 1, 2, 2)
    >>> views = reference_views(images, "flips")
    >>> tuple(views.shape), view_count("flips"), views[0].equal(images[0]), views[4].equal(images[1])
    ((8, 1, 2, 2), 4, True, True)
    >>> level_views((224, 224), num_levels=3)
    [1, 8, 8]
"""

from collections.abc import Sequence

import torch

from .calibration import NEAREST_LEVELS
from .errors import ResADInputError, check_choice

REFERENCE_VIEWS = ("none", "flips", "dihedral")
VIEW_LEVELS = NEAREST_LEVELS  # the levels whose banks hold the views
_COUNTS = {"none": 1, "flips": 4, "dihedral": 8}


def view_count(mode: str) -> int:
    """Views per reference image of a ``reference_views`` mode (1, 4 or 8)."""
    check_choice("reference_views", mode, REFERENCE_VIEWS)
    return _COUNTS[mode]


def reference_views(images: torch.Tensor, mode: str) -> torch.Tensor:
    """Each image's views, image by image: rows ``i * A .. (i + 1) * A - 1`` are image ``i``'s, itself first.

    Args:
        images (torch.Tensor): ``(k, C, H, W)`` images (pixels or pre-processed).
        mode (str): ``"none"``, ``"flips"`` or ``"dihedral"``.

    Returns:
        torch.Tensor: ``(k * A, C, H, W)`` with ``A = view_count(mode)``.

    Raises:
        ResADInputError: ``"dihedral"`` on non-square images (a quarter turn would change their size).
    """
    count = view_count(mode)
    if count == 1:
        return images
    height, width = images.shape[-2:]
    if mode == "dihedral" and height != width:
        msg = (
            f"Dihedral views rotate the references by quarter turns, which needs square images; these are "
            f"{height}x{width}. Pre-process to a square size (image_size=224) or use flips."
        )
        raise ResADInputError(msg)
    views = [images, images.flip(-1), images.flip(-2), images.flip(-2).flip(-1)]
    if mode == "dihedral":
        transposed = images.transpose(-2, -1)
        views += [transposed, transposed.flip(-1), transposed.flip(-2), transposed.flip(-2).flip(-1)]
    return torch.stack(views, dim=1).flatten(0, 1)


def views_mode(image_size: Sequence[int]) -> str:
    """The views a bank of images of this size holds: ``"dihedral"`` for a square size, ``"flips"`` otherwise."""
    return "dihedral" if int(image_size[0]) == int(image_size[-1]) else "flips"


def level_views(image_size: Sequence[int], num_levels: int, levels: int = VIEW_LEVELS) -> list[int]:
    """Views per reference image in each level's bank: the deepest ``levels`` get the size's views, the others 1.

    Args:
        image_size (Sequence[int]): The pre-processed ``(H, W)``.
        num_levels (int): Number of feature levels.
        levels (int): How many of the deepest levels hold the views. Defaults to the two of the nearest score.

    Returns:
        list[int]: One count per level, shallowest first.
    """
    deep = min(int(levels), num_levels)
    return [1] * (num_levels - deep) + [view_count(views_mode(image_size))] * deep


def keep_views(features: Sequence[torch.Tensor], views: Sequence[int]) -> list[torch.Tensor]:  # or numpy arrays
    """Per-level features of every view ``(k * A, ...)`` -> each level's bank rows: all views, or the images alone.

    ``A`` is the largest of ``views`` (the features must hold ``A`` views per image); a level with 1 keeps each
    image's first view (the image itself).
    """
    count = max(views)
    return [
        level if level_count == count else level[::count] for level, level_count in zip(features, views, strict=True)
    ]
