# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""The reference's per-chunk flow training (``flow_steps="chunk"``) and the training-time global constants."""

from pathlib import Path

import torch
from anomalib.engine import Engine

from anomalib_resad.data import MultiClassDataModule
from anomalib_resad.loss import ResADLoss
from anomalib_resad.residual_flow import ResidualFlow
from tests.helpers.models import tiny_resad


def test_position_chunks_cover_every_position_once() -> None:
    flow = ResidualFlow([4], coupling_layers=1, pos_embed_dim=8)
    feature = torch.arange(2 * 4 * 3 * 5, dtype=torch.float32).reshape(2, 4, 3, 5)
    mask = torch.zeros(2, 3, 5)
    mask[1, 2, 4] = 1
    chunks = flow.position_chunks(feature, mask, num_chunks=4)
    assert len(chunks) == 4
    assert sorted(len(vectors) for vectors, _, _ in chunks) == [7, 7, 8, 8]
    vectors = torch.cat([chunk[0] for chunk in chunks])
    expected, conditions, flat_mask = flow.flatten(feature, mask)
    # same rows (positions) as the full flattening, each exactly once, conditions and masks travelling with them
    order = torch.cat([chunk[0][:, 0] for chunk in chunks]).argsort()
    torch.testing.assert_close(vectors[order], expected[expected[:, 0].argsort()])
    torch.testing.assert_close(torch.cat([chunk[1] for chunk in chunks])[order], conditions[expected[:, 0].argsort()])
    assert float(torch.cat([chunk[2] for chunk in chunks]).sum()) == 1.0 == float(flat_mask.sum())


def test_chunked_training_takes_one_flow_step_per_chunk_with_the_reference_loss(
    texture_root: Path, tmp_path: Path, monkeypatch
) -> None:
    """Per batch: one constraintor step, then ceil(B*H*W/chunk) flow steps per level, each on its chunk's loss."""
    losses: list[tuple[int, int]] = []
    original = ResADLoss.flow_loss

    def spy(self: ResADLoss, level: int, log_normal: torch.Tensor, log_abnormal: torch.Tensor, mask: torch.Tensor):
        loss = original(self, level, log_normal, log_abnormal, mask)
        # first stage, normal positions only: the reference's chunk loss is mean softplus(-log p) over the chunk
        assert float(mask.sum()) == 0.0
        torch.testing.assert_close(loss, torch.nn.functional.softplus(-log_normal).mean())
        losses.append((level, len(log_normal)))
        return loss

    monkeypatch.setattr(ResADLoss, "flow_loss", spy)
    steps = []
    original_step = torch.optim.Adam.step

    def count_step(self, *args, **kwargs):
        steps.append(1)
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", count_step)
    datamodule = MultiClassDataModule(
        sources=[{"datamodule": "MVTecAD", "root": str(texture_root), "categories": ["grass"]}],
        train_batch_size=4,
        num_workers=0,
        include_test=False,
    )
    model = tiny_resad(flow_steps="chunk", flow_positions=100, train_k=2, k=2, evaluator=False, first_stage_epochs=5)
    before = model.model.anomaly_map_generator.global_level_constants.clone()
    engine = Engine(max_epochs=1, accelerator="cpu", default_root_dir=tmp_path, logger=False,
                    enable_progress_bar=False, limit_val_batches=0)  # fmt: skip
    engine.fit(model, datamodule=datamodule)
    # 64 px tiny model: level grids 16x16 and 8x8; batch 4 -> ceil(1024/100) = 11 and ceil(256/100) = 3 chunks
    batches = 2  # 8 normal training images of 'grass', batch 4
    first_batch = [count for level, count in losses if level == 0][:11]
    assert sorted(first_batch) == [93] * 10 + [94]  # 1024 positions in 11 near-equal chunks, every one used
    assert sum(1 for level, _ in losses if level == 0) == 11 * batches
    assert sum(1 for level, _ in losses if level == 1) == 3 * batches
    assert len(steps) == batches * (1 + 11 + 3)  # one constraintor step + one step per flow chunk
    assert not torch.equal(model.model.anomaly_map_generator.global_level_constants, before)  # training moves them
