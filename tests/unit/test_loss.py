# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""Losses: equal to transcriptions of the reference code, and they train a toy model."""

import pytest
import torch
from torch.nn import functional as F  # noqa: N812

from anomalib_resad.feature_constraintor import FeatureConstraintor
from anomalib_resad.loss import ResADLoss, focal_loss, log_barrier_occ_loss, masked_mean, paper_occ_loss
from anomalib_resad.residual_flow import ResidualFlow


# ---------------------------------------------------------------- literal transcriptions of xcyao00/ResAD (test only)
def reference_occ(features: torch.Tensor, mask: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """losses/loss.py: calculate_log_barrier_bi_occ_loss, with its Python branches."""
    radius = torch.sqrt(features.norm(dim=1) + 1) - 1
    abnormal_radius = radius[mask == 1]
    if torch.sum(mask == 1) != 0:
        r_max = min(0.9 * abnormal_radius.min().item(), 0.4)
        r_min = r_max * 0.99
    else:
        r_max, r_min = 0.4, 0.99 * 0.4
    loss = 0
    if torch.sum(mask == 0) != 0:
        normal = radius[mask == 0]
        larger, lower = normal[normal > r_max], normal[normal < r_min]
        if larger.shape[0]:
            loss = loss + torch.mean(-F.logsigmoid(-(larger - r_max)) * torch.exp(larger - r_max).detach())
        if lower.shape[0]:
            loss = loss + torch.mean(-F.logsigmoid(-(r_min - lower)) * torch.exp(r_min - lower).detach())
    if torch.sum(mask == 1) != 0:
        anomalous, targets = features[mask == 1], target[mask == 1]
        loss = loss + F.mse_loss(anomalous, targets) + torch.mean(1 - F.cosine_similarity(anomalous, targets))
        boundary = r_max + 0.1
        inside = abnormal_radius[abnormal_radius < boundary]
        if inside.shape[0]:
            loss = loss + torch.mean(-F.logsigmoid(-(boundary - inside)) * torch.exp(boundary - inside).detach())
    return loss


def reference_flow_loss(log_normal, log_abnormal, mask, boundary, tau=0.1, weight=1.0):
    """train.py: the stage-2 branch with anomalies (boundary already updated)."""
    loss_ml = torch.mean(-F.logsigmoid(log_normal[mask == 0]))
    loss_ml_a = torch.mean(-F.logsigmoid(log_abnormal[mask == 1]))
    s = torch.softmax(torch.stack([log_normal, log_abnormal], dim=-1), dim=-1)
    one_hot = F.one_hot(mask.long(), 2).float().clamp(1e-5, 1 - 1e-5)
    pt = (one_hot * s).sum(1) + 1e-5
    loss_focal = (-((1 - pt) ** 2) * pt.log()).mean()
    normal = log_normal[mask == 0]
    normal = normal[normal <= boundary]
    loss_n = torch.mean(-F.logsigmoid(-(boundary - normal))) if normal.numel() else 0
    anomalous = log_normal[mask == 1]
    anomalous = anomalous[anomalous >= boundary - tau]
    loss_a = torch.mean(-F.logsigmoid(-(anomalous - boundary + tau))) if anomalous.numel() else 0
    return loss_ml + loss_ml_a + loss_focal + weight * (loss_n + loss_a)


# ---------------------------------------------------------------- tests
def test_masked_mean_of_nothing_is_zero() -> None:
    assert float(masked_mean(torch.tensor([1.0, 2.0]), torch.tensor([False, False]))) == 0.0
    assert float(masked_mean(torch.tensor([1.0, 2.0, 6.0]), torch.tensor([True, False, True]))) == 3.5


@pytest.mark.parametrize("abnormal_share", [0.0, 0.3])
def test_occ_loss_equals_reference_code(abnormal_share: float) -> None:
    generator = torch.Generator().manual_seed(1)
    features = torch.rand(200, 8, generator=generator) * torch.rand(200, 1, generator=generator)
    target = torch.rand(200, 8, generator=generator)
    mask = (torch.rand(200, generator=generator) < abnormal_share).float()
    torch.testing.assert_close(log_barrier_occ_loss(features, mask, target), reference_occ(features, mask, target))


def test_occ_loss_is_zero_on_the_shell_and_pulls_outliers_in() -> None:
    norm = (1 + 0.398) ** 2 - 1  # radius A = 0.398, inside [0.396, 0.4]
    on_shell = F.normalize(torch.rand(10, 4), dim=1) * norm
    assert float(log_barrier_occ_loss(on_shell, torch.zeros(10), on_shell)) == 0.0
    outside = (on_shell * 3).requires_grad_()
    log_barrier_occ_loss(outside, torch.zeros(10), on_shell).backward()
    assert float((outside.grad * outside.detach()).sum()) > 0  # gradient descent shrinks the norms


def test_paper_occ_loss_formula() -> None:
    features = torch.tensor([[3.0, 4.0], [1.0, 1.0]])
    target = torch.tensor([[0.0, 0.0], [1.0, 4.0]])
    mask = torch.tensor([0.0, 1.0])
    expected = ((torch.sqrt(torch.tensor(5.0) + 1) - 1) + 3.0) / 2  # normal: sqrt(|e|+1)-1, abnormal: |e - t|
    torch.testing.assert_close(paper_occ_loss(features, mask, target), expected)


def test_flow_loss_equals_reference_code_and_updates_boundary_first() -> None:
    generator = torch.Generator().manual_seed(2)
    log_normal, log_abnormal = torch.randn(300, generator=generator), torch.randn(300, generator=generator)
    mask = (torch.rand(300, generator=generator) < 0.2).float()
    loss = ResADLoss(num_levels=1)
    loss.normal_boundary[0] = -0.5
    value = loss.flow_loss(0, log_normal, log_abnormal, mask)
    normal = log_normal[mask == 0]
    quantile = torch.sort(normal).values[int(normal.numel() * 0.05)]
    boundary = 0.9 * -0.5 + 0.1 * quantile
    torch.testing.assert_close(loss.normal_boundary[0], boundary)
    torch.testing.assert_close(value, reference_flow_loss(log_normal, log_abnormal, mask, boundary))


def test_flow_loss_without_anomalies_is_the_sigmoid_likelihood_loss() -> None:
    log_normal = torch.randn(50)
    value = ResADLoss(num_levels=1).flow_loss(0, log_normal, torch.randn(50), torch.zeros(50))
    torch.testing.assert_close(value, F.softplus(-log_normal).mean())


def test_focal_loss_is_small_for_confident_correct_predictions() -> None:
    confident = torch.tensor([[0.99, 0.01], [0.02, 0.98]])
    wrong = confident.flip(1)
    labels = torch.tensor([0, 1])
    assert float(focal_loss(confident, labels)) < 1e-3 < float(focal_loss(wrong, labels))


@pytest.mark.parametrize("occ", ["log_barrier", "paper"])
def test_losses_decrease_when_training_a_toy_model(occ: str) -> None:
    torch.manual_seed(0)
    constraintor = FeatureConstraintor([6])
    flow = ResidualFlow([6], coupling_layers=2, pos_embed_dim=8)
    loss = ResADLoss(num_levels=1, occ_loss=occ)
    optimizer = torch.optim.Adam([*constraintor.parameters(), *flow.parameters()], lr=1e-2)
    residuals = [torch.rand(4, 6, 5, 5) * 2]
    masks = [torch.zeros(4, 5, 5)]
    masks[0][0, 1:3, 1:3] = 1
    history = []
    for _ in range(40):
        constrained = constraintor(residuals)
        occ_value = loss.occ_loss(constrained, residuals, masks)
        log_normal, log_abnormal = flow([constrained[0].detach()])[0]
        flow_value = loss.flow_loss(0, log_normal.reshape(-1), log_abnormal.reshape(-1), masks[0].reshape(-1))
        optimizer.zero_grad()
        (occ_value + flow_value).backward()
        optimizer.step()
        history.append((float(occ_value.detach()), float(flow_value.detach())))
    assert history[-1][0] < 0.5 * history[0][0]
    assert history[-1][1] < history[0][1]
