# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""OpenVINO INT8 (NNCF post-training quantisation) against OpenVINO f32 and eager PyTorch, on a trained ResAD.

For one unseen class (an MVTec-layout folder ``<root>`` with ``train/good`` and ``test/<defect>``), per reference draw:
k normal images drawn from ``train/good`` are stored in the checkpoint's model (calibrated bank, as
``resad references`` + ``anomalib export`` do), the model is exported to OpenVINO f32 (anomalib's ``to_openvino``) and
quantised to INT8 with ``nncf.quantize`` - what ``anomalib export --compression_type int8_ptq`` runs - on normal images
of the *source* classes (``--calibration`` folders; never the target's test images). Every test image is then scored
by eager PyTorch, OpenVINO f32 and OpenVINO INT8 in turn (interleaved, so a noisy machine slows all three alike), and
the table gives, per runtime: median ms/image at batch 1 (eager timed on every 8th image: its scores equal OpenVINO
f32's, tested in tests/e2e/test_export.py), the ratio to eager, image AUROC, and for INT8 how many
``pred_label`` differ from f32 and the largest score difference.

    python benchmarks/bench_quantization.py --checkpoint results/tile_e3_nearest.ckpt \\
        --target ../shared/data/magnetic_tile/magnetic_tile \\
        --calibration ../shared/data/deeppcb/pcb_12000/train/good ../shared/data/crackforest/pavement/train/good

The CPU is printed above the table (INT8 speed depends on VNNI/AMX units; AVX2-only CPUs have neither).
"""

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_inference import KEEP_F32, quantize_int8
from PIL import Image
from torchmetrics.functional.classification import binary_auroc

from anomalib_resad import ResAD
from anomalib_resad.cpu_info import cpu_info, describe, runtime_versions
from anomalib_resad.references import list_folder_images, load_images, sample_references
from anomalib_resad.synthetic_defects import synthetic_defects


def read_rgb(path: str | Path, size: tuple[int, int]) -> np.ndarray:
    """``(1, 3, H, W)`` float32 in ``[0, 1]`` at the model's input size (the exported graph would resize anyway)."""
    image = Image.open(path).convert("RGB").resize((size[1], size[0]), Image.BILINEAR)
    return (np.asarray(image, dtype=np.float32) / 255).transpose(2, 0, 1)[None]


def test_images(root: Path) -> tuple[list[str], list[int]]:
    """Test images of an MVTec-layout class and their labels (``good`` = 0)."""
    paths, labels = [], []
    for folder in sorted((root / "test").iterdir()):
        if folder.is_dir():
            images = list_folder_images(folder)
            paths += images
            labels += [int(folder.name != "good")] * len(images)
    return paths, labels


def main() -> None:
    """Export, quantise, score and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--target", type=Path, required=True, help="MVTec-layout class folder of an unseen class")
    parser.add_argument("--calibration", type=Path, nargs="+", required=True, help="folders of source normal images")
    parser.add_argument("--calibration_images", type=int, default=64, help="images drawn from those folders")
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--draws", type=int, default=1)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=1, help="threads of every runtime (1: least noise)")
    parser.add_argument("--limit", type=int, default=None, help="score only this many test images (evenly spaced)")
    parser.add_argument("--keep_f32", nargs="+", choices=sorted(KEEP_F32), default=["none", "matching"],
                        help="INT8 variants: what stays f32 (none: NNCF's defaults; matching: the reference "
                             "matching's products; matmul: every matrix product; features: convolutions and "
                             "matching)")  # fmt: skip
    parser.add_argument("--eager_every", type=int, default=8, help="time eager PyTorch on every n-th image only")
    parser.add_argument("--ranges", choices=["default", "wide"], default="default",
                        help="NNCF activation ranges: its defaults (mean over images of each image's min / max) or "
                             "the min / max over all images with asymmetric activations (MIXED preset)")  # fmt: skip
    parser.add_argument("--calibration_defects", action="store_true",
                        help="paste one synthetic defect (a Perlin-noise blend: synthetic_defects' first kind) into "
                             "every other calibration image (still source images only): activation ranges then "
                             "cover anomalous residuals too")  # fmt: skip
    args = parser.parse_args()

    import openvino as ov

    versions = runtime_versions()  # the commit this run starts from
    torch.set_num_threads(args.threads)
    resad = ResAD.load_from_checkpoint(args.checkpoint, map_location="cpu").eval()
    size = tuple(int(v) for v in resad.input_size)
    transform = resad.pre_processor.transform
    pool = [path for folder in args.calibration for path in list_folder_images(folder)]
    calibration = [read_rgb(path, size) for path in random.Random(args.seed).sample(pool, args.calibration_images)]
    if args.calibration_defects:
        for index in range(0, len(calibration), 2):
            defective = synthetic_defects(torch.from_numpy(calibration[index]), count=1, seed=index)
            calibration[index] = defective[:, 0].numpy()
    paths, labels = test_images(args.target)
    if args.limit:
        keep = np.linspace(0, len(paths) - 1, args.limit).round().astype(int)
        paths, labels = [paths[i] for i in keep], [labels[i] for i in keep]
    core = ov.Core()
    options = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": args.threads}
    results: dict[str, dict[str, list[float]]] = {}
    for draw in range(args.draws):
        references = sample_references(list_folder_images(args.target / "train" / "good"), args.shots, args.seed + draw)
        resad.model.set_references(resad.model.make_reference_bank(load_images(references, transform, True)))
        with tempfile.TemporaryDirectory() as root:
            xml = resad.to_openvino(root, input_size=size)
            models = {"f32": xml}
            for keep in args.keep_f32:
                name = "int8" if keep == "none" else f"int8_{keep}_f32"
                models[name] = quantize_int8(
                    xml, calibration, Path(root) / f"{name}.xml", keep_f32=keep, ranges=args.ranges
                )
            compiled = {name: core.compile_model(path, "CPU", options) for name, path in models.items()}
            scores: dict[str, list[float]] = {name: [] for name in models}
            predicted: dict[str, list[bool]] = {name: [] for name in models}
            times: dict[str, list[float]] = {"eager": [], **{name: [] for name in models}}
            for index, path in enumerate(paths):
                image = read_rgb(path, size)
                if index % args.eager_every == 0:  # eager scores equal f32's: timed on a subset only
                    start = time.perf_counter()
                    with torch.no_grad():
                        resad(torch.from_numpy(image))
                    times["eager"].append(time.perf_counter() - start)
                for name, model in compiled.items():
                    start = time.perf_counter()
                    output = model(image)
                    times[name].append(time.perf_counter() - start)
                    scores[name].append(float(output[model.output("pred_score")].reshape(-1)[0]))
                    predicted[name].append(bool(output[model.output("pred_label")].reshape(-1)[0]))
        target = torch.tensor(labels)
        for name, measured in times.items():
            row = results.setdefault(name, {"ms": [], "auroc": [], "flips": [], "diff": []})
            row["ms"].append(1000 * statistics.median(measured))
            if name in scores:
                row["auroc"].append(float(binary_auroc(torch.tensor(scores[name]), target)))
            if name.startswith("int8"):
                row["flips"].append(sum(a != b for a, b in zip(predicted["f32"], predicted[name], strict=True)))
                row["diff"].append(float(np.abs(np.subtract(scores[name], scores["f32"])).max()))
        print(f"draw {draw}: " + ", ".join(f"{n} {results[n]['auroc'][-1]:.4f}" for n in scores), flush=True)

    print(f"\nResAD on {args.target.name} ({len(paths)} test images), k = {args.shots}, {args.draws} draw(s), "
          f"{args.threads} thread(s), checkpoint {args.checkpoint}, NNCF ranges {args.ranges}, "
          f"calibration defects {args.calibration_defects}")  # fmt: skip
    print(describe(cpu_info(), versions) + "\n")
    print("| runtime | ms / image (batch 1, median) | vs eager | image AUROC | labels differing from f32 | "
          "max score difference vs f32 |\n|---|---|---|---|---|---|")  # fmt: skip
    eager_ms = statistics.mean(results["eager"]["ms"])
    titles = {"eager": "PyTorch eager f32", "f32": "OpenVINO f32", "int8": "OpenVINO INT8 (NNCF PTQ)",
              "int8_matching_f32": "OpenVINO INT8, the matching's products f32",
              "int8_matmul_f32": "OpenVINO INT8, convolutions only (matrix products f32)",
              "int8_features_f32": "OpenVINO INT8, flows only (convolutions and matching f32)"}  # fmt: skip
    for name, row in results.items():
        label = titles[name]
        ms, auroc = statistics.mean(row["ms"]), np.array(row["auroc"] or [np.nan]) * 100
        auroc_text = f"{auroc.mean():.1f} ± {auroc.std():.1f}" if row["auroc"] else "(= OpenVINO f32's)"
        flips = f"{statistics.mean(row['flips']):.1f} / {len(paths)}" if row["flips"] else "-"
        diff = f"{max(row['diff']):.3f}" if row["diff"] else "-"
        print(f"| {label} | {ms:.1f} | {eager_ms / ms:.2f}x | {auroc_text} | {flips} | {diff} |")


if __name__ == "__main__":
    main()
