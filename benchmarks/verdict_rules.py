# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""Image-score and verdict rules of ResAD compared offline, on the per-image ratios ``benchmarks/ablation.py`` saves.

``ablation.py`` writes ``<output>/<setting>/image_scores.csv``: for every test image of every (role, category, k,
draw), its label and three statistics, each divided by its own leave-one-out threshold from the k references (so 1 is
the largest value the references gave each other): ``max`` (the flows' map maximum), ``nn2`` (the nearest-neighbour
distance on the two deepest levels) and ``dis`` (the dissimilarity of the odd-frame check). Every rule below is a
function of those numbers, so no forward pass is repeated:

* image score ``s_w = w * max + (1 - w) * nn2`` for ``w`` in ``--weights`` (``w = 0.5`` was ``nearest_score``
  until the image score became the fused map's maximum, ``w = 1`` the flows alone, ``w = 0`` the nearest-neighbour
  score alone);
* verdict ``max(s_w / margin, dis / dissimilarity_margin, rev / reverse_margin) > 1`` (the product's odd-frame
  check; ``rev``, the reverse dissimilarity, where the file has it, at ``--reverse_margin``), for the grids of
  both margins; the *gated* check (the dissimilarity takes over only above its own threshold) gives the same labels and
  a ranking in which it cannot reorder images below it.

Defaults are to be read off the ``source`` rows (held-out images of the training classes), never the targets:

    python benchmarks/verdict_rules.py results/rescore_tile/shared_pcb_crack_to_tile/image_scores.csv ...
"""

import argparse
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torchmetrics.functional.classification import binary_auroc

WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)
MARGINS = (0.9, 1.0, 1.1, 1.25, 1.5)
DISSIMILARITY_MARGINS = (1.0, 1.1, 1.25, 1.5, 2.0, math.inf)
GROUP = ["setting", "role", "k"]


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Image AUROC (NaN with one class only)."""
    if labels.min() == labels.max():
        return math.nan
    return float(binary_auroc(torch.from_numpy(scores.astype(np.float32)), torch.from_numpy(labels)))


def oracle(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float, float]:
    """F1-max over thresholds chosen on the labels, and that threshold's recall and false-positive rate."""
    order = np.argsort(-scores)
    labels_sorted = labels[order]
    tp = np.cumsum(labels_sorted)
    fp = np.cumsum(1 - labels_sorted)
    positives = labels.sum()
    f1 = 2 * tp / (tp + fp + positives)
    best = int(np.argmax(f1))
    return float(f1[best]), float(tp[best] / max(positives, 1)), float(fp[best] / max((1 - labels).sum(), 1))


def cell_rows(frame: pd.DataFrame, weights: tuple[float, ...], reverse_margin: float = 1.5) -> pd.DataFrame:
    """One row per (setting, role, category, k, draw, w, margin, dissimilarity margin)."""
    rows = []
    keys = ["setting", "role", "category", "k", "draw"]
    for key, cell in frame.groupby(keys):
        labels = cell.label.to_numpy().astype(int)
        # the reverse statistic where the file has it (ablation.py since it was added), over its own margin
        reverse = cell.rev.to_numpy() / reverse_margin if "rev" in cell else np.zeros(len(cell))
        normal, anomalous = labels == 0, labels == 1
        for weight in weights:
            score = weight * cell["max"].to_numpy() + (1 - weight) * cell["nn2"].to_numpy()
            f1, oracle_recall, oracle_fpr = oracle(score, labels)
            base = dict(zip(keys, key, strict=True)) | {
                "w": weight, "auroc": auroc(score, labels), "oracle_f1": f1, "oracle_recall": oracle_recall,
                "oracle_fpr": oracle_fpr,
            }  # fmt: skip
            for margin in MARGINS:
                for dissimilarity_margin in DISSIMILARITY_MARGINS:
                    odd = np.maximum(cell.dis.to_numpy() / dissimilarity_margin, reverse)
                    checked = np.maximum(score / margin, odd)
                    gated = np.where(checked > 1, checked, score / margin)
                    flagged = checked > 1
                    rows.append(base | {
                        "margin": margin, "dis_margin": dissimilarity_margin,
                        "auroc_checked": auroc(checked, labels), "auroc_gated": auroc(gated, labels),
                        "fpr": float(flagged[normal].mean()) if normal.any() else math.nan,
                        "recall": float(flagged[anomalous].mean()) if anomalous.any() else math.nan,
                    })  # fmt: skip
    return pd.DataFrame(rows)


def over_draws(rows: pd.DataFrame, columns: list[str], by: list[str]) -> pd.DataFrame:
    """Mean over categories per draw, then mean and std over draws (in %)."""
    per_draw = rows.groupby([*by, "draw"])[columns].mean()
    return (per_draw.groupby(by).agg(["mean", "std"]) * 100).round(1)


def main() -> None:
    """Print the tables."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", type=Path, nargs="+", help="image_scores.csv files of benchmarks/ablation.py")
    parser.add_argument("--weights", type=float, nargs="+", default=list(WEIGHTS))
    parser.add_argument("--margin", type=float, default=None, help="show verdicts at this margin only")
    parser.add_argument("--reverse_margin", type=float, default=1.5, help="margin of the reverse dissimilarity")
    args = parser.parse_args()
    frame = pd.concat([pd.read_csv(path) for path in args.files], ignore_index=True)
    rows = cell_rows(frame, tuple(args.weights), args.reverse_margin)
    ranking = rows[(rows.margin == MARGINS[0]) & (rows.dis_margin == DISSIMILARITY_MARGINS[0])]
    print("Image AUROC of s_w (no odd-frame check), mean ± std over draws of the mean over categories:\n")
    print(over_draws(ranking, ["auroc"], [*GROUP, "w"]).to_string())
    print("\nImage AUROC with the odd-frame check (dissimilarity margin 1.0 .. 1.5), plain and gated, margin 1:\n")
    checked = rows[(rows.margin == 1.0) & rows.dis_margin.isin([1.0, 1.25, 1.5])]
    print(over_draws(checked, ["auroc_checked", "auroc_gated"], [*GROUP, "w", "dis_margin"]).to_string())
    margins = [args.margin] if args.margin else list(MARGINS)
    verdict = rows[rows.margin.isin(margins)]
    print(
        "\nVerdicts: false-positive rate on normal and recall on anomalous images (%), oracle F1-max and its recall:\n"
    )
    table = over_draws(verdict, ["fpr", "recall", "oracle_f1", "oracle_recall"], [*GROUP, "w", "margin", "dis_margin"])
    print(table.xs("mean", axis=1, level=1).to_string())


if __name__ == "__main__":
    main()
