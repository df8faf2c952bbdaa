# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""Residual flows: log-likelihoods and the Jacobian term."""

import math

import torch
from torch.distributions import Normal

from anomalib_resad.residual_flow import ResidualFlow, log_likelihoods


def test_log_likelihoods_match_gaussian_densities() -> None:
    z, log_jac_det = torch.randn(5, 3), torch.randn(5)
    log_normal, log_abnormal = log_likelihoods(z, log_jac_det)
    expected_normal = (Normal(0.0, 1.0).log_prob(z).sum(1) + log_jac_det) / 3
    expected_abnormal = (Normal(1.0, 1.0).log_prob(z).sum(1) + log_jac_det) / 3
    torch.testing.assert_close(log_normal, expected_normal)
    torch.testing.assert_close(log_abnormal, expected_abnormal)


def test_jacobian_term_equals_autograd_log_determinant() -> None:
    torch.manual_seed(0)
    flow = ResidualFlow([4], coupling_layers=3, pos_embed_dim=8).flows[0].double()
    with torch.no_grad():  # move the blocks away from their near-identity initialisation
        for parameter in flow.parameters():
            if parameter.requires_grad:
                parameter.add_(0.3 * torch.randn_like(parameter))
    condition = torch.randn(1, 8, dtype=torch.float64)
    for _ in range(3):
        x = torch.randn(1, 4, dtype=torch.float64)
        _, log_jac_det = flow(x, [condition])
        jacobian = torch.autograd.functional.jacobian(lambda value: flow(value, [condition])[0], x)[0, :, 0, :]
        assert math.isclose(float(log_jac_det), float(torch.linalg.slogdet(jacobian).logabsdet), abs_tol=1e-6)


def test_maps_are_finite_and_shaped_like_the_feature_maps() -> None:
    flow = ResidualFlow([4, 6], coupling_layers=2, pos_embed_dim=8)
    outputs = flow([torch.rand(2, 4, 5, 5) * 3, torch.rand(2, 6, 3, 2)])
    assert [tuple(normal.shape) for normal, _ in outputs] == [(2, 5, 5), (2, 3, 2)]
    assert all(torch.isfinite(normal).all() and torch.isfinite(abnormal).all() for normal, abnormal in outputs)


def test_condition_depends_on_position() -> None:
    """The same vector at two positions gets two likelihoods: the flow is conditioned on position."""
    torch.manual_seed(0)
    flow = ResidualFlow([4], coupling_layers=2, pos_embed_dim=8)
    with torch.no_grad():
        for parameter in flow.parameters():
            if parameter.requires_grad:
                parameter.add_(0.3 * torch.randn_like(parameter))
    constant = torch.ones(1, 4, 2, 2)
    log_normal, _ = flow([constant])[0]
    assert log_normal.unique().numel() == 4
