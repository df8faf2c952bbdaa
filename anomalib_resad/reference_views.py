# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""Flipped and rotated views of a class's k reference images: a larger bank from the same k shots.

With k = 2 or 4 normal images, a query feature often has no close match in the bank only because the references
show that structure in another orientation (a circuit track running the other way, a crack or grain turned). The
bank can hold each reference image's mirror images and rotations as well (``reference_views``): the nearest
reference feature is then looked up among all of them. Only the reference *bank* changes - the query images, the
model and its training are untouched - and a class's calibration stays leave-one-out by *image*: a reference is
scored against the other references' views, never against its own (:func:`view_rows`).

* ``"none"``: the k images (the reference);
* ``"flips"``: each image, mirrored left-right, top-bottom, and both (= rotated 180 degrees): 4 views;
* ``"dihedral"``: the 8 symmetries of the square - the 4 above and the same of the transposed image (rotations by 90
  and 270 degrees, mirrors on the diagonals). Needs square images (the pre-processed size).

Images are flipped, not features: a convolutional backbone's features of a flipped image are not the flipped
features (a bank's positions are matched as a set, so flipping feature maps would add nothing).

**Which levels.** Matching costs grow with the bank, and the shallowest level (stride 4) costs the most: with every
level's bank 8x larger, the light model scored an image 5.1x slower (k = 2, busy machine); with the deepest two
levels only, 1.18x (docs/benchmark.md). ``reference_view_levels`` (default 2) puts the views into the banks of the
deepest levels only - the two the nearest-neighbour score reads - and keeps the shallow levels' banks to the images
themselves (:func:`level_views`).

Example:
    >>> images = torch.arange(8.0).reshape(2, 1, 2, 2)
    >>> views = reference_views(images, "flips")
    >>> tuple(views.shape), view_count("flips"), views[0].equal(images[0]), views[4].equal(images[1])
    ((8, 1, 2, 2), 4, True, True)
    >>> view_rows(1, 4)
    slice(4, 8, None)
    >>> level_views("dihedral", num_levels=3, levels=2)
    [1, 8, 8]
"""

from collections.abc import Sequence

import torch

from .errors import ResADConfigurationError, ResADInputError, check_choice

REFERENCE_VIEWS = ("none", "flips", "dihedral")
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
            f"reference_views='dihedral' rotates the references by quarter turns, which needs square images; these "
            f"are {height}x{width}. Pre-process to a square size (image_size=224) or use reference_views='flips'."
        )
        raise ResADInputError(msg)
    views = [images, images.flip(-1), images.flip(-2), images.flip(-2).flip(-1)]
    if mode == "dihedral":
        transposed = images.transpose(-2, -1)
        views += [transposed, transposed.flip(-1), transposed.flip(-2), transposed.flip(-2).flip(-1)]
    return torch.stack(views, dim=1).flatten(0, 1)


def view_rows(index: int, views: int) -> slice:
    """The rows of reference image ``index``'s views in a bank of ``views`` views per image (leave-one-out)."""
    return slice(index * views, (index + 1) * views)


def level_views(mode: str, num_levels: int, levels: int | None) -> list[int]:
    """Views per reference image in each level's bank: the deepest ``levels`` get the mode's, the others 1.

    Args:
        mode (str): ``"none"``, ``"flips"`` or ``"dihedral"``.
        num_levels (int): Number of feature levels.
        levels (int | None): How many of the deepest levels hold the views (``None``: all).

    Returns:
        list[int]: One count per level, shallowest first.
    """
    count = view_count(mode)
    if levels is not None and int(levels) < 0:
        msg = f"reference_view_levels must be >= 0 (or None: every level), got {levels}."
        raise ResADConfigurationError(msg)
    deep = num_levels if levels is None else min(int(levels), num_levels)
    return [1] * (num_levels - deep) + [count] * deep


def keep_views(features: Sequence[torch.Tensor], views: Sequence[int]) -> list[torch.Tensor]:  # or numpy arrays
    """Per-level features of every view ``(k * A, ...)`` -> each level's bank rows: all views, or the images alone.

    ``A`` is the largest of ``views`` (the features must hold ``A`` views per image); a level with 1 keeps each
    image's first view (the image itself).
    """
    count = max(views)
    return [
        level if level_count == count else level[::count] for level, level_count in zip(features, views, strict=True)
    ]
