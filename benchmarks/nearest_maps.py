# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""Which nearest-neighbour map localises best on classes the flows never saw (issue 11's pixel bar).

Training-free diagnostics on the backbone levels the nearest-neighbour term uses (the two deepest), each map
upsampled to the input size and blurred like ResAD's (sigma 4), pixel and image AUROC per target class, k and draw
(the very same references as ``benchmarks/ablation.py``):

* ``cos levels``: ``1 - cos`` of each level's nearest reference feature, per level at its own resolution, summed
  (ResAD's ``nn2`` today); ``euc levels``: the same with the Euclidean distance;
* ``cos concat`` / ``euc concat``: PatchCore's embedding - the deeper level bilinearly upsampled to the shallower
  level's grid and concatenated, one joint match per position (``euc concat pooled`` is PatchCore's map);
* ``... pooled``: both sides 3 x 3 averaged first (PatchCore's neighbourhood averaging);
* with ``--checkpoint``: the flows' calibrated map, and each nearest map divided by its leave-one-out threshold and
  averaged with it (``flows + <map>``), as the product fuses its map; the image AUROC of a variant is that of its
  maximum - the product's image score since the fused map's maximum replaced the mean of the two maxima.

No test image or label chooses anything here; the table is for choosing a default leave-one-setting-out.

Example:
    python benchmarks/nearest_maps.py --settings shared_pcb_crack_to_tile \
        --checkpoint results/ablation_e3/shared_pcb_crack_to_tile/model.ckpt
"""

import argparse
import json
import subprocess
import time
from pathlib import Path

import pandas as pd
import torch
from torch.nn import functional as F  # noqa: N812
from torchmetrics.functional.classification import binary_auroc
from verdict_margins import setting_datamodule

from anomalib_resad import ResAD
from anomalib_resad.anomaly_map import leave_one_out_calibration
from anomalib_resad.data.multi_class import CATEGORY_COLUMN, MultiClassDataset
from anomalib_resad.evaluation import _resize_of
from anomalib_resad.feature_converter import flatten_levels

REPO = Path(__file__).resolve().parents[1]
VARIANTS = [f"{distance} {layout}{pooled}" for distance in ("cos", "euc") for layout in ("levels", "concat")
            for pooled in ("", " pooled")]  # fmt: skip


def _auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    # rescaled to [0, 1]: torchmetrics applies a sigmoid to values outside it, which ties large distances
    scores = scores.flatten().float()
    low, high = scores.min(), scores.max()
    scores = (scores - low) / (high - low) if high > low else torch.zeros_like(scores)
    return float(binary_auroc(scores, labels.flatten().long()))


def nearest_distance(query: torch.Tensor, bank: torch.Tensor, distance: str) -> torch.Tensor:
    """``(B, C, H, W)`` query vs ``(N, C, h, w)`` bank: each query position's distance to its nearest bank position."""
    batch, channels, height, width = query.shape
    flat_query = query.permute(0, 2, 3, 1).reshape(-1, channels)
    flat_bank = bank.permute(0, 2, 3, 1).reshape(-1, channels)
    if distance == "cos":
        similarity = F.normalize(flat_query, dim=1) @ F.normalize(flat_bank, dim=1).T
        best = 1 - similarity.amax(dim=1)
    else:
        best = torch.cdist(flat_query, flat_bank).amin(dim=1)
    return best.reshape(batch, 1, height, width)


def nearest_maps(
    query: list[torch.Tensor], bank: list[torch.Tensor], size: tuple[int, int], blur, upsample
) -> dict[str, torch.Tensor]:
    """Every variant's blurred map ``(B, H, W)`` of a batch against a bank (both: the two deepest levels)."""
    maps = {}
    for pooled in ("", " pooled"):
        if pooled:
            query = [F.avg_pool2d(level, 3, stride=1, padding=1) for level in query]
            bank = [F.avg_pool2d(level, 3, stride=1, padding=1) for level in bank]
        grid = query[0].shape[-2:]
        concat_query = torch.cat([query[0], F.interpolate(query[1], size=grid, mode="bilinear")], dim=1)
        concat_bank = torch.cat([bank[0], F.interpolate(bank[1], size=bank[0].shape[-2:], mode="bilinear")], dim=1)
        for distance in ("cos", "euc"):
            levels = sum(upsample(nearest_distance(q, b, distance), size) for q, b in zip(query, bank, strict=True))
            concat = upsample(nearest_distance(concat_query, concat_bank, distance), size)
            maps[f"{distance} levels{pooled}"] = blur(levels)[:, 0]
            maps[f"{distance} concat{pooled}"] = blur(concat)[:, 0]
    return maps


def score_category(resad: ResAD, samples: pd.DataFrame, selection, batch_size: int, flows: bool) -> list[dict]:
    model = resad.model.eval()
    generator = model.anomaly_map_generator
    features = resad.references.features(selection.paths)
    deepest = features[-2:]
    size = tuple(int(v) for v in resad.input_size)

    def maps_of(query: list[torch.Tensor], bank: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return nearest_maps(query, bank, size, generator.blur, generator._upsample)

    # leave-one-out thresholds of every variant: the largest map value of a reference against the other k - 1
    thresholds = dict.fromkeys(VARIANTS, 0.0)
    for index in range(selection.k):
        others = [torch.cat([level[:index], level[index + 1 :]]) for level in deepest]
        for name, values in maps_of([level[index : index + 1] for level in deepest], others).items():
            thresholds[name] = max(thresholds[name], float(values.max()))
    calibration = None
    if flows:

        def score_reference(index: int, constants: torch.Tensor) -> object:
            others = [torch.cat([level[:index], level[index + 1 :]]) for level in features]
            query = [level[index : index + 1] for level in features]
            return model.score_components(query, flatten_levels(others), constants, size)

        calibration = leave_one_out_calibration(score_reference, selection.k, model.num_levels)
    bank = flatten_levels(features)
    dataset = MultiClassDataset(samples, "segmentation", _resize_of(resad))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=dataset.collate_fn)
    collected: dict[str, list[torch.Tensor]] = {}
    labels, masks = [], []
    for batch in loader:
        images, gt_masks = resad.pre_processor.transform(batch.image, batch.gt_mask)
        query = model.feature_extractor(images)
        maps = {name: values / max(thresholds[name], 1e-6) for name, values in maps_of(query[-2:], deepest).items()}
        if calibration is not None:
            log_likelihoods, similarities, coverage = model.level_outputs(query, bank)
            parts = generator.components(log_likelihoods, similarities, size, calibration.level_constants, coverage)
            flow_map = parts.anomaly_map[:, 0] / calibration.map_threshold
            maps = {**maps, **{f"flows + {name}": (flow_map + values) / 2 for name, values in maps.items()}}
            maps["flows"] = flow_map
        for name, values in maps.items():
            collected.setdefault(name, []).append(values)
        labels.append(batch.gt_label.reshape(-1))
        masks.append(gt_masks.reshape(len(images), *size).bool())
    labels, masks = torch.cat(labels).long(), torch.cat(masks)
    rows = []
    for name, parts in collected.items():
        values = torch.cat(parts)
        rows.append(
            {
                "variant": name,
                "pixel_AUROC": _auroc(values, masks),
                "image_AUROC": _auroc(values.flatten(start_dim=1).amax(dim=1), labels),
            }
        )
    return rows


def run_setting(args: argparse.Namespace, setting: str) -> pd.DataFrame:
    config, seed, datamodule = setting_datamodule(setting)
    resad = ResAD.load_from_checkpoint(args.checkpoint, map_location="cpu") if args.checkpoint else None
    resad = resad or ResAD(**config["model"])
    resad.eval()
    resad.references.set_pools({name: datamodule.reference_pool(name) for name in datamodule.target_categories})
    rows = []
    start = time.perf_counter()
    table = datamodule.test_data.samples
    categories = args.categories or datamodule.target_categories
    for draw in range(args.draws):
        for category in categories:
            samples = table[table[CATEGORY_COLUMN] == category]
            if not samples.mask_path.astype(str).str.len().gt(0).any():
                continue
            for k in args.shots:
                selection = resad.references.select(category, k, seed + draw)
                with torch.no_grad():
                    scored = score_category(resad, samples, selection, args.batch_size, flows=bool(args.checkpoint))
                base = {"setting": setting, "category": category, "k": k, "draw": draw}
                rows.extend({**base, **row} for row in scored)
                print(f"[{setting}] {category} k={k} draw={draw} ({time.perf_counter() - start:.0f} s)", flush=True)
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=["shared_pcb_crack_to_tile"])
    parser.add_argument("--checkpoint", default=None, help="a trained ResAD: adds the flows' map and the fusions")
    parser.add_argument("--categories", nargs="*", default=None, help="target categories (default: all)")
    parser.add_argument("--shots", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--output", default="results/nearest_maps")
    args = parser.parse_args()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO, check=False
    ).stdout
    print(f"commit {commit.strip()}; args {json.dumps(vars(args))}", flush=True)
    frame = pd.concat([run_setting(args, setting) for setting in args.settings], ignore_index=True)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    frame.to_csv(output / "rows.csv", index=False)
    per_draw = frame.groupby(["setting", "variant", "k", "draw"])[["pixel_AUROC", "image_AUROC"]].mean()
    table = per_draw.groupby(["setting", "variant", "k"]).agg(["mean", "std"])
    print(table.to_string(float_format=lambda v: f"{100 * v:.1f}"))


if __name__ == "__main__":
    main()
