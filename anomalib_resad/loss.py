# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""ResAD losses: the OCC loss of the Feature Constraintor and the flows' likelihood losses.

Ports of the reference code's exact formulas (``losses/loss.py``, ``train.py``), written as masked means so that a
batch with or without anomalous positions runs the same tensor code (no Python branches, no host syncs).
``sp`` is softplus (``-logsigmoid(-x)``), ``sg`` stop-gradient; masks are 1 at anomalous positions.

OCC losses (per level on flattened positions; ``e`` constrained and ``t`` raw residual, ``A = sqrt(|e| + 1) - 1``):

* ``"log_barrier"`` (reference code, default; ResAD++'s "log-barrier bidirectional contraction"): normal norms
  are squeezed into a thin shell ``[r_min, r_max]`` with ``r_max = min(0.9 * min A_abnormal, 0.4)`` (0.4 without
  anomalies), ``r_min = 0.99 r_max``, through ``sp(A - r_max) * sg(exp(A - r_max))`` and its mirror; anomalous
  positions keep their residual (MSE + cosine to ``t``) and are pushed beyond ``r_max + 0.1``. Summed over levels.
* ``"paper"`` (NeurIPS Eq. 2, abnormal-invariant OCC): ``(1 - y) * A + y * |e - t|_2``, averaged over positions and
  levels.

Flow loss per level on per-dimension log-likelihoods ``l_n`` (normal Gaussian) and ``l_a`` (Gaussian at 1):
``mean_normal sp(-l_n)``, plus, when the positions include anomalies, ``mean_abnormal sp(-l_a)`` + focal
loss (gamma 2) of ``softmax([l_n, l_a])`` + ``lambda * (mean_{normal, l_n <= b_n} sp(b_n - l_n) +
mean_{abnormal, l_n >= b_n - tau} sp(l_n - b_n + tau))``. ``b_n`` is an EMA (momentum 0.9, from 0) of the 5 % lower
quantile of the normal ``l_n``, updated before use at every step.

Example:
    >>> import torch
    >>> loss = ResADLoss(num_levels=1)
    >>> residuals = [torch.rand(2, 4, 3, 3, requires_grad=True)]
    >>> masks = [torch.zeros(2, 3, 3)]
    >>> bool(loss.occ_loss(residuals, [r.detach() for r in residuals], masks) >= 0)
    True
"""

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from .errors import check_choice
from .feature_converter import flatten_positions

OCC_LOSSES = ("log_barrier", "paper")


def masked_mean(values: torch.Tensor, selector: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``selector`` is true; 0 when nothing is selected."""
    selector = selector.to(values.dtype)
    return (values * selector).sum() / selector.sum().clamp(min=1.0)


def _barrier(excess: torch.Tensor) -> torch.Tensor:
    """The reference's weighted log-barrier ``sp(x) * sg(exp(x))`` (applied where ``x > 0``)."""
    return F.softplus(excess) * torch.exp(excess).detach()


def log_barrier_occ_loss(features: torch.Tensor, mask: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """OCC loss of the reference code (``calculate_log_barrier_bi_occ_loss``) for one level.

    Args:
        features (torch.Tensor): Constrained residuals ``(N, C)``.
        mask (torch.Tensor): ``(N,)``, 1 at anomalous positions.
        target (torch.Tensor): Raw (detached) residuals ``(N, C)``.

    Returns:
        torch.Tensor: Scalar loss.
    """
    radius = torch.sqrt(features.norm(dim=1) + 1) - 1
    abnormal = mask > 0.5
    normal = ~abnormal
    has_abnormal = abnormal.any()
    smallest_abnormal = torch.where(abnormal, radius.detach(), torch.full_like(radius, float("inf"))).min()
    r_max = torch.where(has_abnormal, torch.clamp(0.9 * smallest_abnormal, max=0.4), radius.new_tensor(0.4))
    r_min = 0.99 * r_max
    loss = masked_mean(_barrier(radius - r_max), normal & (radius > r_max))
    loss = loss + masked_mean(_barrier(r_min - radius), normal & (radius < r_min))
    # anomalous positions: keep the residual (abnormal invariance) and push it out of the shell
    invariance = (features - target).pow(2).mean(dim=1)
    cosine = 1 - F.cosine_similarity(features, target, dim=1)
    boundary = r_max + 0.1
    loss = loss + masked_mean(invariance, abnormal) + masked_mean(cosine, abnormal)
    return loss + masked_mean(_barrier(boundary - radius), abnormal & (radius < boundary))


def paper_occ_loss(features: torch.Tensor, mask: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Abnormal-invariant OCC loss of the NeurIPS paper (Eq. 2) for one level.

    Args:
        features (torch.Tensor): Constrained residuals ``(N, C)``.
        mask (torch.Tensor): ``(N,)``, 1 at anomalous positions.
        target (torch.Tensor): Raw (detached) residuals ``(N, C)``.

    Returns:
        torch.Tensor: Scalar loss, averaged over positions.
    """
    abnormal = (mask > 0.5).to(features.dtype)
    pull = torch.sqrt(features.norm(dim=1) + 1) - 1
    invariance = (features - target).norm(dim=1)
    return ((1 - abnormal) * pull + abnormal * invariance).mean()


def focal_loss(
    probabilities: torch.Tensor,
    target: torch.Tensor,
    gamma: float = 2.0,
    smooth: float = 1e-5,
) -> torch.Tensor:
    """Binary focal loss on class probabilities, with the reference's label smoothing.

    Args:
        probabilities (torch.Tensor): ``(N, 2)`` probabilities of (normal, abnormal).
        target (torch.Tensor): ``(N,)`` labels in {0, 1}.
        gamma (float): Focusing parameter. Defaults to ``2``.
        smooth (float): Label smoothing. Defaults to ``1e-5``.

    Returns:
        torch.Tensor: Mean focal loss.
    """
    one_hot = F.one_hot(target.long(), num_classes=2).to(probabilities.dtype).clamp(smooth, 1.0 - smooth)
    p_true = (one_hot * probabilities).sum(dim=1) + smooth
    return (-((1 - p_true) ** gamma) * torch.log(p_true)).mean()


class ResADLoss(nn.Module):
    """OCC and flow losses, with the running normal log-likelihood boundaries of the flow loss.

    Args:
        num_levels (int): Number of feature levels.
        occ_loss (str): ``"log_barrier"`` (reference code) or ``"paper"`` (NeurIPS Eq. 2). Defaults to
            ``"log_barrier"``.
        pos_beta (float): Quantile of normal log-likelihoods that defines the normal boundary. Defaults to ``0.05``.
        margin_tau (float): Margin between normal and abnormal boundaries. Defaults to ``0.1``.
        bgspp_lambda (float): Weight of the boundary-guided semi-push-pull terms. Defaults to ``1``.
        boundary_momentum (float): EMA momentum of the boundaries. Defaults to ``0.9``.

    Attributes:
        normal_boundary (torch.Tensor): ``(L,)`` running normal boundaries ``b_n``.
    """

    def __init__(
        self,
        num_levels: int,
        occ_loss: str = "log_barrier",
        pos_beta: float = 0.05,
        margin_tau: float = 0.1,
        bgspp_lambda: float = 1.0,
        boundary_momentum: float = 0.9,
    ) -> None:
        super().__init__()
        check_choice("OCC loss", occ_loss, OCC_LOSSES)
        self.occ_type = occ_loss
        self.pos_beta = pos_beta
        self.margin_tau = margin_tau
        self.bgspp_lambda = bgspp_lambda
        self.boundary_momentum = boundary_momentum
        self.register_buffer("normal_boundary", torch.zeros(num_levels))

    def occ_loss(
        self,
        constrained: Sequence[torch.Tensor],
        residuals: Sequence[torch.Tensor],
        masks: Sequence[torch.Tensor],
    ) -> torch.Tensor:
        """OCC loss over all levels.

        Args:
            constrained (Sequence[torch.Tensor]): Constraintor outputs ``(B, C_l, H_l, W_l)``.
            residuals (Sequence[torch.Tensor]): Raw residuals (targets), same shapes; detached here.
            masks (Sequence[torch.Tensor]): Per-level masks ``(B, H_l, W_l)``.

        Returns:
            torch.Tensor: Scalar loss (sum over levels for ``"log_barrier"``, mean for ``"paper"``).
        """
        level_loss = log_barrier_occ_loss if self.occ_type == "log_barrier" else paper_occ_loss
        losses = []
        for features, target, mask in zip(constrained, residuals, masks, strict=True):
            losses.append(level_loss(flatten_positions(features), mask.reshape(-1), flatten_positions(target.detach())))
        total = torch.stack(losses).sum()
        return total if self.occ_type == "log_barrier" else total / len(losses)

    @torch.no_grad()
    def update_boundary(self, level: int, log_normal: torch.Tensor, mask: torch.Tensor) -> None:
        """EMA update of the normal boundary with the ``pos_beta`` quantile of this step's normal log-likelihoods."""
        normal = log_normal[mask < 0.5]
        if normal.numel() == 0:
            return
        rank = int(normal.numel() * self.pos_beta)  # the reference's sorted-index quantile
        quantile = torch.sort(normal).values[rank]
        momentum = self.boundary_momentum
        self.normal_boundary[level] = momentum * self.normal_boundary[level] + (1 - momentum) * quantile

    def flow_loss(
        self,
        level: int,
        log_normal: torch.Tensor,
        log_abnormal: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """Flow loss of one level; updates that level's normal boundary first, as the reference does.

        Args:
            level (int): Level index.
            log_normal (torch.Tensor): ``(N,)`` per-dimension log-likelihoods under the normal Gaussian.
            log_abnormal (torch.Tensor): ``(N,)`` the same under the abnormal Gaussian.
            mask (torch.Tensor): ``(N,)``, 1 at anomalous positions.

        Returns:
            torch.Tensor: Scalar loss.
        """
        self.update_boundary(level, log_normal.detach(), mask)
        abnormal = mask > 0.5
        normal = ~abnormal
        loss = masked_mean(F.softplus(-log_normal), normal)
        if not bool(abnormal.any()):
            return loss
        b_normal = self.normal_boundary[level]
        b_abnormal = b_normal - self.margin_tau
        probabilities = torch.softmax(torch.stack([log_normal, log_abnormal], dim=1), dim=1)
        loss = loss + masked_mean(F.softplus(-log_abnormal), abnormal) + focal_loss(probabilities, abnormal)
        push_pull = masked_mean(F.softplus(b_normal - log_normal), normal & (log_normal <= b_normal))
        push_pull = push_pull + masked_mean(F.softplus(log_normal - b_abnormal), abnormal & (log_normal >= b_abnormal))
        return loss + self.bgspp_lambda * push_pull
