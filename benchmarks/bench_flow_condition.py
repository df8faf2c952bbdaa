# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""The flows' positional condition projected once per position: how much eager flow time it would save (issue 15).

Every coupling block's subnet starts with ``Linear(C/2 + D, 2d)`` over ``[x1, condition]``; the condition is the
positional encoding, the same for every image, so its part ``W_cond @ condition + bias`` is a fixed ``(H*W, 2d)``
table per level and block once the weights are trained. This script swaps each subnet for one that multiplies only
``x1`` and adds that table (exact up to float summation order; the maximum difference of ``z`` and ``log|det J|`` is
printed) and times both on random flows of the two backbones' level shapes at 224 px, batch 1, eager PyTorch.
Nothing here is wired into the product: the table must be rebuilt whenever the weights change and must reach the
exported graph as a constant - see docs/benchmark.md for the measured figures and what shipping it would take.

    python benchmarks/bench_flow_condition.py --threads 1 2
"""

import argparse
import time

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from anomalib_resad.cpu_info import describe
from anomalib_resad.feature_converter import flatten_positions
from anomalib_resad.residual_flow import ResidualFlow

# (name, channels per level, side of each level's map at 224 px, pos_embed_dim, coupling layers): the configs' Lite0
# model and ResAD's defaults (wide_resnet50_2)
SHAPES = (
    ("tf_efficientnet_lite0 (blocks.1/2/4, D=64, 8 blocks)", [24, 40, 112], [56, 28, 14], 64, 8),
    ("wide_resnet50_2 (layer1-3, D=256, 10 blocks)", [256, 512, 1024], [56, 28, 14], 256, 10),
)


class ProjectedConditionSubnet(nn.Module):
    """A block's subnet with the condition's share of its first ``Linear`` precomputed per position."""

    def __init__(self, subnet: nn.Sequential, half: int, condition: torch.Tensor) -> None:
        super().__init__()
        self.subnet, self.half = subnet, half
        first = subnet[0]
        self.table = F.linear(condition, first.weight[:, half:], first.bias)  # (H*W, 2d), once per weights

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """``inputs``: ``[x1, ignored]`` rows of ``B`` images, row-major over (image, position)."""
        hidden = F.linear(inputs[:, : self.half], self.subnet[0].weight[:, : self.half])
        hidden = (hidden.unflatten(0, (-1, self.table.shape[0])) + self.table).flatten(0, 1)
        return self.subnet[2](self.subnet[1](hidden))


def time_level(flow: ResidualFlow, level: int, feature: torch.Tensor, repeats: int) -> tuple[float, float, float]:
    """Seconds per call today and projected, and the largest output difference, for one level."""
    _, _, height, width = feature.shape
    condition = flow.positional_encoding(height, width, feature.device)
    vectors = flatten_positions(feature)
    blocks = flow.flows[level].module_list
    originals = [block.subnet for block in blocks]

    def run(conditions: torch.Tensor) -> tuple[float, tuple[torch.Tensor, torch.Tensor]]:
        output = flow.flows[level](vectors, [conditions])  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            output = flow.flows[level](vectors, [conditions])
        return (time.perf_counter() - start) / repeats, output

    today, (z, log_det) = run(condition.repeat(feature.shape[0], 1))
    for block in blocks:
        block.subnet = ProjectedConditionSubnet(block.subnet, block.splits[0], condition)
    try:
        projected, (z_projected, log_det_projected) = run(vectors.new_zeros(vectors.shape[0], 1))
    finally:
        for block, original in zip(blocks, originals, strict=True):
            block.subnet = original
    difference = max((z - z_projected).abs().max().item(), (log_det - log_det_projected).abs().max().item())
    return today, projected, difference


def main() -> None:
    """Print one table row per backbone shape and thread count."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", nargs="+", type=int, default=[1])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    print(describe())
    print("| level shapes | threads | flows today ms | projected condition ms | speed-up "
          "| per level (today / projected) | max abs diff |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for name, channels, sides, dimension, blocks in SHAPES:
        torch.manual_seed(0)
        flow = ResidualFlow(channels, coupling_layers=blocks, pos_embed_dim=dimension).eval()
        features = [torch.randn(1, channel, side, side) for channel, side in zip(channels, sides, strict=True)]
        for threads in args.threads:
            torch.set_num_threads(threads)
            with torch.no_grad():
                levels = [time_level(flow, level, feature, args.repeats) for level, feature in enumerate(features)]
            today, projected = sum(row[0] for row in levels) * 1e3, sum(row[1] for row in levels) * 1e3
            per_level = ", ".join(f"{row[0] * 1e3:.1f} / {row[1] * 1e3:.1f}" for row in levels)
            difference = max(row[2] for row in levels)
            print(f"| {name} | {threads} | {today:.1f} | {projected:.1f} | {today / projected:.2f}x | {per_level} "
                  f"| {difference:.1e} |")  # fmt: skip


if __name__ == "__main__":
    main()
