# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""The product's verdicts at other ``threshold_margin`` values, from one scoring pass (issue 12).

For every target class, k and reference draw of a setting (the very same references as ``resad evaluate``:
``ClassReferences.select(category, k, seed + draw)``), the class's references are set with the product's scoring
options at margin 1.25 and its test images are scored through ``evaluation.score_samples``. The verdict at margin m is
then ``score * 1.25 / m > 1`` (every term's threshold scales with the margin; the odd-frame check keeps its own
margins, and its frames are above 1 at every m <= 1.25). Also recorded: the largest leave-one-out maximum of the fused
map over the references (at most ``1 / 1.25``), and the oracle's verdict columns (thresholds chosen on the labels).

Example:
    python benchmarks/verdict_margins.py --setting shared_pcb_tile_to_crack \
        --checkpoint results/ablation_e3_crack/shared_pcb_tile_to_crack/model.ckpt --output results/margins_crack.csv
"""

import argparse
import time
from pathlib import Path

import pandas as pd
import torch
import yaml
from lightning.pytorch import seed_everything

from anomalib_resad import ResAD
from anomalib_resad.anomaly_map import ScoreCalibration
from anomalib_resad.data.multi_class import CATEGORY_COLUMN, MultiClassDataModule
from anomalib_resad.evaluation import oracle_verdicts, score_samples
from anomalib_resad.feature_converter import flatten_levels
from anomalib_resad.protocol import apply_scoring_options

REPO = Path(__file__).resolve().parents[1]
SCORED_AT = 1.25
MARGINS = (1.0, 1.1, 1.25, 1.5)
PRODUCT = {
    "nearest_averaging": "auto",
    "nearest_score": True,
    "threshold_margin": SCORED_AT,
    "dissimilarity_margin": 2.0,
    "reverse_dissimilarity_margin": 1.5,
}


def setting_datamodule(setting: str) -> tuple[dict, int, MultiClassDataModule]:
    """A ``configs/settings`` file's config, its seed (set) and its datamodule (set up, no loader workers)."""
    config = yaml.safe_load((REPO / "configs" / "settings" / f"{setting}.yaml").read_text())
    seed = config.get("seed", 42)
    seed_everything(seed)
    datamodule = MultiClassDataModule(
        sources=config["sources"], targets=config["targets"], num_workers=0, seed=seed, name=setting
    )
    datamodule.setup()
    return config, seed, datamodule


def load_product(setting: str, checkpoint: str) -> tuple[int, MultiClassDataModule, ResAD]:
    """A setting's seed and datamodule (set up) and the checkpoint's model with the product's scoring options."""
    _, seed, datamodule = setting_datamodule(setting)
    resad = apply_scoring_options(ResAD.load_from_checkpoint(checkpoint, map_location="cpu").eval(), PRODUCT)
    return seed, datamodule, resad


def fused_leave_one_out_maximum(resad: ResAD, paths: list[str]) -> float:
    """Largest fused-map value of a reference scored against the other k - 1, with the class's stored calibration."""
    model = resad.model
    calibration = ScoreCalibration.from_tensor(model.anomaly_map_generator.calibration.clone())
    features = resad.references.features(paths)
    size = tuple(int(value) for value in resad.input_size)
    largest = 0.0
    for index in range(len(paths)):
        others = [torch.cat([level[:index], level[index + 1 :]]) for level in features]
        query = [level[index : index + 1] for level in features]
        parts = model.score_components(query, flatten_levels(others), calibration.level_constants, size)
        if calibration.averaging > 0:
            nearest = parts.averaged_map / calibration.averaged_nearest_threshold
        else:
            nearest = parts.nearest_map / calibration.nearest_threshold
        largest = max(largest, float(((parts.anomaly_map / calibration.map_threshold + nearest) / 2).amax()))
    return largest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", required=True, help="a configs/settings/<name>.yaml")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--shots", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--output", required=True, help="CSV, one row per category, k and draw")
    args = parser.parse_args()
    seed, datamodule, resad = load_product(args.setting, args.checkpoint)
    resad.references.set_pools({name: datamodule.reference_pool(name) for name in datamodule.target_categories})
    table = datamodule.test_data.samples
    rows, start = [], time.perf_counter()
    for draw in range(args.draws):
        for category in datamodule.target_categories:
            samples = table[table[CATEGORY_COLUMN] == category]
            for k in args.shots:
                selection = resad.references.select(category, k, seed + draw)
                resad.set_references(selection)
                with torch.no_grad():
                    largest = fused_leave_one_out_maximum(resad, selection.paths)
                scored = score_samples(resad, samples)
                labels, scores = scored.labels, scored.pred_scores
                row = {"category": category, "k": k, "draw": draw, "loo_max": largest}
                for margin in MARGINS:
                    flagged = scores * SCORED_AT / margin > 1
                    row[f"FPR@{margin}"] = float(flagged[labels == 0].float().mean())
                    row[f"recall@{margin}"] = float(flagged[labels == 1].float().mean())
                rows.append({**row, **oracle_verdicts(scores, labels)})
                print(f"{category} k={k} draw={draw} ({time.perf_counter() - start:.0f} s)", flush=True)
    frame = pd.DataFrame(rows)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.output, index=False)
    columns = [f"{kind}@{margin}" for margin in MARGINS for kind in ("FPR", "recall")] + ["oracle_recall_at_FPR10"]
    summary = frame.groupby(["k", "draw"])[columns].mean().groupby("k").mean()  # classes, then draws
    print(summary.to_string(float_format=lambda value: f"{100 * value:.1f}"))


if __name__ == "__main__":
    main()
