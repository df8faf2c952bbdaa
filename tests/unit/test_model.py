# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""Torch model and anomalib module on tiny inputs."""

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
from anomalib.data import InferenceBatch

from anomalib_resad import ResAD, ResADConfigurationError, ResADInputError, ResADModel
from anomalib_resad.references import ReferenceSelection
from tests.helpers.images import write_image
from tests.helpers.models import tiny_resad


@pytest.fixture(scope="module")
def tiny_model() -> ResADModel:
    torch.manual_seed(0)
    model = ResADModel("resnet18", ["layer1", "layer2"], pre_trained=False, coupling_layers=2, pos_embed_dim=16)
    with torch.no_grad():  # an untrained flow is near-identity; perturb it so scores vary between images
        for parameter in model.residual_flow.parameters():
            if parameter.requires_grad:
                parameter.add_(0.2 * torch.randn_like(parameter))
    model = model.eval()
    model.set_references(model.make_reference_bank(torch.rand(2, 3, 64, 64)))
    return model


def test_eval_forward_returns_inference_batch(tiny_model: ResADModel) -> None:
    output = tiny_model(torch.rand(3, 3, 64, 64))
    assert isinstance(output, InferenceBatch)
    assert tuple(output.anomaly_map.shape) == (3, 1, 64, 64)
    assert tuple(output.pred_score.shape) == (3,)
    generator = tiny_model.anomaly_map_generator
    assert generator.scoring == "fused"  # the default: the flows' and the nearest-neighbour maps averaged
    generator.scoring = "paper"
    try:
        with torch.no_grad():
            flow_only = tiny_model(torch.rand(3, 3, 64, 64))
    finally:
        generator.scoring = "fused"
    # calibrated units: the image score is the map's maximum, or the odd-frame ratio where that is larger
    assert bool((flow_only.pred_score >= flow_only.anomaly_map.amax(dim=(1, 2, 3)) - 1e-5).all())


def test_nearest_scoring_uses_no_trained_part() -> None:
    """The `nearest` row of `resad evaluate`: ResAD's matching alone - a randomly initialised constraintor and flow
    give the very same scores, where the default's fused scores move."""
    torch.manual_seed(0)
    model = ResADModel("resnet18", ["layer1", "layer2"], pre_trained=False, coupling_layers=2, pos_embed_dim=16)
    model = model.eval()
    model.set_references(model.make_reference_bank(torch.rand(2, 3, 64, 64)))
    images = torch.rand(3, 3, 64, 64)
    generator = model.anomaly_map_generator

    def scores(nearest_only: bool) -> torch.Tensor:
        generator.scoring = "nearest" if nearest_only else "fused"
        try:
            with torch.no_grad():
                return model(images).pred_score
        finally:
            generator.scoring = "fused"

    nearest, fused = scores(True), scores(False)
    with torch.no_grad():
        for module in (model.residual_flow, model.feature_constraintor):
            for parameter in module.parameters():
                parameter.add_(0.5 * torch.randn_like(parameter))
    torch.testing.assert_close(scores(True), nearest, atol=0.0, rtol=0.0)
    assert not torch.allclose(scores(False), fused)


