# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""Nearest-reference matching: the reference code's loop vs this package's batched, blocked matching.

The reference code (``utils.py: get_mc_matched_ref_features``) matches image by image and level by level, builds the
full similarity matrix for each image and re-normalises the bank for every image. Here one call matches the whole
batch, in blocks whose size depends on the channel count (small blocks keep the memory-bound argmax of thin features
in cache; larger blocks keep the matmul of wide features efficient). Same results (asserted), measured in one run.

    python benchmarks/bench_matching.py
"""

import time
from collections.abc import Callable

import torch
from torch.nn import functional as F  # noqa: N812

from anomalib_resad import feature_converter
from anomalib_resad.feature_converter import nearest_reference

# (levels, batch, shots): WideResNet-50-2 at 224 px (reference) and EfficientNet-Lite0 at 224 px
SHAPES = {
    "wide_resnet50_2": [(256, 56), (512, 28), (1024, 14)],
    "tf_efficientnet_lite0": [(24, 56), (40, 28), (112, 14)],
}


def reference_loop(features: list[torch.Tensor], bank: list[torch.Tensor]) -> list[torch.Tensor]:
    """The reference code's matching, image by image (written from its description; returns matched features)."""
    matched = [[] for _ in features]
    for image in range(features[0].shape[0]):
        for level, feature in enumerate(features):
            query = feature[image : image + 1]
            _, channels, height, width = query.shape
            vectors = query.permute(0, 2, 3, 1).reshape(-1, channels)
            similarity = F.normalize(vectors, p=2, dim=1) @ F.normalize(bank[level], p=2, dim=1).T
            matched[level].append(bank[level][similarity.argmax(dim=1)].permute(1, 0).reshape(channels, height, width))
    return [torch.stack(level) for level in matched]


def ours(features: list[torch.Tensor], bank: list[torch.Tensor]) -> list[torch.Tensor]:
    """This package: one batched call per level."""
    out = []
    for feature, references in zip(features, bank, strict=True):
        batch, channels, height, width = feature.shape
        vectors = feature.permute(0, 2, 3, 1).reshape(-1, channels)
        out.append(nearest_reference(vectors, references).reshape(batch, height, width, channels).permute(0, 3, 1, 2))
    return out


def timed(function: Callable, *arguments: object, repeats: int = 3) -> tuple[float, object]:
    result = function(*arguments)
    start = time.perf_counter()
    for _ in range(repeats):
        result = function(*arguments)
    return (time.perf_counter() - start) / repeats, result


def main() -> None:
    """Print the comparison table."""
    torch.manual_seed(0)
    print(f"\nNearest-reference matching on this CPU ({torch.get_num_threads()} threads), batch 8, k = 4\n")
    print("| backbone | reference-style loop | batched + blocked (ours) | speed-up |")
    print("|---|---|---|---|")
    for backbone, levels in SHAPES.items():
        features = [torch.rand(8, channels, size, size) for channels, size in levels]
        bank = [torch.rand(4 * size * size, channels) for channels, size in levels]
        loop_seconds, expected = timed(reference_loop, features, bank)
        our_seconds, result = timed(ours, features, bank)
        for level_expected, level_result in zip(expected, result, strict=True):
            assert torch.equal(level_expected, level_result)
        print(f"| {backbone} | {1000 * loop_seconds:.0f} ms | {1000 * our_seconds:.0f} ms | "
              f"{loop_seconds / our_seconds:.2f}x |")  # fmt: skip
    block = feature_converter._MATCH_BLOCK_ELEMENTS  # noqa: SLF001
    print(f"\nblock: {block} similarity elements per 64 channels")


if __name__ == "__main__":
    main()
