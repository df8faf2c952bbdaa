# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""How far odd frames sit above a class's dissimilarity threshold, next to its normal images: the odd-frame margin.

ResAD flags frames unlike a class's references (blank, saturated, noise, another product) by their *dissimilarity* -
the mean ``1 - cos`` of their nearest-reference matches - above ``dissimilarity_margin`` x the largest value the k
references give each other (leave-one-out). This script prints, per class of a setting and per kind of frame, that
ratio ``dissimilarity / leave-one-out maximum`` (the margin at which the frame would stop being flagged), with the same
reference draws as ``benchmarks/ablation.py`` (seed + draw). Normal test images' ratios are in ablation's
``image_scores.csv`` (column ``dis``): a margin is good where every odd frame is above it and few normal images are.

    python benchmarks/odd_frames.py --setting shared_pcb_crack_to_tile \\
        --checkpoint results/ablation_e3/shared_pcb_crack_to_tile/model.ckpt --shots 2 4 --draws 3
"""

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from PIL import Image

from anomalib_resad import ResAD
from anomalib_resad.anomaly_map import ScoreCalibration
from anomalib_resad.data.multi_class import MultiClassDataModule
from anomalib_resad.feature_converter import flatten_positions

REPO = Path(__file__).resolve().parents[1]


def synthetic_frames(size: tuple[int, int], seed: int = 0) -> dict[str, torch.Tensor]:
    """Blank, saturated and noise frames ``(3, H, W)`` in ``[0, 1]``."""
    height, width = size
    generator = torch.Generator().manual_seed(seed)
    red = torch.zeros(3, height, width)
    red[0] = 1.0
    return {
        "black": torch.zeros(3, height, width),
        "white": torch.ones(3, height, width),
        "grey": torch.full((3, height, width), 0.5),
        "saturated red": red,
        "noise": (0.5 + 0.25 * torch.randn(3, height, width, generator=generator)).clamp(0, 1),
    }


def read(path: str, size: tuple[int, int]) -> torch.Tensor:
    """An image file as ``(3, H, W)`` in ``[0, 1]`` at ``size``."""
    image = Image.open(path).convert("RGB").resize((size[1], size[0]), Image.BILINEAR)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)


@torch.no_grad()
def two_way_distances(query: list[torch.Tensor], references: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query image: mean ``1 - cos`` of its positions' best reference match (forward, ResAD's dissimilarity) and
    of the references' positions' best match in that image (reverse: what of the references the image lacks),
    averaged over levels. ``query`` ``(B, C, H, W)`` and ``references`` ``(k, C, H, W)`` per level."""
    forward, reverse = [], []
    for level_query, level_references in zip(query, references, strict=True):
        bank = torch.nn.functional.normalize(flatten_positions(level_references), dim=1)
        vectors = torch.nn.functional.normalize(level_query.flatten(2).transpose(1, 2), dim=2)  # (B, HW, C)
        similarity = vectors @ bank.T  # (B, HW, kHW)
        forward.append((1 - similarity.amax(dim=2)).mean(dim=1))
        reverse.append((1 - similarity.amax(dim=1)).mean(dim=1))
    return torch.stack(forward).mean(dim=0), torch.stack(reverse).mean(dim=0)


@torch.no_grad()
def two_way_ratios(resad: ResAD, features: list[torch.Tensor], frames: torch.Tensor) -> dict[str, torch.Tensor]:
    """Forward, reverse and symmetric (their mean) distances of frames over the references' leave-one-out maxima."""
    k = int(features[0].shape[0])
    loo = [
        two_way_distances([level[i : i + 1] for level in features],
                          [torch.cat([level[:i], level[i + 1 :]]) for level in features])
        for i in range(k)
    ]  # fmt: skip
    images = resad.pre_processor.transform(frames)
    forward, reverse = two_way_distances(resad.model.feature_extractor(images), features)
    loo_forward = max(float(f) for f, _ in loo)
    loo_reverse = max(float(r) for _, r in loo)
    loo_symmetric = max(float(f + r) / 2 for f, r in loo)
    return {"forward": forward / loo_forward, "reverse": reverse / loo_reverse,
            "symmetric": (forward + reverse) / 2 / loo_symmetric}  # fmt: skip