@pytest.mark.parametrize("averaging", [0.0, 1.0])
def test_one_pass_gives_every_scoring_its_own_scores(tiny_model: ResADModel, averaging: float) -> None:
    """`resad evaluate` scores ResAD, `nearest` and `flows` from one backbone pass: each as the model scores alone."""
    generator = tiny_model.anomaly_map_generator
    stored = generator.stored.averaging.clone()
    generator.stored.averaging.fill_(averaging)  # the class's choice of the precise or the averaged matching
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    try:
        together = tiny_model.forward_scorings(images, ["fused", "nearest", "paper"])
        for name in ("fused", "nearest", "paper"):
            generator.scoring = name
            with torch.no_grad():
                alone = tiny_model(images)
            torch.testing.assert_close(together[name].pred_score, alone.pred_score, atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(together[name].anomaly_map, alone.anomaly_map, atol=1e-6, rtol=1e-6)
    finally:
        generator.scoring = "fused"
        generator.stored.averaging.copy_(stored)
    # the three are different scorings (a mix-up of names would show here)
    assert not torch.allclose(together["nearest"].pred_score, together["paper"].pred_score)
    assert not torch.allclose(together["fused"].pred_score, together["paper"].pred_score)
    with pytest.raises(ResADConfigurationError, match="flows"):
        tiny_model.forward_scorings(images, ["flows"])


def test_scores_of_an_image_do_not_depend_on_the_rest_of_the_batch(tiny_model: ResADModel) -> None:
    torch.manual_seed(1)
    images = torch.rand(4, 3, 64, 64)
    with torch.no_grad():
        alone = tiny_model(images[:1])
        together = tiny_model(images)
    torch.testing.assert_close(alone.pred_score, together.pred_score[:1])
    torch.testing.assert_close(alone.anomaly_map, together.anomaly_map[:1])
    assert together.pred_score.unique().numel() == 4


def test_pre_processor_normalises_for_the_backbone() -> None:
    transform = ResAD.configure_pre_processor(image_size=96, backbone="tf_efficientnet_lite0").transform
    resize, normalize = transform.transforms
    assert list(resize.size) == [96, 96]
    assert list(normalize.mean) == [0.5, 0.5, 0.5]


def test_invalid_hyper_parameters_are_refused() -> None:
    with pytest.raises(ResADConfigurationError, match="multiple of 4"):
        tiny_resad(pos_embed_dim=18)
    with pytest.raises(ResADConfigurationError, match="at least 2 reference images"):
        tiny_resad(k=1)
    with pytest.raises(ResADConfigurationError, match="scoring"):
        tiny_resad(scoring="flows")
    with pytest.raises(ResADConfigurationError, match="Unknown OCC loss"):
        tiny_resad(occ_loss="hinge")


def test_set_references_stores_bank_and_file_list(tmp_path: Path) -> None:
    model = tiny_resad()
    paths = [str(write_image(tmp_path / f"{index}.png", "L", (50, 40))) for index in range(3)]
    model.set_references(ReferenceSelection("widget", paths, str(tmp_path)))
    converter = model.model.feature_converter
    assert converter.bank.k == 3
    assert model.model.anomaly_map_generator.stored.get().is_set
    assert converter.bank.grids == [(16, 16), (8, 8)]  # 64 px input: references resized like queries
    checkpoint: dict = {}
    model.on_save_checkpoint(checkpoint)
    assert checkpoint["resad_references"]["paths"] == paths


def test_stored_references_of_another_size_give_a_clear_error(tmp_path: Path) -> None:
    model = tiny_resad()
    paths = [str(write_image(tmp_path / f"{index}.png")) for index in range(2)]
    model.set_references(ReferenceSelection("widget", paths, str(tmp_path)))
    with pytest.raises(ResADInputError, match="another image size"):
        model.model.eval()(torch.rand(1, 3, 96, 96))


def test_each_odd_frame_statistic_has_its_own_margin(tiny_model: ResADModel) -> None:
    """2.0 (dissimilarity) and 1.5 (reverse), chosen on source validation: each scales only its own threshold."""
    generator = copy.deepcopy(tiny_model.anomaly_map_generator)
    generator.scoring = "nearest"  # perfectly matched positions: a score of 0, only the check can flag
    # a boundary far above these matches' nearest map: only the check can flag
    scoring = dataclasses.replace(generator.stored.get(), nearest_defects=torch.tensor(100.0))
    similarities = [torch.ones(1, 16, 16), torch.ones(1, 8, 8)]
    just_below = 1 - 1.99 * float(scoring.dissimilarity_max)  # dissimilarity 1.99 x its maximum: below 2.0
    assert just_below > 0
    parts = [torch.full((1, 16, 16), just_below), torch.full((1, 8, 8), just_below)]
    coverage = [torch.ones(1, 4), torch.ones(1, 4)]
    likelihoods = [(torch.zeros(1, 16, 16), torch.full((1, 16, 16), -50.0)),
                   (torch.zeros(1, 8, 8), torch.full((1, 8, 8), -50.0))]  # fmt: skip
    _, quiet = generator(likelihoods, parts, coverage, (64, 64), scoring)
    assert float(quiet) < 1  # not raised by the check
    reverse = 1 - 1.51 * float(scoring.reverse_dissimilarity_max)  # reverse dissimilarity 1.51 x its maximum
    _, flagged = generator(likelihoods, similarities, [torch.full((1, 4), reverse)] * 2, (64, 64), scoring)
    assert float(flagged) == pytest.approx(1.51 / 1.5, rel=1e-4)
