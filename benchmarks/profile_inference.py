# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""Where ResAD's inference time goes on this CPU, per stage, at batch 1 (issue 15).

Eager PyTorch, stage by stage with the model's own submodules, in the order of ``ResAD.forward`` (anomalib's
``pre_processor -> model -> post_processor``, the model being ``ResADModel.forward``):

    pre-processing        ResAD.pre_processor (resize, normalise)
    backbone              ResADModel.feature_extractor
    reference matching    ResADModel.feature_converter (nearest reference feature + residual, all levels)
    constraintor          ResADModel.feature_constraintor
    residual flows        ResADModel.residual_flow
    anomaly map + score   ResADModel.anomaly_map_generator (upsampling, blur, calibrated score)
    post-processing       ResAD.post_processor (normalised score, labels)

Each repetition runs the stages in sequence on the previous stage's output and times each with
``time.perf_counter`` (wall) and ``time.process_time`` (CPU time of this process); the table gives the wall time's
median and minimum over the repetitions (after warm-up) and the CPU time's median, whose shares say where the time
goes even on a machine busy with other work (``--threads 1`` makes the CPU time the stage's work, without idle
spinning of a thread pool). Whole ``ResAD.forward`` calls of the same repetitions are timed beside it as a check.
``--torch-ops N`` adds torch.profiler's N most expensive operators (self CPU time) of whole forward calls.

