# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""Synthetic defects pasted into a class's reference images: what lets k normal images choose how to match.

The nearest-neighbour score can match features as they are (position-precise: small, precise changes on aligned parts
such as circuit boards stand out) or after PatchCore's 3 x 3 neighbourhood averaging (stochastic textures stop
drowning defects in their own variation). Which one a class needs cannot be read from normal images alone; it can be
read from defects pasted into them (:func:`~anomalib_resad.calibration.leave_one_out_scoring` scores them).
Three kinds, in turn: anomalib's Perlin-noise blends (:class:`~anomalib.data.utils.generators.perlin.
PerlinAnomalyGenerator`, reused: large irregular areas), round spots of 2-4 % of the side (pinholes, blowholes,
missing copper) and thin straight scratches 10-30 % of the side long.

Every defect is written in the image's own value range (each channel's minimum and maximum in the image), so the same
defects come out whether the images are ``[0, 1]`` pixels or already normalised: generating them before or after a
per-channel normalisation gives the same result. The global random state is left as it was (seeded, forked).

Example:
    >>> images = torch.rand(2, 3, 32, 32)
    >>> defects = synthetic_defects(images, count=3, seed=0)
    >>> tuple(defects.shape), bool((defects[0, 0] != images[0]).any())
    ((2, 3, 3, 32, 32), True)
"""

import math

import torch
from anomalib.data.utils.generators.perlin import PerlinAnomalyGenerator

DEFECTS_PER_IMAGE = 12


def synthetic_defects(images: torch.Tensor, count: int = DEFECTS_PER_IMAGE, seed: int = 0) -> torch.Tensor:
    """``count`` defective copies of each image.

    Args:
        images (torch.Tensor): ``(k, 3, H, W)`` images, pixels or normalised.
        count (int): Defects per image (Perlin, spot, scratch in turn). Defaults to ``12``.
        seed (int): Seed of the defects. Defaults to ``0``.

    Returns:
        torch.Tensor: ``(k, count, 3, H, W)``.
    """
    height, width = images.shape[-2:]
    rng = torch.Generator().manual_seed(seed)
    rows = torch.arange(height, dtype=torch.float32).view(-1, 1)
    cols = torch.arange(width, dtype=torch.float32).view(1, -1)
    side = min(height, width)
    out = []
    with torch.random.fork_rng(devices=[]):  # the Perlin generator draws from the global generator
        torch.manual_seed(seed)  # its constructor draws too (a solarize threshold)
        perlin = PerlinAnomalyGenerator(probability=1.0, blend_factor=(0.5, 1.0))
        for image in images.detach().float().cpu():
            low = image.flatten(start_dim=1).amin(dim=1).view(-1, 1, 1)
            span = (image.flatten(start_dim=1).amax(dim=1).view(-1, 1, 1) - low).clamp(min=1e-6)
            unit = (image - low) / span  # [0, 1] per channel: the defects are written in these units
            copies = []
            for index in range(count):
                shade = float(torch.rand(1, generator=rng) < 0.5)
                y, x = (torch.rand(2, generator=rng) * torch.tensor([height, width])).tolist()
                if index % 3 == 0:
                    torch.manual_seed(int(torch.randint(1 << 30, (1,), generator=rng)))
                    defective, _ = perlin(unit)
                elif index % 3 == 1:
                    radius = (0.02 + 0.02 * float(torch.rand(1, generator=rng))) * side
                    mask = (((rows - y) ** 2 + (cols - x) ** 2).sqrt() < radius).float()
                    defective = unit * (1 - mask) + shade * mask
                else:
                    length = (0.1 + 0.2 * float(torch.rand(1, generator=rng))) * side
                    angle = float(torch.rand(1, generator=rng)) * math.pi
                    along = (rows - y) * math.sin(angle) + (cols - x) * math.cos(angle)
                    across = ((rows - y) * math.cos(angle) - (cols - x) * math.sin(angle)).abs()
                    mask = ((along.abs() < length / 2) & (across < max(1.0, 0.005 * side))).float()
                    defective = unit * (1 - mask) + shade * mask
                copies.append(defective.clamp(0, 1) * span + low)
            out.append(torch.stack(copies))
    return torch.stack(out).to(device=images.device, dtype=images.dtype)
