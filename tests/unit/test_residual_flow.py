# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""Residual flows: log-likelihoods and the Jacobian term."""

import copy
import math
import pickle

import pytest
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


def _perturbed_flow(channels: list[int], seed: int = 0) -> ResidualFlow:
    torch.manual_seed(seed)
    flow = ResidualFlow(channels, coupling_layers=3, pos_embed_dim=8)
    with torch.no_grad():  # away from the near-identity initialisation, so that every term matters
        for parameter in flow.parameters():
            if parameter.requires_grad:
                parameter.add_(0.3 * torch.randn_like(parameter))
    return flow


def _freia_maps(flow: ResidualFlow, features: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The maps through FrEIA's own forward, as training computes them."""
    flow.train()
    try:
        return flow(features)
    finally:
        flow.eval()


def test_projected_condition_equals_freia_forward() -> None:
    """Inference's condition tables match FrEIA: every block, odd and even channels, non-square maps, a batch."""
    flow = _perturbed_flow([5, 6]).eval()
    features = [torch.randn(3, 5, 5, 7), torch.randn(3, 6, 2, 3)]
    with torch.no_grad():
        expected = _freia_maps(flow, features)
        projected = flow(features)
    assert set(flow._condition_tables) == {0, 1}  # the projected path ran, for both levels
    for (normal, abnormal), (expected_normal, expected_abnormal) in zip(projected, expected, strict=True):
        torch.testing.assert_close(normal, expected_normal, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(abnormal, expected_abnormal, atol=1e-5, rtol=1e-5)
    assert not torch.equal(projected[0][0][0], projected[0][0][1])  # three different images, three different maps


def test_condition_tables_are_cached_until_the_weights_change() -> None:
    flow = _perturbed_flow([4]).eval()
    features = [torch.randn(2, 4, 3, 3)]
    with torch.no_grad():
        flow(features)
        tables = flow.condition_tables(0, 3, 3, torch.device("cpu"))
        assert all(a is b for a, b in zip(tables, flow.condition_tables(0, 3, 3, torch.device("cpu")), strict=True))
        first = flow.flows[0].module_list[1].subnet[0]
        first.weight.add_(0.5)  # an optimizer step is in place too
        rebuilt = flow.condition_tables(0, 3, 3, torch.device("cpu"))
        assert rebuilt[1] is not tables[1]
        torch.testing.assert_close(flow(features)[0][0], _freia_maps(flow, features)[0][0], atol=1e-5, rtol=1e-5)
        flow.load_state_dict(_perturbed_flow([4], seed=1).state_dict())  # a checkpoint, copied into the same tensors
        torch.testing.assert_close(flow(features)[0][0], _freia_maps(flow, features)[0][0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("implementation", [{}, {"foreach": True}, {"fused": True}])
def test_training_between_inferences_rebuilds_the_tables(implementation: dict) -> None:
    """Lightning's cycle (eval, train, step, eval): fused optimizers bump no version, the mode switch counts."""
    flow = _perturbed_flow([4]).eval()
    features = [torch.randn(2, 4, 3, 3)]
    with torch.inference_mode():
        flow(features)
    flow.train()
    optimizer = torch.optim.Adam(flow.parameters(), lr=0.1, **implementation)
    flow(features)[0][0].sum().backward()
    optimizer.step()
    flow.eval()
    with torch.inference_mode():
        projected = flow(features)[0][0]
        expected = _freia_maps(flow, features)[0][0]
    torch.testing.assert_close(projected, expected, atol=1e-5, rtol=1e-5)


def test_tables_stay_out_of_pickles_and_copies() -> None:
    flow = _perturbed_flow([4]).eval()
    features = [torch.randn(1, 4, 3, 3)]
    with torch.no_grad():
        expected = flow(features)[0][0]
    assert flow._condition_tables
    restored = pickle.loads(pickle.dumps(flow))
    assert restored._condition_tables == {}
    assert copy.deepcopy(flow)._condition_tables == {}
    with torch.no_grad():
        torch.testing.assert_close(restored(features)[0][0], expected, atol=0.0, rtol=0.0)
    old = flow.__getstate__()  # a module pickled before the tables existed
    del old["_condition_tables"], old["project_condition"]
    unpickled = ResidualFlow.__new__(ResidualFlow)
    unpickled.__setstate__(old)
    with torch.no_grad():
        torch.testing.assert_close(unpickled(features)[0][0], expected, atol=0.0, rtol=0.0)


def test_projected_condition_keeps_gradients_when_they_are_on() -> None:
    """With gradients on, the tables are computed in the graph: the condition weights get their gradient."""
    flow = _perturbed_flow([4]).eval()
    flow([torch.randn(1, 4, 2, 2)])[0][0].sum().backward()
    first = flow.flows[0].module_list[0].subnet[0]
    assert first.weight.grad[:, -flow.pos_embed_dim :].abs().sum() > 0
    assert first.bias.grad.abs().sum() > 0


def test_projection_can_be_switched_off() -> None:
    """``project_condition = False``: FrEIA's forward at inference too, no tables kept."""
    flow = _perturbed_flow([4]).eval()
    flow.project_condition = False
    features = [torch.randn(2, 4, 3, 3)]
    with torch.no_grad():
        maps = flow(features)
        torch.testing.assert_close(maps[0][0], _freia_maps(flow, features)[0][0], atol=0.0, rtol=0.0)
    assert flow._condition_tables == {}
