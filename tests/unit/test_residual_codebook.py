# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""ResAD++ distribution matching: EFDM, nearest codes, the codebook loss, and the option in the model."""

from pathlib import Path

import torch

from anomalib_resad.references import load_images
from anomalib_resad.residual_codebook import ResidualCodebook, match_feature_distribution
from tests.helpers.models import tiny_resad


def test_efdm_keeps_ranks_and_moves_values_toward_the_target_distribution() -> None:
    generator = torch.Generator().manual_seed(0)
    source = torch.rand(2, 3, 4, 5, generator=generator)
    target = torch.randn(2, 3, 4, 5, generator=generator) * 10
    exact = match_feature_distribution(source, target, alpha=0.0)
    # exact matching: per image and channel, the target's values, placed in the source's ranks
    torch.testing.assert_close(exact.flatten(2).sort(-1).values, target.flatten(2).sort(-1).values)
    torch.testing.assert_close(exact.flatten(2).argsort(-1), source.flatten(2).argsort(-1))
    torch.testing.assert_close(match_feature_distribution(source, target, alpha=1.0), source)
    # the reference's alpha 0.4: 60 % of the way, value by value in rank order
    half = match_feature_distribution(source, target, alpha=0.4)
    torch.testing.assert_close(half, source + 0.6 * (exact - source))


def test_nearest_codes_are_the_closest_codebook_vectors() -> None:
    codebook = ResidualCodebook([3], num_codes=7)
    with torch.no_grad():
        codebook.codebooks[0].weight.copy_(torch.randn(7, 3))
    residual = torch.randn(2, 3, 4, 4)
    codes = codebook.nearest_codes(0, residual)
    vectors = residual.permute(0, 2, 3, 1).reshape(-1, 3)
    expected = codebook.codebooks[0].weight[torch.cdist(vectors, codebook.codebooks[0].weight).argmin(1)]
    torch.testing.assert_close(codes.permute(0, 2, 3, 1).reshape(-1, 3), expected)


def test_codebook_loss_uses_normal_positions_only_and_trains_only_the_codebook() -> None:
    codebook = ResidualCodebook([2], num_codes=1)
    with torch.no_grad():
        codebook.codebooks[0].weight.fill_(0.0)
    residual = torch.ones(1, 2, 1, 2, requires_grad=True)
    with torch.no_grad():
        residual[0, :, 0, 1] = 100.0  # an anomalous position: excluded
    mask = torch.tensor([[[0.0, 1.0]]])
    loss = codebook.loss([residual], [mask])
    # mean((sg(q) - r)^2) + 0.25 mean((q - sg(r))^2) over the normal position's two values: 1 + 0.25
    assert float(loss.detach()) == 1.25
    loss.backward()
    assert residual.grad is None  # the residuals are constants
    torch.testing.assert_close(codebook.codebooks[0].weight.grad, torch.full((1, 2), 0.25 * 2 * (0 - 1) / 2))


def test_distribution_matching_is_applied_at_test_time_only_and_trained_by_its_own_learning_rate() -> None:
    torch.manual_seed(0)
    plain = tiny_resad(evaluator=False)
    matched = tiny_resad(evaluator=False, distribution_matching=True, codebook_size=16, codebook_lr=1e-3)
    matched.model.load_state_dict(plain.model.state_dict(), strict=False)  # same network, plus a codebook
    features = plain.model.feature_extractor(torch.rand(2, 3, 64, 64))
    bank = [level.flatten(2).transpose(1, 2).reshape(-1, level.shape[1]) for level in features]
    for model in (plain, matched):
        model.model.eval()
    with torch.no_grad():
        eval_plain, *_ = plain.model.level_outputs(features, bank)
        eval_matched, *_ = matched.model.level_outputs(features, bank)
    assert not torch.allclose(eval_plain[0][0], eval_matched[0][0])
    matched.model.train()
    plain.model.train()
    with torch.no_grad():
        train_plain, *_ = plain.model.level_outputs(features, bank)
        train_matched, *_ = matched.model.level_outputs(features, bank)
    torch.testing.assert_close(train_plain[0][0], train_matched[0][0])  # training sees the raw residuals
    groups = matched.configure_optimizers()["optimizer"].param_groups
    assert [group["lr"] for group in groups] == [matched.lr, 1e-3]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in matched.model.codebook.parameters()}


def test_training_moves_the_codebook_and_the_export_matches_eager(texture_root: Path, tmp_path: Path) -> None:
    import openvino as ov
    from anomalib.engine import Engine

    from anomalib_resad.data import MultiClassDataModule

    datamodule = MultiClassDataModule(
        sources=[{"datamodule": "MVTecAD", "root": str(texture_root), "categories": ["grass"]}],
        train_batch_size=4,
        num_workers=0,
        include_test=False,
    )
    model = tiny_resad(distribution_matching=True, codebook_size=16, codebook_lr=1e-2, train_k=2, k=2,
                       evaluator=False, first_stage_epochs=5)  # fmt: skip
    before = model.model.codebook.codebooks[0].weight.detach().clone()
    engine = Engine(max_epochs=1, accelerator="cpu", default_root_dir=tmp_path, logger=False,
                    enable_progress_bar=False, limit_val_batches=0)  # fmt: skip
    engine.fit(model, datamodule=datamodule)
    assert not torch.equal(model.model.codebook.codebooks[0].weight, before)
    model.eval()
    references = sorted((texture_root / "grass" / "train" / "good").glob("*.png"))[:2]
    transform = model.pre_processor.transform
    model.model.set_references(model.model.make_reference_bank(load_images([str(p) for p in references], transform)))
    image = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        eager = model(image)
    xml = model.to_openvino(tmp_path / "export", input_size=(64, 64))
    compiled = ov.Core().compile_model(xml, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    exported = compiled(image.numpy())
    assert abs(float(exported[compiled.output("pred_score")].reshape(-1)[0]) - float(eager.pred_score)) < 1e-4
