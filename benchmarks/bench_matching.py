# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""Reference features and nearest-reference matching: the reference code's way vs this package's.

Two tables, measured in one run:

1. Matching (batch 8, k = 4): the reference code (``utils.py: get_mc_matched_ref_features``) matches image by image
   and level by level with a full similarity matrix per image; here one call matches the whole batch in blocks of
   bounded size. Results are asserted identical. Matching is compute-bound in the matmul, so on CPU both run at about
   the same speed; what the blocks change is the peak similarity-matrix memory, which no longer grows with k or
   the batch. The package matches both ways where it scores (each reference position's best match per image too,
   for the odd-frame check) and forward only where it trains: the table gives both next to the one-way blocked
   matching with ``argmax`` that the package used before the odd-frame check.
2. Training references per batch: the reference code re-extracts backbone features of ``num_shot = 4`` freshly
   drawn normal images for every class in every training batch; here features of every drawn training image are
   computed once and kept in a bounded cache, so a batch only stacks cached tensors once the pool has been seen.

    python benchmarks/bench_matching.py

Weights do not change speed: both backbones run with random weights (no download).
"""

import statistics
import time
from collections.abc import Callable

import torch
from torch.nn import functional as F  # noqa: N812

from anomalib_resad import feature_converter
from anomalib_resad.feature_converter import flatten_levels, match_features
from anomalib_resad.feature_extractor import ResADFeatureExtractor

# (levels, batch, shots): WideResNet-50-2 at 224 px (reference) and EfficientNet-Lite0 at 224 px
SHAPES = {
    "wide_resnet50_2": [(256, 56), (512, 28), (1024, 14)],
    "tf_efficientnet_lite0": [(24, 56), (40, 28), (112, 14)],
}
BACKBONE_LAYERS = {
    "wide_resnet50_2": ["layer1", "layer2", "layer3"],
    "tf_efficientnet_lite0": ["blocks.1", "blocks.2", "blocks.4"],
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


def one_way(features: list[torch.Tensor], bank: list[torch.Tensor]) -> list[torch.Tensor]:
    """Before the odd-frame check's reverse statistic: each query row's best match only, blocks of bounded size."""
    out = []
    for feature, references in zip(features, bank, strict=True):
        batch, channels, height, width = feature.shape
        vectors = F.normalize(feature.permute(0, 2, 3, 1).reshape(-1, channels), dim=1)
        normalized = F.normalize(references, dim=1)
        block = max(1, feature_converter._MATCH_BLOCK_ELEMENTS // len(references))
        indices = torch.cat([(part @ normalized.T).argmax(dim=1) for part in vectors.split(block)])
        out.append(references[indices].reshape(batch, height, width, channels).permute(0, 3, 1, 2))
    return out


def ours(features: list[torch.Tensor], bank: list[torch.Tensor]) -> list[torch.Tensor]:
    """This package: one batched call per level, matching both ways."""
    out = []
    for feature, references in zip(features, bank, strict=True):
        batch, channels, height, width = feature.shape
        matched, _, _ = match_features(feature.permute(0, 2, 3, 1).reshape(batch, -1, channels), references)
        out.append(matched.reshape(batch, height, width, channels).permute(0, 3, 1, 2))
    return out


def forward_only(features: list[torch.Tensor], bank: list[torch.Tensor]) -> list[torch.Tensor]:
    """This package in training: one batched call per level, the forward match only (``coverage=False``)."""
    out = []
    for feature, references in zip(features, bank, strict=True):
        batch, channels, height, width = feature.shape
        vectors = feature.permute(0, 2, 3, 1).reshape(batch, -1, channels)
        matched, _, _ = match_features(vectors, references, coverage=False)
        out.append(matched.reshape(batch, height, width, channels).permute(0, 3, 1, 2))
    return out


def timed(function: Callable, *arguments: object, repeats: int = 3) -> tuple[float, object]:
    result = function(*arguments)
    start = time.perf_counter()
    for _ in range(repeats):
        result = function(*arguments)
    return (time.perf_counter() - start) / repeats, result


def interleaved(functions: list[Callable], *arguments: object, rounds: int = 5) -> list[tuple[float, object]]:
    """Median seconds and result of each function, timed in turns (a noisy machine slows all of them alike)."""
    results = [function(*arguments) for function in functions]  # warm-up
    seconds: list[list[float]] = [[] for _ in functions]
    for _ in range(rounds):
        for index, function in enumerate(functions):
            start = time.perf_counter()
            results[index] = function(*arguments)
            seconds[index].append(time.perf_counter() - start)
    return [(statistics.median(times), result) for times, result in zip(seconds, results, strict=True)]


def main() -> None:
    """Print the comparison table."""
    torch.manual_seed(0)
    print(f"\nNearest-reference matching on this CPU ({torch.get_num_threads()} threads), batch 8, k = 4\n")
    print("| backbone | reference-style loop | one-way blocked | both ways blocked (ours, scoring) | "
          "forward only (ours, training) | speed-up vs loop | both ways / one-way | forward only / both ways | "
          "peak similarity MiB, loop / ours |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    block = feature_converter._MATCH_BLOCK_ELEMENTS
    for backbone, levels in SHAPES.items():
        features = [torch.rand(8, channels, size, size) for channels, size in levels]
        bank = [torch.rand(4 * size * size, channels) for channels, size in levels]
        timings = interleaved([reference_loop, one_way, ours, forward_only], features, bank)
        (loop_seconds, expected), (one_way_seconds, one_way_result), (our_seconds, result) = timings[:3]
        forward_seconds, forward_result = timings[3]
        for level_expected, *level_results in zip(expected, result, one_way_result, forward_result, strict=True):
            assert all(torch.equal(level_expected, level_result) for level_result in level_results)
        bank_sizes = [4 * size * size for _, size in levels]  # k * H * W positions per level
        loop_mb = max(size * size * bank for (_, size), bank in zip(levels, bank_sizes, strict=True)) * 4 / 2**20
        our_mb = (
            max(
                min(8 * size * size, max(1, block // bank)) * bank
                for (_, size), bank in zip(levels, bank_sizes, strict=True)
            )
            * 4
            / 2**20
        )
        print(f"| {backbone} | {1000 * loop_seconds:.0f} ms | {1000 * one_way_seconds:.0f} ms | "
              f"{1000 * our_seconds:.0f} ms | {1000 * forward_seconds:.0f} ms | {loop_seconds / our_seconds:.2f}x | "
              f"{our_seconds / one_way_seconds:.2f}x | {forward_seconds / our_seconds:.2f}x | "
              f"{loop_mb:.0f} / {our_mb:.0f} |")  # fmt: skip
    training_references()


def extract_references(extractor: ResADFeatureExtractor, pool: torch.Tensor, shots: int) -> list[torch.Tensor]:
    """Reference code: draw ``shots`` images and run the backbone on them."""
    return flatten_levels(extractor(pool[torch.randint(len(pool), (shots,))]))


def cached_references(cache: list[list[torch.Tensor]], shots: int) -> list[torch.Tensor]:
    """This package: draw ``shots`` images and stack their cached features."""
    drawn = torch.randint(len(cache), (shots,)).tolist()
    return flatten_levels([torch.stack(level) for level in zip(*(cache[i] for i in drawn), strict=True)])


def training_references(shots: int = 4, batches: int = 3) -> None:
    """Per training batch and class: extracting ``shots`` reference images (reference code) vs the feature cache."""
    print(f"\nTraining references per batch and class (k = {shots}, 224 px)\n")
    print("| backbone | re-extract every batch (reference code) | cached features (ours) | speed-up |")
    print("|---|---|---|---|")
    for backbone, layers in BACKBONE_LAYERS.items():
        extractor = ResADFeatureExtractor(backbone, layers, pre_trained=False).eval()
        pool = torch.rand(16, 3, 224, 224)
        with torch.no_grad():
            cache = [[level[index] for level in extractor(pool)] for index in range(len(pool))]  # a warm cache
            extract_seconds, _ = timed(extract_references, extractor, pool, shots, repeats=batches)
            cached_seconds, _ = timed(cached_references, cache, shots, repeats=batches)
        print(f"| {backbone} | {1000 * extract_seconds:.0f} ms | {1000 * cached_seconds:.1f} ms | "
              f"{extract_seconds / cached_seconds:.0f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
