# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""The scoring constants ``c_l``: per class, learned in training, or measured in eval mode on held-out normals.

``c_l`` is the per-level log-likelihood above which a position counts as fully normal in the flows' map
(``1 - exp(min(log p - c_l, 0))``). Three sources are compared on the same checkpoint, references and forward passes
(issue 11, item 4):

* ``per_class`` (the default): the largest per-level log-likelihood of the class's k references, each scored
  against the other k - 1 (leave-one-out, part of the class's calibration);
* ``global, training EMA``: one value per level for every class, the EMA of the largest normal log-likelihood of each
  training step (BatchNorm on batch statistics, the constraintor and flows still training);
* ``global, eval mode``: one value per level for every class, measured *after* training in eval mode (BatchNorm on
  running statistics) on the source classes' held-out validation normals, each scored against k references of its own
  class drawn from its training images: the mean over those images of their per-level maximum log-likelihood. No
  target image is read.

For every target class, k and reference draw (the very same references as ``resad evaluate``), every test image goes
once through the backbone, matching, constraintor and flows; the anomaly map generator then scores it under each
constant, with that constant's own leave-one-out calibration, both as the product (``nearest_score``: the flows' map
fused with the nearest-neighbour map) and as the flows alone (the paper's score: the flows' map maximum - with the
product's odd-frame check, on by default, in both). Image and pixel AUROC per variant.

The eval-mode constant differs from the EMA in two ways at once: the model's mode (BatchNorm on running statistics,
trained weights) and the statistic (the mean of per-image maxima, where the EMA follows per-batch maxima over a
training batch's normal positions).

Also recorded: the verdict at each constant's own calibrated threshold (normal FPR, anomalous recall), and with
``--source_val`` the same on the source classes' held-out validation images.

Example:
    python benchmarks/global_constants.py --setting shared_pcb_crack_to_tile \
        --checkpoint results/grid/tile/train/ResAD/protocol/magnetic_tile/v0/weights/lightning/model.ckpt \
        --output results/global_constants_tile.csv
"""

import argparse
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import torch
from ablation import image_metrics, pixel_metrics
from torch.utils.data import DataLoader
from verdict_margins import load_product

from anomalib_resad import ResAD
from anomalib_resad.anomaly_map import NEAREST_LEVELS, AnomalyMapGenerator
from anomalib_resad.data.multi_class import CATEGORY_COLUMN, MultiClassDataModule, MultiClassDataset
from anomalib_resad.evaluation import _resize_of
from anomalib_resad.feature_converter import flatten_levels


def batches(resad: ResAD, samples: pd.DataFrame, batch_size: int = 8) -> Iterator[tuple[torch.Tensor, ...]]:
    """Pre-processed images, labels and masks (``None`` without masks) of a sample table, batch by batch."""
    has_masks = bool(samples.mask_path.astype(str).str.len().gt(0).any())
    dataset = MultiClassDataset(samples, "segmentation" if has_masks else "classification", _resize_of(resad))
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=dataset.collate_fn)
    for batch in loader:
        images, masks = resad.pre_processor.transform(batch.image, batch.gt_mask)
        yield images, batch.gt_label.reshape(-1).long(), (masks.reshape(len(images), -1).bool() if has_masks else None)


@torch.no_grad()
def eval_mode_constants(resad: ResAD, datamodule: MultiClassDataModule, k: int, seed: int) -> tuple[torch.Tensor, int]:
    """Mean per-level maximum log-likelihood of the source classes' held-out normals, eval mode, own-class banks."""
    model, val = resad.model, datamodule.val_data.samples
    maxima = []
    for category in datamodule.source_categories:
        normals = val[(val[CATEGORY_COLUMN] == category) & (val.label_index == 0)]
        if normals.empty:
            continue
        bank = flatten_levels(resad.references.features(resad.references.select(category, k, seed).paths))
        for images, _, _ in batches(resad, normals):
            log_likelihoods, _, _ = model.level_outputs(model.feature_extractor(images), bank)
            maxima.append(torch.stack([normal.flatten(1).amax(1) for normal, _ in log_likelihoods], dim=1))
    if not maxima:
        msg = "No held-out normal images of the source classes (val split): cannot measure eval-mode constants."
        raise SystemExit(msg)
    maxima = torch.cat(maxima)
    return maxima.mean(0), len(maxima)


def use_constants(generator: AnomalyMapGenerator, constants: torch.Tensor | None) -> None:
    """Score with the class's own constants (``None``) or with ``constants`` for every class."""
    generator.level_constants = "per_class" if constants is None else "global"
    if constants is not None:
        generator.global_level_constants.copy_(constants)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", required=True, help="a configs/settings/<name>.yaml")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--shots", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--output", required=True, help="CSV, one row per category, k, draw and variant")
    parser.add_argument("--source_val", action="store_true",
                        help="also score the source classes' held-out validation images (where defaults are chosen; "
                             "the eval-mode constants were measured on their normal ones)")  # fmt: skip
    args = parser.parse_args()
    seed, datamodule, resad = load_product(args.setting, args.checkpoint)
    categories = [*datamodule.target_categories, *datamodule.source_categories]
    resad.references.set_pools({name: datamodule.reference_pool(name) for name in categories})
    model, generator = resad.model, resad.model.anomaly_map_generator
    size = tuple(int(value) for value in resad.input_size)
    trained = generator.global_level_constants.clone()
    start = time.perf_counter()
    eval_mode = {}  # k -> constants measured with k-image banks of the source classes
    for k in args.shots:
        measured, count = eval_mode_constants(resad, datamodule, k, seed)
        eval_mode[k] = measured
        print(f"eval-mode constants, k={k}, {count} held-out source normals: {measured.tolist()}", flush=True)
    print(f"training EMA constants: {trained.tolist()} ({time.perf_counter() - start:.0f} s)", flush=True)
    groups = [("target", name, datamodule.test_data.samples) for name in datamodule.target_categories]
    if args.source_val:
        groups += [("source", name, datamodule.val_data.samples) for name in datamodule.source_categories]
    groups = [(role, name, table[table[CATEGORY_COLUMN] == name]) for role, name, table in groups]
    groups = [group for group in groups if group[2].label_index.nunique() >= 2]  # AUROC needs both labels
    rows = []
    for draw in range(args.draws):
        for role, category, samples in groups:
            for k in args.shots:
                selection = resad.references.select(category, k, seed + draw)
                features = resad.references.features(selection.paths)
                bank = flatten_levels(features)
                # None: the class's own (per-class) constants; a tensor: that global constant for every class
                variants = {"per_class": None, "global, training EMA": trained, "global, eval mode": eval_mode[k]}
                calibrations = {}
                for name, value in variants.items():
                    use_constants(generator, value)
                    calibrations[name] = resad.references.calibrate(features, size, selection.paths)
                scores = {(name, nearest): [] for name in variants for nearest in (True, False)}
                maps = {key: [] for key in scores}
                labels, masks = [], []
                for images, batch_labels, batch_masks in batches(resad, samples):
                    with torch.no_grad():
                        level_features = model.feature_extractor(images)
                        log_likelihoods, similarities, coverage = model.level_outputs(level_features, bank)
                        averaged = model.feature_converter.averaged_distances(level_features, bank, NEAREST_LEVELS)
                        for name, value in variants.items():
                            use_constants(generator, value)
                            for nearest in (True, False):
                                generator.nearest_score = nearest
                                anomaly_map, score = generator(
                                    log_likelihoods, similarities, size, calibrations[name], coverage, averaged
                                )
                                scores[name, nearest].append(score)
                                maps[name, nearest].append(anomaly_map.reshape(len(images), -1).half())
                    labels.append(batch_labels)
                    masks.append(batch_masks)
                generator.nearest_score = True
                labels = torch.cat(labels)
                masks = torch.cat(masks) if masks[0] is not None else None
                for (name, nearest), values in scores.items():
                    row = {"role": role, "category": category, "k": k, "draw": draw, "constants": name,
                           "score": "product (flows + nearest)" if nearest else "flows alone",
                           "constants_values": (calibrations[name][: model.num_levels] if variants[name] is None
                                                else variants[name]).tolist(),
                           "averaging": float(calibrations[name][-1])}  # fmt: skip
                    scored = torch.cat(values)
                    row.update(image_metrics(scored, labels))
                    # the verdict at the class's own threshold: scores are calibrated, 1 is the boundary
                    row["FPR"] = float((scored[labels == 0] > 1).float().mean())
                    row["recall"] = float((scored[labels == 1] > 1).float().mean())
                    row.update(pixel_metrics(torch.cat(maps[name, nearest]).float(), masks, aupro=False))
                    rows.append(row)
                frame = pd.DataFrame(rows)
                Path(args.output).parent.mkdir(parents=True, exist_ok=True)
                frame.to_csv(args.output, index=False)
                print(f"{category} k={k} draw={draw} ({time.perf_counter() - start:.0f} s)", flush=True)
    summary = (
        frame.groupby(["role", "score", "constants", "k", "draw"])[["image_AUROC", "pixel_AUROC", "FPR", "recall"]]
        .mean()  # over classes
        .groupby(["role", "score", "constants", "k"])
        .agg(["mean", "std"])  # over draws
    )
    print(summary.to_string(float_format=lambda value: f"{100 * value:.1f}"))


if __name__ == "__main__":
    main()
