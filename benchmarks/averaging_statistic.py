# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""The statistic behind ``nearest_averaging="auto"``, per class, k and draw, for two forms of the averaged matching.

For each target class and reference draw (the same draws as every other table), each reference image is scored
against the other k - 1 (leave-one-out; the largest value is the threshold) and so are its synthetic defects
(:mod:`anomalib_resad.synthetic_defects`); the statistic is the median ratio of the defects' averaged score to its
threshold over the same for the precise score. ``auto`` averages when it exceeds ``1 + AVERAGING_GAIN``. Two averaged
matchings: cosine (the release that chose ``AVERAGING_GAIN``) and Euclidean (PatchCore's, today's). Training-free:
only the backbone's two deepest levels are read.

    python benchmarks/averaging_statistic.py --settings shared_pcb_crack_to_tile shared_pcb_tile_to_crack \\
        shared_tile_crack_to_pcb
"""

import argparse
import subprocess
import time
from pathlib import Path

import pandas as pd
import torch
import yaml
from torch.nn import functional as F  # noqa: N812
from torchmetrics.functional.classification import binary_auroc

from anomalib_resad import ResAD
from anomalib_resad.anomaly_map import AVERAGING_GAIN, NEAREST_LEVELS
from anomalib_resad.data.multi_class import MultiClassDataModule
from anomalib_resad.feature_converter import flatten_levels, match_features
from anomalib_resad.references import load_images
from anomalib_resad.synthetic_defects import synthetic_defects

REPO = Path(__file__).resolve().parents[1]


def averaged_cosine(converter, query: list[torch.Tensor], bank: list[torch.Tensor]) -> list[torch.Tensor]:
    """``1 - cos`` after 3 x 3 averaging of both sides (the earlier averaged matching)."""
    out = []
    for feature, references in zip(query, bank, strict=True):
        batch, channels, height, width = feature.shape
        maps = references.reshape(-1, height, width, channels).permute(0, 3, 1, 2)
        pooled_query = F.avg_pool2d(feature, 3, stride=1, padding=1).permute(0, 2, 3, 1).reshape(batch, -1, channels)
        pooled_bank = F.avg_pool2d(maps, 3, stride=1, padding=1).permute(0, 2, 3, 1).reshape(-1, channels)
        out.append(1 - match_features(pooled_query, pooled_bank)[1].reshape(batch, height, width))
    return out


@torch.no_grad()
def statistics(resad: ResAD, paths: list[str]) -> dict[str, float]:
    model = resad.model.eval()
    generator = model.anomaly_map_generator
    images = load_images(paths, resad.pre_processor.transform)
    size = tuple(images.shape[-2:])
    features = model.reference_features(images)[-NEAREST_LEVELS:]
    defects = synthetic_defects(images)

    def scores(
        index: int, query_images: torch.Tensor | None
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        bank = flatten_levels([torch.cat([level[:index], level[index + 1 :]]) for level in features])
        if query_images is None:
            query = [level[index : index + 1] for level in features]
        else:
            query = model.feature_extractor(query_images)[-NEAREST_LEVELS:]
        similarities = model.feature_converter(query, bank).similarities
        euclidean = model.feature_converter.averaged_distances(query, bank, NEAREST_LEVELS)
        parts = generator.nearest_components(similarities, euclidean, size, maps=True)
        cosine = generator.nearest_components(similarities, averaged_cosine(None, query, bank), size, maps=True)
        values = {"precise": parts.nearest, "euclidean": parts.averaged_nearest, "cosine": cosine.averaged_nearest}
        maps = {"precise": parts.nearest_map, "euclidean": parts.averaged_map, "cosine": cosine.averaged_map}
        return values, maps

    k = len(paths)
    normal = [scores(index, None)[0] for index in range(k)]
    thresholds = {name: max(float(s[name].max()) for s in normal) for name in normal[0]}
    defect = [scores(index, defects[index]) for index in range(k)]
    ratios = {name: torch.cat([s[name] for s, _ in defect]) / max(thresholds[name], 1e-6) for name in thresholds}
    precise = float(ratios["precise"].median())
    row = {f"stat_{name}": float(ratios[name].median()) / precise for name in ("cosine", "euclidean")}
    # localisation: how well each matching's map finds the pasted pixels (pixel AUROC over the k x 12 defects, every
    # bank's maps pooled as they are, as a class's images are; dividing by the matching's threshold - one number -
    # changes no AUROC and only keeps the maps in threshold units)
    masks = (defects - images.unsqueeze(1)).abs().amax(dim=2).gt(1e-4).flatten()
    for name in ("precise", "euclidean", "cosine"):
        maps = torch.cat([m[name].flatten() for _, m in defect]) / max(thresholds[name], 1e-6)
        row[f"pixel_AUROC_{name}"] = float(binary_auroc(maps, masks.long()))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", required=True)
    parser.add_argument("--shots", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--output", default="results/averaging_statistic.csv")
    args = parser.parse_args()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO, check=False
    ).stdout
    print(f"commit {commit.strip()}; {vars(args)}", flush=True)
    rows, start = [], time.perf_counter()
    for setting in args.settings:
        config = yaml.safe_load((REPO / "configs" / "settings" / f"{setting}.yaml").read_text())
        seed = config.get("seed", 42)
        datamodule = MultiClassDataModule(
            sources=config["sources"], targets=config["targets"], num_workers=0, seed=seed, name=setting
        )
        datamodule.setup()
        resad = ResAD(**config["model"])  # training-free: the backbone's levels only
        resad.references.set_pools({name: datamodule.reference_pool(name) for name in datamodule.target_categories})
        for category in datamodule.target_categories:
            for k in args.shots:
                for draw in range(args.draws):
                    selection = resad.references.select(category, k, seed + draw)
                    row = {"setting": setting, "category": category, "k": k, "draw": draw}
                    rows.append({**row, **statistics(resad, list(selection.paths))})
            print(f"[{setting}] {category} ({time.perf_counter() - start:.0f} s)", flush=True)
    frame = pd.DataFrame(rows)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.output, index=False)
    localisation = frame.pixel_AUROC_euclidean - frame.pixel_AUROC_precise
    chosen = frame.assign(gain=localisation, chosen=localisation > 0).groupby("setting")
    print("\nlocalisation of the synthetic defects: Euclidean averaged minus precise pixel AUROC per setting")
    print(chosen.gain.describe()[["min", "50%", "max"]].round(3).to_string())
    tally = chosen.chosen.agg(["sum", "count"])
    counts = ", ".join(f"{s}: {int(r['sum'])}/{int(r['count'])}" for s, r in tally.iterrows())
    print(f"  averaged where it localises better: {counts}")
    for name in ("cosine", "euclidean"):
        column = frame[f"stat_{name}"]
        summary = frame.assign(stat=column).groupby("setting").stat.describe()[["min", "50%", "max"]]
        print(f"\n{name} averaged matching: statistic per setting\n{summary.round(2).to_string()}")
        for gain in (0.0, 0.05, 0.1, 0.15, 0.2, 0.3):
            chosen = frame.assign(chosen=column > 1 + gain).groupby("setting").chosen.agg(["sum", "count"])
            marker = " (AVERAGING_GAIN)" if gain == AVERAGING_GAIN else ""
            counts = ", ".join(f"{s}: {int(r['sum'])}/{int(r['count'])}" for s, r in chosen.iterrows())
            print(f"  m = {gain}{marker}: averaged {counts}")


if __name__ == "__main__":
    main()