``--openvino`` also profiles the exported model (anomalib's ``to_openvino``, f32) with OpenVINO's per-layer counters
(``PERF_COUNT``; the CPU plugin reports wall time per node): time per node type, and the most expensive nodes with
their output shapes (the exported graph keeps no module names, so the shapes say what a node computes: a last
dimension of k x H x W of a level, e.g. ``[?,12544]``, is a query x reference-bank similarity matrix of the
matching). Exporting takes minutes on a small CPU: ``--ir model.xml`` reuses an exported IR of the same configuration
(``--keep-ir DIR`` keeps the one exported).

    python benchmarks/profile_inference.py --backbone lite0 --repetitions 10 --openvino
    python benchmarks/profile_inference.py --backbone wide_resnet50_2 --repetitions 5

The models are those of ``bench_inference.py`` (seed 0, k random reference images, 224 px): EfficientNet-Lite0
with its offline ImageNet weights, wide_resnet50_2 with random weights (ImageNet weights would need a download;
weights do not change the work per image, so they do not change the timings).
"""

import argparse
import collections
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from anomalib.data import InferenceBatch
from bench_inference import build_model

from anomalib_resad.cpu_info import cpu_info, describe, runtime_versions

BACKBONES = {"lite0": "tf_efficientnet_lite0 (light)", "wide_resnet50_2": "wide_resnet50_2 (reference)"}


def stage_functions(module: torch.nn.Module) -> list[tuple[str, Callable]]:
    """The stages of ``ResAD.forward`` as ``(name, function of the previous stage's output)``."""
    model = module.model
    state: dict = {}

    def pre_process(images: torch.Tensor) -> torch.Tensor:
        state["size"] = images.shape[-2:]
        return module.pre_processor(images)

    def match(features: list[torch.Tensor]) -> tuple:
        residuals, state["similarities"], state["coverage"] = model.feature_converter(features)
        return residuals

    def anomaly_map(log_likelihoods: list) -> InferenceBatch:
        maps, scores = model.anomaly_map_generator(
            log_likelihoods, state["similarities"], state["size"], coverage=state["coverage"]
        )
        return InferenceBatch(pred_score=scores, anomaly_map=maps)

    return [
        ("pre-processing (resize, normalise)", pre_process),
        ("backbone (feature_extractor)", model.feature_extractor),
        ("reference matching + residuals (feature_converter)", match),
        ("constraintor (feature_constraintor)", model.feature_constraintor),
        ("residual flows (residual_flow)", model.residual_flow),
        ("anomaly map + score (anomaly_map_generator)", anomaly_map),
        ("post-processing (post_processor)", module.post_processor),
    ]


def profile_eager(module: torch.nn.Module, images: torch.Tensor, repetitions: int, warmup: int) -> dict:
    """Wall and process CPU ms per stage and of whole forward calls, one entry per timed repetition."""
    stages = stage_functions(module)
    wall: dict[str, list[float]] = {name: [] for name, _ in stages}
    cpu: dict[str, list[float]] = {name: [] for name, _ in stages}
    whole: list[float] = []
    with torch.inference_mode():
        for repetition in range(warmup + repetitions):
            value = images
            for name, function in stages:
                start, start_cpu = time.perf_counter(), time.process_time()
                value = function(value)
                if repetition >= warmup:
                    wall[name].append(1000 * (time.perf_counter() - start))
                    cpu[name].append(1000 * (time.process_time() - start_cpu))
            start = time.perf_counter()
            module(images)
            if repetition >= warmup:
                whole.append(1000 * (time.perf_counter() - start))
    return {"wall": wall, "cpu": cpu, "forward": whole}


def torch_operator_table(module: torch.nn.Module, images: torch.Tensor, repetitions: int, rows: int) -> str:
    """torch.profiler's most expensive operators (self CPU time) over ``repetitions`` forward calls."""
    with torch.inference_mode():
        module(images)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
            for _ in range(repetitions):
                module(images)
    return profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def profile_openvino(ir_path: str, images: np.ndarray, repetitions: int, warmup: int, rows: int, threads: int) -> dict:
    """OpenVINO f32 per-layer counters: ms per node type and the most expensive nodes (medians over repetitions).

    The CPU plugin reports each node's *average* over all inferences so far, the slow first one included; the
    time of each inference is recovered as the difference of the running totals (average x count).
    """
    import openvino as ov

    core = ov.Core()
    options = {"PERF_COUNT": "YES", "INFERENCE_PRECISION_HINT": "f32"}
    if threads:
        options["INFERENCE_NUM_THREADS"] = threads
    compiled = core.compile_model(ir_path, "CPU", options)
    request = compiled.create_infer_request()
    shapes = {op.get_friendly_name(): op for op in core.read_model(ir_path).get_ordered_ops()}
    by_type: dict[str, list[float]] = collections.defaultdict(list)
    by_node: dict[tuple[str, str, str], list[float]] = collections.defaultdict(list)
    totals: dict[tuple[str, str, str], float] = collections.Counter()
    wall: list[float] = []
    for count in range(1, warmup + repetitions + 1):
        start = time.perf_counter()
        request.infer({0: images})
        elapsed = 1000 * (time.perf_counter() - start)
        per_type: dict[str, float] = collections.Counter()
        for layer in request.profiling_info:
            if layer.status != ov.ProfilingInfo.Status.EXECUTED:
                continue
            key = (layer.node_name, layer.node_type, layer.exec_type)
            total = layer.real_time.total_seconds() * 1000 * count  # running average -> running total
            milliseconds, totals[key] = total - totals[key], total
            if count > warmup:
                per_type[layer.node_type] += milliseconds
                by_node[key].append(milliseconds)
        if count > warmup:
            wall.append(elapsed)
            for node_type, milliseconds in per_type.items():
                by_type[node_type].append(milliseconds)
    types = {node_type: statistics.median(values) for node_type, values in by_type.items()}
    nodes = sorted(((statistics.median(v), key) for key, v in by_node.items()), reverse=True)[:rows]

    def shape(name: str) -> str:
        op = shapes.get(name)
        return str(op.get_output_partial_shape(0)) if op is not None and op.get_output_size() else "?"

    top = [(name, node_type, exec_type, shape(name), ms) for ms, (name, node_type, exec_type) in nodes]
    precision = compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
    return {"types": types, "nodes": top, "wall": wall, "precision": precision}


def print_stage_table(title: str, wall: dict[str, list[float]], cpu: dict[str, list[float]]) -> None:
    """Wall ms (median, minimum) and process CPU ms (median) per stage, and each stage's share of the CPU time.

    On a machine shared with other work the wall time includes waiting for a core; the process CPU time does not
    (with one thread it is the work of the stage), so the shares are taken from it.
    """
    medians = {name: statistics.median(values) for name, values in wall.items()}
    cpu_medians = {name: statistics.median(values) for name, values in cpu.items()}
    total, cpu_total = sum(medians.values()), sum(cpu_medians.values())
    print(f"\n{title}\n")
    print("| stage | wall ms, median | wall ms, min | CPU ms, median | % of CPU time |\n|---|---|---|---|---|")
    for name, values in sorted(wall.items(), key=lambda item: -cpu_medians[item[0]]):
        share = 100 * cpu_medians[name] / cpu_total
        print(f"| {name} | {medians[name]:.1f} | {min(values):.1f} | {cpu_medians[name]:.1f} | {share:.1f} |")
    minimum = sum(min(values) for values in wall.values())
    print(f"| **sum** | **{total:.1f}** | **{minimum:.1f}** | **{cpu_total:.1f}** | 100 |")


def print_type_table(title: str, times: dict[str, float], smallest_share: float = 0.01) -> None:
    """ms and % per node type; types under ``smallest_share`` of the total are summed in one row."""
    total = sum(times.values())
    small = {name for name, value in times.items() if value < smallest_share * total}
    print(f"\n{title}\n\n| node type | ms | % |\n|---|---|---|")
    for name, milliseconds in sorted(times.items(), key=lambda item: -item[1]):
        if name not in small:
            print(f"| {name} | {milliseconds:.1f} | {100 * milliseconds / total:.1f} |")
    if small:
        rest = sum(times[name] for name in small)
        label = f"{len(small)} other types (each < {100 * smallest_share:.0f} %)"
        print(f"| {label} | {rest:.1f} | {100 * rest / total:.1f} |")
    print(f"| **sum** | **{total:.1f}** | 100 |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", choices=sorted(BACKBONES), default="lite0")
    parser.add_argument("--repetitions", type=int, default=10, help="timed repetitions (after --warmup)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0, help="torch and OpenVINO threads (0: their defaults)")
    parser.add_argument("--torch-ops", type=int, default=0, help="also print torch.profiler's N top operators")
    parser.add_argument("--openvino", action="store_true", help="also profile the exported model (OpenVINO f32)")
    parser.add_argument("--ir", help="an exported OpenVINO IR (.xml) of this configuration, instead of exporting")
    parser.add_argument("--keep-ir", type=Path, help="export the IR into this folder (kept) instead of a temp one")
    parser.add_argument("--nodes", type=int, default=12, help="OpenVINO: how many most expensive nodes to list")
    parser.add_argument("--layers", nargs="+", help="backbone levels to use instead (blocks.2 blocks.4)")
    arguments = parser.parse_args()

    config_name = BACKBONES[arguments.backbone]
    if arguments.threads:
        torch.set_num_threads(arguments.threads)
    overrides = {"layers": arguments.layers} if arguments.layers else {}
    module = build_model(config_name, arguments.shots, **overrides)
    images = torch.from_numpy(np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32))
    eager = profile_eager(module, images, arguments.repetitions, arguments.warmup)

    levels = ", ".join(getattr(module.model.feature_extractor, "layers", []))
    print(f"\nResAD inference profile, {config_name} [{levels}], batch 1, k = {arguments.shots}, 224 px")
    print(describe(cpu_info(), runtime_versions()))
    print(f"torch threads: {torch.get_num_threads()}; {arguments.repetitions} repetitions after {arguments.warmup}")
    print_stage_table("Eager PyTorch f32, per stage:", eager["wall"], eager["cpu"])
    forward = eager["forward"]
    print(
        f"\nWhole ResAD.forward, same repetitions: median {statistics.median(forward):.1f} ms "
        f"(min {min(forward):.1f}, max {max(forward):.1f})"
    )
    if arguments.torch_ops:
        print("\ntorch.profiler, whole forward calls:\n")
        print(torch_operator_table(module, images, max(1, arguments.repetitions // 2), arguments.torch_ops))

    if not (arguments.openvino or arguments.ir):
        return
    with tempfile.TemporaryDirectory() as folder:
        ir_path = arguments.ir
        if ir_path is None:
            start = time.perf_counter()
            ir_path = str(module.to_openvino(arguments.keep_ir or folder, input_size=(224, 224)))
            print(f"\nExported to OpenVINO in {time.perf_counter() - start:.0f} s: {ir_path}")
        del module  # drop the torch model before timing OpenVINO
        result = profile_openvino(
            ir_path, images.numpy(), arguments.repetitions, arguments.warmup, arguments.nodes, arguments.threads
        )
    print_type_table(
        f"OpenVINO ({result['precision']}) per-layer counters (PERF_COUNT, node wall time), median per node type:",
        result["types"],
    )
    print(
        f"\nWall time per inference with counters on: median {statistics.median(result['wall']):.1f} ms "
        "(to compare with the sum of the node times)"
    )
    print("\nMost expensive nodes (median ms):\n\n| node | type | kernel | output shape | ms |\n|---|---|---|---|---|")
    for name, node_type, exec_type, shape, milliseconds in result["nodes"]:
        print(f"| {name} | {node_type} | {exec_type} | {shape} | {milliseconds:.1f} |")


if __name__ == "__main__":
    main()
