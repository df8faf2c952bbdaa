# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""ResAD++ distribution matching: a codebook of normal residuals and Exact Feature Distribution Matching (EFDM).

What the reference code (``models/vq.py``, ``utils.py: applying_EFDM``) adds to the NeurIPS ResAD, as an option
(``ResAD(distribution_matching=True)``):

* **Codebook**, one per level: ``num_codes`` vectors of the level's channel count (an ``nn.Embedding``, initialised
  uniformly in ``(-1 / num_codes, 1 / num_codes)``). Trained on the *raw* residuals (before the Feature Constraintor)
  at normal positions only, with ``mean((sg(q) - r)^2) + 0.25 * mean((q - sg(r))^2)`` where ``q`` is each residual's
  nearest code and ``sg`` stops gradients: the residuals carry no gradient, so only the codebook learns, through the
  second term. The reference gives it its own Adam at lr 1e-5 (``codebook_lr``).
* **EFDM at test time only** (training feeds the raw residuals to the constraintor and the flows): every residual map
  is moved toward the distribution of its nearest codes, per image and channel over the positions - sort both, move
  each residual value ``1 - alpha`` of the way to the code value of the same rank (``alpha = 0.4``: 60 %), un-sort.
  Ranks within a channel are kept; what changes is the value distribution, which becomes more like that of normal
  residuals of the training classes.

Neither anomalib nor FrEIA has a vector-quantised codebook or EFDM, hence this module.

Example:
    >>> import torch
    >>> source = torch.tensor([[[[3.0, 1.0, 2.0]]]])  # (B, C, H, W): one channel, three positions
    >>> target = torch.tensor([[[[10.0, 30.0, 20.0]]]])
    >>> match_feature_distribution(source, target, alpha=0.0)  # exact matching: target's values in source's ranks
    tensor([[[[30., 10., 20.]]]])
"""

from collections.abc import Sequence

import torch
from torch import nn

COMMITMENT = 0.25  # weight of the term that trains the codebook (the reference's)


def match_feature_distribution(source: torch.Tensor, target: torch.Tensor, alpha: float) -> torch.Tensor:
    """Exact Feature Distribution Matching of ``source`` toward ``target``, per image and channel.

    Args:
        source (torch.Tensor): ``(B, C, H, W)`` maps to move.
        target (torch.Tensor): ``(B, C, H, W)`` maps whose value distribution is the goal.
        alpha (float): Share of ``source`` kept: ``0`` = ``target``'s sorted values in ``source``'s ranks, ``1`` =
            ``source`` unchanged (the reference's ``fdm_alpha``, 0.4).

    Returns:
        torch.Tensor: ``source`` with each channel's sorted values moved ``1 - alpha`` of the way to ``target``'s.
    """
    flat_source = source.flatten(start_dim=2)
    sorted_source, order = flat_source.sort(dim=-1)
    sorted_target = target.flatten(start_dim=2).sort(dim=-1).values
    moved = sorted_source + (1.0 - alpha) * (sorted_target - sorted_source)
    return torch.zeros_like(flat_source).scatter(-1, order, moved).view_as(source)


class ResidualCodebook(nn.Module):
    """Per-level codebooks of normal residuals, and EFDM of residual maps toward their nearest codes.

    Args:
        channels (Sequence[int]): Channels of each level's residuals.
        num_codes (int): Codes per level. Defaults to ``1536`` (reference).
        alpha (float): EFDM's share of the residual kept. Defaults to ``0.4`` (reference).
    """

    def __init__(self, channels: Sequence[int], num_codes: int = 1536, alpha: float = 0.4) -> None:
        super().__init__()
        self.alpha = alpha
        self.codebooks = nn.ModuleList(nn.Embedding(num_codes, channel) for channel in channels)
        for codebook in self.codebooks:
            nn.init.uniform_(codebook.weight, -1.0 / num_codes, 1.0 / num_codes)

    def nearest_codes(self, level: int, residual: torch.Tensor) -> torch.Tensor:
        """The nearest code (Euclidean) of every position of a ``(B, C, H, W)`` residual map, in the same layout."""
        batch, channels, height, width = residual.shape
        vectors = residual.permute(0, 2, 3, 1).reshape(-1, channels)
        codes = self.codebooks[level].weight
        distances = codes.pow(2).sum(dim=1) - 2 * vectors @ codes.T  # + |v|^2, the same for every code
        nearest = codes[distances.argmin(dim=1)]
        return nearest.reshape(batch, height, width, channels).permute(0, 3, 1, 2)

    def loss(self, residuals: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> torch.Tensor:
        """Codebook loss on the normal positions (``mask < 0.5``) of raw residuals, summed over levels.

        Args:
            residuals (Sequence[torch.Tensor]): ``(B, C_l, H_l, W_l)`` per level (treated as constants).
            masks (Sequence[torch.Tensor]): ``(B, H_l, W_l)`` anomaly masks per level (1 = anomalous).

        Returns:
            torch.Tensor: The loss (zero when no position is normal).
        """
        total = self.codebooks[0].weight.new_zeros(())
        for level, (raw, mask) in enumerate(zip(residuals, masks, strict=True)):
            residual = raw.detach()
            normal = (mask < 0.5).unsqueeze(1).expand_as(residual)
            if not bool(normal.any()):
                continue
            codes = self.nearest_codes(level, residual)
            total = total + (codes.detach() - residual)[normal].pow(2).mean()
            total = total + COMMITMENT * (codes - residual)[normal].pow(2).mean()
        return total

    def forward(self, residuals: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """EFDM of each level's residual map toward the map of its nearest codes (test time)."""
        return [
            match_feature_distribution(residual, self.nearest_codes(level, residual), self.alpha)
            for level, residual in enumerate(residuals)
        ]
