# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""Per-class choice of PatchCore's 3x3 neighbourhood averaging from the k references alone (issue 11, measured).

The ablation found that averaging each feature with its 3 x 3 neighbours before matching (PatchCore does, the
reference ResAD does not) helps the textures by 1-2 points of image AUROC and costs the circuit boards 3-4. This
script asks whether a class's k normal images can tell which it needs, with no anomalous image and no test image:
each reference is scored against the other k - 1 (leave-one-out: normal scores, their maximum the threshold), and
synthetic defects pasted into the references (anomalib's Perlin-noise anomalies, small dark/bright spots, thin
scratches) are scored the same way; the matching (precise or averaged) whose synthetic defects land further above its
own leave-one-out threshold (median ratio) is chosen for the class.

The choice is then scored on the real test images with the per-image ratios that ``benchmarks/ablation.py`` wrote
(``image_scores.csv``: ``max``, ``nn2``, ``nn2pool``; the same checkpoint, seed and reference draws), against always
precise (the product's ``max+nn2``) and always averaged (``max+nn2+pool``).

    python benchmarks/pool_selector.py --setting shared_pcb_crack_to_tile \\
        --checkpoint results/ablation_e3/shared_pcb_crack_to_tile/model.ckpt \\
        --image_scores results/rescore_tile_pool/shared_pcb_crack_to_tile/image_scores.csv
"""

import argparse
import math
from pathlib import Path

import pandas as pd
import torch
import yaml
from anomalib.data.utils.generators.perlin import PerlinAnomalyGenerator
from anomalib.data.utils.image import read_image
from torch.nn import functional as F  # noqa: N812
from torchmetrics.functional.classification import binary_auroc

from anomalib_resad import ResAD
from anomalib_resad.data.multi_class import MultiClassDataModule
from anomalib_resad.feature_converter import flatten_positions, nearest_reference

REPO = Path(__file__).resolve().parents[1]


def synthetic_defects(image: torch.Tensor, count: int, generator: torch.Generator) -> list[torch.Tensor]:
    """``count`` defective copies of a ``(3, H, W)`` image in [0, 1]: Perlin blends, spots and scratches in turn."""
    _, height, width = image.shape
    perlin = PerlinAnomalyGenerator(probability=1.0, blend_factor=(0.5, 1.0))
    rows = torch.arange(height).view(-1, 1).float()
    cols = torch.arange(width).view(1, -1).float()
    out = []
    for index in range(count):
        kind = index % 3
        shade = 0.0 if torch.rand(1, generator=generator) < 0.5 else 1.0
        if kind == 0:
            torch.manual_seed(int(torch.randint(1 << 30, (1,), generator=generator)))
            defective, _ = perlin(image)
        elif kind == 1:  # a round spot of radius 2-4 % of the side (pinholes, blowholes, missing copper)
            radius = (0.02 + 0.02 * torch.rand(1, generator=generator)) * min(height, width)
            y, x = torch.rand(2, generator=generator) * torch.tensor([height, width])
            mask = (((rows - y) ** 2 + (cols - x) ** 2).sqrt() < radius).float()
            defective = image * (1 - mask) + shade * mask
        else:  # a thin straight scratch, 10-30 % of the side long, 1 % wide
            length = (0.1 + 0.2 * torch.rand(1, generator=generator)) * min(height, width)
            angle = torch.rand(1, generator=generator) * math.pi
            y, x = torch.rand(2, generator=generator) * torch.tensor([height, width])
            dy, dx = torch.sin(angle), torch.cos(angle)
            along = (rows - y) * dy + (cols - x) * dx
            across = ((rows - y) * dx - (cols - x) * dy).abs()
            mask = ((along.abs() < length / 2) & (across < max(1.0, 0.005 * min(height, width)))).float()
            defective = image * (1 - mask) + shade * mask
        out.append(defective.clamp(0, 1))
    return out


def nearest_map_max(model, query: list[torch.Tensor], bank: list[torch.Tensor], size, pool: bool) -> torch.Tensor:
    """Image score of the flow-free ``nn2`` map: ``1 - cos`` to the nearest bank feature, two deepest levels."""
    generator = model.anomaly_map_generator
    maps = []
    for level_query, level_bank in zip(query[-2:], bank[-2:], strict=True):
        feature = F.avg_pool2d(level_query, 3, stride=1, padding=1) if pool else level_query
        reference = F.avg_pool2d(level_bank, 3, stride=1, padding=1) if pool else level_bank
        _, similarity = nearest_reference(flatten_positions(feature), flatten_positions(reference))
        level_map = (1 - similarity).reshape(feature.shape[0], 1, *feature.shape[-2:])
        maps.append(generator._upsample(level_map, size))
    return generator.blur(sum(maps)).flatten(start_dim=1).amax(dim=1)


@torch.no_grad()
def choose(resad: ResAD, paths: list[str], defects_per_image: int, seed: int) -> dict[str, float]:
    """Leave-one-out on the k references: median ratio of synthetic defects to the normal threshold, per matching."""
    transform = resad.pre_processor.transform
    model = resad.model
    generator = torch.Generator().manual_seed(seed)
    raw = [read_image(path, as_tensor=True) for path in paths]
    normal = torch.stack([transform(image) for image in raw])
    defective = [torch.stack([transform(d) for d in synthetic_defects(image, defects_per_image, generator)])
                 for image in raw]  # fmt: skip
    size = normal.shape[-2:]
    features = model.feature_extractor(normal)
    defect_features = [model.feature_extractor(batch) for batch in defective]
    out = {}
    for name, pool in (("precise", False), ("pool", True)):
        normal_scores, defect_scores, lifts = [], [], []
        for index in range(len(paths)):
            others = [torch.cat([level[:index], level[index + 1 :]]) for level in features]
            own = [level[index : index + 1] for level in features]
            normal_scores.append(nearest_map_max(model, own, others, size, pool))
            defect_scores.append(nearest_map_max(model, defect_features[index], others, size, pool))
            lifts.append(defect_scores[-1] - normal_scores[-1])  # what the defect adds to this very image's score
        threshold = torch.cat(normal_scores).max().clamp_min(1e-6)
        ratios = torch.cat(defect_scores) / threshold
        out[f"{name}_median"] = float(ratios.median())
        out[f"{name}_recall"] = float((ratios > 1).float().mean())
        out[f"{name}_lift"] = float((torch.cat(lifts) / threshold).median())
        out[f"{name}_threshold"] = float(threshold)  # leave-one-out normal maximum (features only: no defects)
        out[f"{name}_normal_mean"] = float(torch.cat(normal_scores).mean())
    out["choice"] = "pool" if out["pool_median"] > out["precise_median"] else "precise"
    out["choice_lift"] = "pool" if out["pool_lift"] > out["precise_lift"] else "precise"
    return out


def auroc(scores: pd.Series, labels: pd.Series) -> float:
    return float(binary_auroc(torch.tensor(scores.to_numpy()), torch.tensor(labels.to_numpy())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", required=True)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--image_scores", required=True, help="image_scores.csv of benchmarks/ablation.py")
    parser.add_argument("--defects", type=int, default=12, help="synthetic defects per reference image")
    parser.add_argument("--output", default=None, help="CSV of the per-draw choices and AUROCs")
    args = parser.parse_args()
    config = yaml.safe_load((REPO / "configs" / "settings" / f"{args.setting}.yaml").read_text())
    seed = config.get("seed", 42)
    datamodule = MultiClassDataModule(
        sources=config["sources"], targets=config["targets"], seed=seed, num_workers=0, name=args.setting
    )
    datamodule.setup()
    resad = ResAD.load_from_checkpoint(args.checkpoint, map_location="cpu").eval()
    pools = {name: datamodule.reference_pool(name) for name in datamodule.target_categories}
    pools.update({name: datamodule.reference_pool(name) for name in datamodule.source_categories})
    resad.references.set_pools(pools)
    scores = pd.read_csv(args.image_scores)
    rows = []
    for (role, category, k, draw), images in scores.groupby(["role", "category", "k", "draw"]):
        if images.label.nunique() < 2:
            continue
        selection = resad.references.select(category, int(k), seed + int(draw))
        decision = choose(resad, selection.paths, args.defects, seed=1000 * int(draw) + int(k))
        precise = (images["max"] + images["nn2"]) / 2
        pooled = (images["max"] + (images["nn2"] + images["nn2pool"]) / 2) / 2
        row = {"role": role, "category": category, "k": k, "draw": draw, **decision,
               "auroc_precise": auroc(precise, images.label), "auroc_pool": auroc(pooled, images.label)}  # fmt: skip
        row["auroc_chosen"] = row["auroc_pool"] if decision["choice"] == "pool" else row["auroc_precise"]
        row["auroc_chosen_lift"] = row["auroc_pool"] if decision["choice_lift"] == "pool" else row["auroc_precise"]
        rows.append(row)
        print({key: round(value, 3) if isinstance(value, float) else value for key, value in row.items()}, flush=True)
    frame = pd.DataFrame(rows)
    if args.output:
        frame.to_csv(args.output, index=False)
    metrics = ["auroc_precise", "auroc_pool", "auroc_chosen", "auroc_chosen_lift"]
    per_draw = frame.groupby(["role", "k", "draw"])[metrics].mean()
    print((per_draw.groupby(["role", "k"]).agg(["mean", "std"]) * 100).round(1).to_string())
    for rule in ("choice", "choice_lift"):
        print(frame.groupby(["role", "category", "k"])[rule].value_counts().unstack(fill_value=0).to_string())


if __name__ == "__main__":
    main()
