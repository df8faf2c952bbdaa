# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""What ``reference_views`` costs: eager scoring time per image and the time to set a class's references.

A bank with each reference's 4 (``flips``) or 8 (``dihedral``) views is 4x / 8x larger on the levels that hold them
(the two deepest by default), and ResAD matches every query position against all of it. ``nearest_averaging`` is
fixed to ``off`` so that every row times the same matching (``auto`` may choose differently per bank). One table,
every configuration measured in the same run, rounds alternating between the view modes (a shared machine drifts;
compare the ratios in one column):

    python benchmarks/bench_reference_views.py                       # Lite0 (3 levels) and wide_resnet50_2, k = 4
    python benchmarks/bench_reference_views.py --only lite0 --rounds 3

Weights do not change speed: wide_resnet50_2 runs with random weights (no download), Lite0 with the offline weights.
"""

import argparse
import statistics
import time

import torch
from bench_inference import CONFIGS

from anomalib_resad import ResAD
from anomalib_resad.cpu_info import cpu_info, describe, runtime_versions

MODES = ("none", "flips", "dihedral")


def configs() -> dict[str, dict]:
    """The light (3-level Lite0) and the reference (wide_resnet50_2) configurations of ``bench_inference``."""
    return {name: settings for name, settings in CONFIGS.items() if "2 levels" not in name}


@torch.no_grad()
def measure(model: ResAD, references: torch.Tensor, query: torch.Tensor, repeats: int) -> tuple[float, float]:
    """(seconds to make the calibrated bank, median ms per image at batch 1)."""
    start = time.perf_counter()
    model.model.set_references(model.model.make_reference_bank(references))
    fit = time.perf_counter() - start
    model.model(query)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.model(query)
        times.append(1000 * (time.perf_counter() - start))
    return fit, statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds over the view modes")
    parser.add_argument("--repeats", type=int, default=5, help="timed batch-1 forward passes per round")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--only", help="only the configurations whose name contains this text, e.g. lite0")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(describe(cpu_info(), runtime_versions()))
    print(f"torch threads: {torch.get_num_threads()}; k = {args.shots}; 224 px; eager PyTorch, f32, batch 1\n")
    print("| backbone | reference_views | views per level | ms / image (median) | vs none | set references, s |")
    print("|---|---|---|---|---|---|")
    torch.manual_seed(0)
    references, query = torch.randn(args.shots, 3, 224, 224), torch.randn(1, 3, 224, 224)
    for name, settings in configs().items():
        if args.only and args.only not in name:
            continue
        # averaging fixed: "auto" may choose differently per bank, and the rows would time different matchings
        models = {
            mode: ResAD(**settings, image_size=224, reference_views=mode, nearest_averaging="off", visualizer=False)
            for mode in MODES
        }
        for model in models.values():
            model.model.load_state_dict(models["none"].model.state_dict(), strict=False)
            model.model.eval()
        results: dict[str, dict[str, list[float]]] = {mode: {"ms": [], "fit": []} for mode in MODES}
        for _ in range(args.rounds):
            for mode in MODES:
                fit, ms = measure(models[mode], references, query, args.repeats)
                results[mode]["ms"].append(ms)
                results[mode]["fit"].append(fit)
        base = statistics.median(results["none"]["ms"])
        for mode in MODES:
            ms = statistics.median(results[mode]["ms"])
            views = models[mode].model.feature_converter.bank.views
            print(f"| {name} | {mode} | {views} | {ms:.1f} | {ms / base:.2f}x | "
                  f"{statistics.median(results[mode]['fit']):.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
