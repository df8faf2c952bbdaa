# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""The flows' positional condition projected once per position: what it saves in eager flow time (issue 15).

Every coupling block's subnet starts with ``Linear(C/2 + D, 2d)`` over ``[x1, condition]``; the condition is the
positional encoding, the same for every image, so its part ``W_cond @ condition + bias`` is a fixed ``(H*W, 2d)``
table per level and block once the weights are trained. ``ResidualFlow`` uses such tables at inference (eval mode,
gradients off; cached until the weights change) and FrEIA's own forward in training. This script times both paths of
the product's ``ResidualFlow`` on random flows of the two backbones' level shapes at 224 px, batch 1, eager PyTorch,
and prints the largest difference of the log-likelihood maps (exact up to float summation order). With ``--models``,
a second table times whole models (``bench_inference.py``'s configurations, k = 4, batch 1, random weights) with the
tables on and off (``residual_flow.project_condition``) in eager PyTorch and in OpenVINO f32 (anomalib's
``to_openvino``), with the size of each IR's weights file (alternating rounds, medians).

    python benchmarks/bench_flow_condition.py --threads 1 2
    python benchmarks/bench_flow_condition.py --threads --models wide_resnet50_2 lite0
"""

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from bench_inference import CONFIGS, build_model

from anomalib_resad.cpu_info import describe
from anomalib_resad.residual_flow import ResidualFlow

# (name, channels per level, side of each level's map at 224 px, pos_embed_dim, coupling layers): the configs' Lite0
# model and ResAD's defaults (wide_resnet50_2)
SHAPES = (
    ("tf_efficientnet_lite0 (blocks.1/2/4, D=64, 8 blocks)", [24, 40, 112], [56, 28, 14], 64, 8),
    ("wide_resnet50_2 (layer1-3, D=256, 10 blocks)", [256, 512, 1024], [56, 28, 14], 256, 10),
)


def time_level(flow: ResidualFlow, feature: torch.Tensor, repeats: int) -> tuple[float, float, float]:
    """Seconds per call through FrEIA's forward and through the projected condition, and the largest difference."""

    def run(training: bool) -> tuple[float, torch.Tensor]:
        flow.train(training)  # the flows hold no dropout or normalisation: only the path differs
        output = flow([feature])[0][0]  # warm-up (and, in eval mode, the tables)
        start = time.perf_counter()
        for _ in range(repeats):
            output = flow([feature])[0][0]
        return (time.perf_counter() - start) / repeats, output

    freia, expected = run(training=True)
    projected, output = run(training=False)
    return freia, projected, (output - expected).abs().max().item()


def mean_ms(call: Callable[[], object], repeats: int) -> float:
    """Milliseconds per call: the mean of ``repeats`` calls after two warm-ups."""
    call()
    call()
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - start) / repeats * 1e3


def model_rows(names: list[str], repeats: int, rounds: int) -> None:
    """Whole models with the condition tables on and off: eager and OpenVINO f32 ms at batch 1, IR weights size.

    Both variants are exported first, then timed in alternating rounds (off, on, off, on, ...) and each cell is the
    median over the rounds of the mean of ``repeats`` calls: a shared machine's load then hits both alike.
    """
    import statistics

    import openvino as ov

    image = np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32)
    print("| model | tables | eager ms | OpenVINO f32 ms | IR .bin MB |")
    print("|---|---|---|---|---|")
    for config_name in [name for name in CONFIGS if any(part in name for part in names)]:
        model = build_model(config_name, 4)
        flow = model.model.residual_flow
        with tempfile.TemporaryDirectory() as folder:
            compiled, megabytes = {}, {}
            for project in (False, True):
                flow.project_condition = project
                path = model.to_openvino(Path(folder) / str(project), input_size=(224, 224))
                compiled[project] = ov.Core().compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
                megabytes[project] = Path(path).with_suffix(".bin").stat().st_size / 1e6
            times: dict[tuple[str, bool], list[float]] = {}
            for _ in range(rounds):
                for project in (False, True):
                    flow.project_condition = project
                    with torch.no_grad():
                        eager = mean_ms(lambda model=model: model(torch.from_numpy(image)), repeats)
                    deployed = mean_ms(lambda run=compiled[project]: run(image), repeats)
                    times.setdefault(("eager", project), []).append(eager)
                    times.setdefault(("openvino", project), []).append(deployed)
        for project in (False, True):
            eager, deployed = (statistics.median(times[runtime, project]) for runtime in ("eager", "openvino"))
            print(f"| {config_name} | {'on' if project else 'off'} | {eager:.1f} | {deployed:.1f} "
                  f"| {megabytes[project]:.1f} |")  # fmt: skip


def main() -> None:
    """Print one table row per backbone shape and thread count (and per model with ``--models``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", nargs="*", type=int, default=[1], help="flows-only table; none: skip it")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--models", nargs="*", default=[], help="whole-model table for configurations matching these")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds of the whole-model table")
    args = parser.parse_args()
    print(describe())
    if args.models:
        model_rows(args.models, repeats=5, rounds=args.rounds)
    if not args.threads:
        return
    print("| level shapes | threads | flows today ms | projected condition ms | speed-up "
          "| per level (today / projected) | max abs diff of log-likelihoods |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for name, channels, sides, dimension, blocks in SHAPES:
        torch.manual_seed(0)
        flows = [ResidualFlow([channel], coupling_layers=blocks, pos_embed_dim=dimension) for channel in channels]
        features = [torch.randn(1, channel, side, side) for channel, side in zip(channels, sides, strict=True)]
        for threads in args.threads:
            torch.set_num_threads(threads)
            with torch.no_grad():
                pairs = zip(flows, features, strict=True)
                levels = [time_level(flow, feature, args.repeats) for flow, feature in pairs]
            today, projected = sum(row[0] for row in levels) * 1e3, sum(row[1] for row in levels) * 1e3
            per_level = ", ".join(f"{row[0] * 1e3:.1f} / {row[1] * 1e3:.1f}" for row in levels)
            difference = max(row[2] for row in levels)
            print(f"| {name} | {threads} | {today:.1f} | {projected:.1f} | {today / projected:.2f}x | {per_level} "
                  f"| {difference:.1e} |")  # fmt: skip


if __name__ == "__main__":
    main()