@torch.no_grad()
def dissimilarity_ratios(resad: ResAD, bank, frames: torch.Tensor) -> torch.Tensor:
    """``dissimilarity / leave-one-out maximum`` of frames ``(N, 3, H, W)`` in ``[0, 1]`` against a class's bank."""
    model = resad.model
    calibration = ScoreCalibration.from_tensor(bank.calibration)
    loo_max = calibration.dissimilarity_threshold / model.dissimilarity_margin
    images = resad.pre_processor.transform(frames)
    features = model.feature_extractor(images)
    parts = model.score_components(features, bank.levels, calibration.level_constants, images.shape[-2:])
    return parts.dissimilarity / loo_max


def main() -> None:
    """Print one table: class x frame kind, ratio over draws (min / median)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", required=True)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--shots", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--others", type=int, default=4, help="images of each other class used as 'another product'")
    parser.add_argument("--output", type=Path, default=None, help="also write the rows to this CSV")
    parser.add_argument("--normals", type=int, default=8, help="normal test images of the class, for comparison")
    parser.add_argument("--two_way", action="store_true", help="also the reverse (coverage) and symmetric distances")
    args = parser.parse_args()
    config = yaml.safe_load((REPO / "configs" / "settings" / f"{args.setting}.yaml").read_text())
    seed = config.get("seed", 42)
    datamodule = MultiClassDataModule(sources=config["sources"], targets=config["targets"], num_workers=0, seed=seed)
    datamodule.setup()
    resad = ResAD.load_from_checkpoint(args.checkpoint, map_location="cpu").eval()
    size = tuple(int(v) for v in resad.input_size)
    categories = [*datamodule.target_categories, *datamodule.source_categories]
    pools = {name: datamodule.reference_pool(name) for name in categories}
    resad.references.set_pools(pools)
    frames = synthetic_frames(size)
    rows = []
    for category in categories:
        # "another product": normal images of the other classes of the setting (never this class's)
        others = [path for name in categories if name != category for path in pools[name][: args.others]]
        samples = datamodule.test_data.samples
        normal = samples[(samples.category == category) & (samples.label_index == 0)].image_path.tolist()
        for k in args.shots:
            for draw in range(args.draws):
                selection = resad.references.select(category, k, seed + draw)
                bank = resad.references.bank(selection)
                batch = {name: frame.unsqueeze(0) for name, frame in frames.items()}
                batch["another product"] = torch.stack([read(path, size) for path in others])
                if normal:
                    batch["normal (test)"] = torch.stack([read(path, size) for path in normal[: args.normals]])
                features = resad.references.features(selection.paths) if args.two_way else None
                for kind, images in batch.items():
                    ratios = {"dissimilarity": dissimilarity_ratios(resad, bank, images)}
                    if features is not None:
                        ratios.update(two_way_ratios(resad, features, images))
                    for statistic, values in ratios.items():
                        rows += [{"category": category, "k": k, "draw": draw, "frame": kind, "statistic": statistic,
                                  "ratio": float(r)} for r in values]  # fmt: skip
    frame = pd.DataFrame(rows)
    if args.output:
        frame.to_csv(args.output, index=False)
    print(f"Dissimilarity of odd frames / leave-one-out maximum, {args.setting}, checkpoint {args.checkpoint}")
    print("(min over draws and images; a frame is flagged while this exceeds dissimilarity_margin; for normal test")
    print("images the max, which a margin must stay above)\n")
    for statistic, rows_of in frame.groupby("statistic", sort=False):
        odd = rows_of[rows_of.frame != "normal (test)"].groupby(["k", "category", "frame"]).ratio.min()
        table = odd.unstack("frame")
        table["normal (test) max"] = rows_of[rows_of.frame == "normal (test)"].groupby(["k", "category"]).ratio.max()
        print(f"{statistic}:\n{table.round(2).to_string()}\n")


if __name__ == "__main__":
    main()
