# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""``reference_views`` on the same checkpoint, references and images: target classes and source validation.

For every class, k and reference draw (the very same references as ``resad evaluate``), the product scores the test
images against the class's bank made with each ``reference_views`` mode (its own leave-one-out calibration), through
the product's own path (``ClassReferences.bank`` and ``ResADModel.forward``): image and pixel AUROC, and the verdict
at the class's calibrated threshold (normal FPR, anomalous recall). ``--roles source`` scores the source classes'
held-out validation images against references drawn from their own training images - where defaults are chosen.

Example:
    python benchmarks/reference_views.py --setting shared_pcb_crack_to_tile --roles source \
        --checkpoint results/grid/tile/train/ResAD/protocol/magnetic_tile/v0/weights/lightning/model.ckpt \
        --output results/reference_views/tile_source.csv
"""

import argparse
import time
from pathlib import Path

import pandas as pd
import torch
from ablation import image_metrics, pixel_metrics
from global_constants import batches
from verdict_margins import load_product

from anomalib_resad.data.multi_class import CATEGORY_COLUMN


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", required=True, help="a configs/settings/<name>.yaml")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--modes", nargs="+", default=["none", "dihedral"])
    parser.add_argument("--view_levels", type=int, default=2, help="reference_view_levels")
    parser.add_argument("--roles", nargs="+", default=["target", "source"], choices=["target", "source"])
    parser.add_argument("--shots", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--output", required=True, help="CSV, one row per role, category, k, draw and mode")
    args = parser.parse_args()
    seed, datamodule, resad = load_product(args.setting, args.checkpoint)
    model = resad.model
    model.reference_view_levels = args.view_levels
    categories = [*datamodule.target_categories, *datamodule.source_categories]
    resad.references.set_pools({name: datamodule.reference_pool(name) for name in categories})
    groups = []
    if "target" in args.roles:
        groups += [("target", name, datamodule.test_data.samples) for name in datamodule.target_categories]
    if "source" in args.roles:
        groups += [("source", name, datamodule.val_data.samples) for name in datamodule.source_categories]
    groups = [(role, name, table[table[CATEGORY_COLUMN] == name]) for role, name, table in groups]
    groups = [group for group in groups if group[2].label_index.nunique() >= 2]  # AUROC needs both labels
    rows, start = [], time.perf_counter()
    for draw in range(args.draws):
        for role, category, samples in groups:
            for k in args.shots:
                selection = resad.references.select(category, k, seed + draw)
                banks = {}
                for mode in args.modes:
                    model.reference_views = mode
                    banks[mode] = resad.references.bank(selection)
                scores = {mode: [] for mode in args.modes}
                maps = {mode: [] for mode in args.modes}
                labels, masks = [], []
                for images, batch_labels, batch_masks in batches(resad, samples):
                    with torch.no_grad():
                        for mode, bank in banks.items():
                            output = model(images, reference_bank=bank.levels, calibration=bank.calibration)
                            scores[mode].append(output.pred_score)
                            maps[mode].append(output.anomaly_map.reshape(len(images), -1).half())
                    labels.append(batch_labels)
                    masks.append(batch_masks)
                labels = torch.cat(labels)
                masks = torch.cat(masks) if masks[0] is not None else None
                for mode in args.modes:
                    scored = torch.cat(scores[mode])
                    row = {"role": role, "category": category, "k": k, "draw": draw, "reference_views": mode,
                           "averaging": float(banks[mode].calibration[-1])}  # fmt: skip
                    row.update(image_metrics(scored, labels))
                    row["FPR"] = float((scored[labels == 0] > 1).float().mean())
                    row["recall"] = float((scored[labels == 1] > 1).float().mean())
                    row.update(pixel_metrics(torch.cat(maps[mode]).float(), masks, aupro=False))
                    rows.append(row)
                frame = pd.DataFrame(rows)
                Path(args.output).parent.mkdir(parents=True, exist_ok=True)
                frame.to_csv(args.output, index=False)
                print(f"{role} {category} k={k} draw={draw} ({time.perf_counter() - start:.0f} s)", flush=True)
    summary = (
        frame.groupby(["role", "reference_views", "k", "draw"])[["image_AUROC", "pixel_AUROC", "FPR", "recall"]]
        .mean()  # over classes
        .groupby(["role", "reference_views", "k"])
        .agg(["mean", "std"])  # over draws
    )
    print(summary.to_string(float_format=lambda value: f"{100 * value:.1f}"))


if __name__ == "__main__":
    main()
