# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""Eager inference time of trained ResAD checkpoints side by side (e.g. with and without a feature level).

Each checkpoint gets the same k reference images (random pixels: speed does not depend on them) and scores the same
batches; the checkpoints are timed in turns (round-robin), so a noisy machine slows all of them alike. Prints the CPU
and the runtime versions, then one markdown row per checkpoint and batch size: median ms per image and the ratio to
the first checkpoint. With ``--patchcore``, anomalib's PatchCore given the same k images (the first checkpoint's
backbone and two deepest levels, as ``resad evaluate`` builds it) is timed in the same turns: the side-by-side
latency ratio of issue 13. PatchCore's own map smoothing (anomalib's ``GaussianBlur2d``, a full 33 x 33 kernel) is
much of its time on a CPU; a second PatchCore row swaps it for the equivalent separable blur ResAD uses (the same
maps, checked here), so the ratio is also given with both models' smoothing written alike.

    python benchmarks/bench_checkpoints.py results/ablation_e3/shared_tile_crack_to_pcb/model.ckpt \\
        results/ablation_2level/shared_tile_crack_to_pcb/model.ckpt
"""

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from anomalib_resad import ResAD
from anomalib_resad.anomaly_map import SeparableGaussianBlur
from anomalib_resad.baselines import FewShotPatchcore
from anomalib_resad.cpu_info import cpu_info, describe, runtime_versions
from anomalib_resad.references import select_folder_references


def patchcore_like(resad: ResAD, shots: int, size: tuple[int, int], folder: Path) -> tuple[str, torch.nn.Module]:
    """PatchCore k-shot with the checkpoint's backbone and two deepest levels, on k random-pixel images."""
    for index in range(shots):
        pixels = (np.random.default_rng(index).random((*size, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{index}.png")
    hparams = resad.hparams
    baseline = FewShotPatchcore(hparams["backbone"], list(hparams["layers"])[-2:], hparams["pre_trained"], size[0])
    baseline.set_references(select_folder_references(folder, shots, "random"))
    torch_model = baseline.model.model.eval()
    layers = ", ".join(list(hparams["layers"])[-2:])
    return layers, torch_model


@torch.no_grad()
def main() -> None:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", type=Path, nargs="+")
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--patchcore", action="store_true", help="also PatchCore k-shot, same backbone and images")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall time, or this process's CPU time (with --threads 1: the work itself, not inflated by other jobs)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: its default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    print(describe(cpu_info(), runtime_versions()))
    print(f"torch threads: {torch.get_num_threads()}; clock: {args.clock}\n")
    torch.manual_seed(0)
    models = []
    for path in args.checkpoints:
        model = ResAD.load_from_checkpoint(path, map_location="cpu").eval()
        size = tuple(int(value) for value in model.input_size)
        model.model.set_references(model.model.make_reference_bank(torch.rand(args.shots, 3, *size)))
        models.append(
            (path, model.pre_processor.transform, model.model, ", ".join(model.model.feature_extractor.layers), size)
        )
    if args.patchcore:
        folder = Path(tempfile.mkdtemp())
        first = ResAD.load_from_checkpoint(args.checkpoints[0], map_location="cpu")
        layers, run = patchcore_like(first, args.shots, models[0][4], folder)
        models.append((Path("PatchCore (anomalib), same k"), models[0][1], run, layers, models[0][4]))
        separable = copy.deepcopy(run)
        full_blur = separable.anomaly_map_generator.blur
        sigma = (full_blur.height - 1) / 8  # anomalib's kernel size is 2 * int(4 sigma + 0.5) + 1
        separable.anomaly_map_generator.blur = SeparableGaussianBlur(sigma, padding_mode=full_blur.border_type)
        check = models[0][1](torch.rand(2, 3, *models[0][4]))
        torch.testing.assert_close(separable(check).anomaly_map, run(check).anomaly_map, atol=1e-5, rtol=1e-4)
        models.append((Path("PatchCore, separable blur"), models[0][1], separable, layers, models[0][4]))
    print(f"| checkpoint | layers | batch | eager {args.clock} ms / image (median) | vs first |")
    print("|---|---|---|---|---|")
    for batch in args.batches:
        times: dict[Path, list[float]] = {path: [] for path, *_ in models}
        for round_index in range(args.rounds + 1):
            for path, transform, run, _, size in models:
                images = transform(torch.rand(batch, 3, *size))
                start = clock()
                run(images)
                if round_index:  # the first round warms up
                    times[path].append((clock() - start) / batch)
        first = statistics.median(times[models[0][0]])
        for path, _, _, layers, _ in models:
            median = statistics.median(times[path])
            print(f"| {path} | {layers} | {batch} | {1000 * median:.1f} | {median / first:.2f}x |")


if __name__ == "__main__":
    main()
