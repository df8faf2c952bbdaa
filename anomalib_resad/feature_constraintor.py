# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""Feature Constraintor: a shallow per-level network that pulls normal residuals into a hypersphere.

As in the paper (Sec. 3.2, "a simple Conv+BN+ReLU layer", the best of its Table 2b ablation) and the reference code
(``models/modules.py: MultiScaleConv``): one ``Conv2d(C, C, 3, padding=1)`` + ``BatchNorm2d`` + ``ReLU`` per level, no
sharing across levels. Built from timm's :class:`~timm.layers.ConvNormAct`. It is trained only by the OCC loss
(:mod:`anomalib_resad.loss`); its output is detached before the normalizing flows.

Example:
    >>> import torch
    >>> constraintor = FeatureConstraintor([8, 16])
    >>> outputs = constraintor([torch.rand(2, 8, 4, 4), torch.rand(2, 16, 2, 2)])
    >>> [tuple(o.shape) for o in outputs], bool(min(float(o.min()) for o in outputs) >= 0)
    ([(2, 8, 4, 4), (2, 16, 2, 2)], True)
"""

from collections.abc import Sequence

import torch
from timm.layers import ConvNormAct
from torch import nn


class FeatureConstraintor(nn.Module):
    """Per-level Conv3x3 + BatchNorm + ReLU.

    Args:
        channels (Sequence[int]): Channels of each feature level.
    """

    def __init__(self, channels: Sequence[int]) -> None:
        super().__init__()
        # bias=True like the reference's nn.Conv2d default (BatchNorm cancels it; kept for parameter parity).
        self.levels = nn.ModuleList(
            ConvNormAct(channel, channel, kernel_size=3, padding=1, bias=True, act_layer=nn.ReLU)
            for channel in channels
        )

    def forward(self, residuals: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Constrain the residual features of every level.

        Args:
            residuals (Sequence[torch.Tensor]): Per-level residuals ``(B, C_l, H_l, W_l)``.

        Returns:
            list[torch.Tensor]: Per-level constrained residuals, same shapes, non-negative.
        """
        return [level(residual) for level, residual in zip(self.levels, residuals, strict=True)]
