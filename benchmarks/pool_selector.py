# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""Per-class choice of PatchCore's 3x3 neighbourhood averaging from the k references alone (issue 11, measured).

The ablation found that averaging each feature with its 3 x 3 neighbours before matching (PatchCore does, the
reference ResAD does not) helps the textures by 1-2 points of image AUROC and costs the circuit boards 3-4. This
script asks whether a class's k normal images can tell which it needs, with no anomalous image and no test image:
each reference is scored against the other k - 1 (leave-one-out: normal scores, their maximum the threshold), and
synthetic defects pasted into the references (anomalib's Perlin-noise anomalies, small dark/bright spots, thin
scratches) are scored the same way; the averaged matching is chosen when its synthetic defects land more than
``1 + AVERAGING_GAIN`` times further above its own leave-one-out threshold (median ratio). The choice is the
product's own: ``ResADModel.calibrate`` with ``nearest_averaging="auto"`` (:mod:`anomalib_resad.anomaly_map`).

The choice is then scored on the real test images with the per-image ratios that ``benchmarks/ablation.py`` wrote
(``image_scores.csv``: ``max``, ``nn2``, ``nn2pool``; the same checkpoint, seed and reference draws), against always
precise (the product's ``max+nn2``) and always averaged (``max+nn2+pool``).

    python benchmarks/pool_selector.py --setting shared_pcb_crack_to_tile \\
        --checkpoint results/ablation_e3/shared_pcb_crack_to_tile/model.ckpt \\
        --image_scores results/rescore_tile_pool/shared_pcb_crack_to_tile/image_scores.csv
"""

import argparse
from pathlib import Path

import pandas as pd
import torch
import yaml
from torchmetrics.functional.classification import binary_auroc

from anomalib_resad import ResAD
from anomalib_resad.anomaly_map import ScoreCalibration
from anomalib_resad.data.multi_class import MultiClassDataModule
from anomalib_resad.references import load_images

REPO = Path(__file__).resolve().parents[1]


@torch.no_grad()
def choose(resad: ResAD, paths: list[str]) -> dict[str, float]:
    """The product's own choice: the class's calibration with ``nearest_averaging="auto"`` from its k references."""
    images = load_images(paths, resad.pre_processor.transform)
    model = resad.model
    calibration = ScoreCalibration.from_tensor(
        model.calibrate(model.reference_features(images), images.shape[-2:], images)
    )
    return {"choice": "pool" if calibration.averaging > 0 else "precise"}


def auroc(scores: pd.Series, labels: pd.Series) -> float:
    return float(binary_auroc(torch.tensor(scores.to_numpy()), torch.tensor(labels.to_numpy())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", required=True)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--image_scores", required=True, help="image_scores.csv of benchmarks/ablation.py")
    parser.add_argument("--output", default=None, help="CSV of the per-draw choices and AUROCs")
    args = parser.parse_args()
    config = yaml.safe_load((REPO / "configs" / "settings" / f"{args.setting}.yaml").read_text())
    seed = config.get("seed", 42)
    datamodule = MultiClassDataModule(
        sources=config["sources"], targets=config["targets"], seed=seed, num_workers=0, name=args.setting
    )
    datamodule.setup()
    resad = ResAD.load_from_checkpoint(args.checkpoint, map_location="cpu", nearest_averaging="auto").eval()
    pools = {name: datamodule.reference_pool(name) for name in datamodule.target_categories}
    pools.update({name: datamodule.reference_pool(name) for name in datamodule.source_categories})
    resad.references.set_pools(pools)
    scores = pd.read_csv(args.image_scores)
    rows = []
    for (role, category, k, draw), images in scores.groupby(["role", "category", "k", "draw"]):
        if images.label.nunique() < 2:
            continue
        selection = resad.references.select(category, int(k), seed + int(draw))
        decision = choose(resad, selection.paths)
        precise = (images["max"] + images["nn2"]) / 2
        pooled = (images["max"] + (images["nn2"] + images["nn2pool"]) / 2) / 2
        row = {"role": role, "category": category, "k": k, "draw": draw, **decision,
               "auroc_precise": auroc(precise, images.label), "auroc_pool": auroc(pooled, images.label)}  # fmt: skip
        row["auroc_chosen"] = row["auroc_pool"] if decision["choice"] == "pool" else row["auroc_precise"]
        rows.append(row)
        print({key: round(value, 3) if isinstance(value, float) else value for key, value in row.items()}, flush=True)
    frame = pd.DataFrame(rows)
    if args.output:
        frame.to_csv(args.output, index=False)
    metrics = ["auroc_precise", "auroc_pool", "auroc_chosen"]
    per_draw = frame.groupby(["role", "k", "draw"])[metrics].mean()
    print((per_draw.groupby(["role", "k"]).agg(["mean", "std"]) * 100).round(1).to_string())
    print(frame.groupby(["role", "category", "k"]).choice.value_counts().unstack(fill_value=0).to_string())


if __name__ == "__main__":
    main()
