# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""The odd-frame check on real classes: how often it fires on normal and anomalous images, and on odd frames.

ResAD flags frames unlike a class's references with two statistics (:func:`anomalib_resad.anomaly_map.
odd_frame_statistics`): the *dissimilarity* (mean ``1 - cos`` of each image position's nearest reference feature)
and the *reverse dissimilarity* (mean ``1 - cos`` of each reference position's nearest feature in the image), each
above its margin x the largest value the k references give each other (leave-one-out). Both depend on
the backbone features only, so this script computes them without the flows: each image is encoded once per setting
and matched against every (k, draw) reference bank of its class - the same draws (``seed + draw``) and the same test
and source-validation images, in the same order, as ``benchmarks/ablation.py``.

With ``--reference_views`` (one or more modes) each class's bank is the product's evaluation bank of that mode
(:mod:`anomalib_resad.reference_views`: the references' flipped / rotated views on the checkpoint's deepest levels;
leave-one-out by image, as :meth:`ResADModel.calibrate`).

It writes one CSV row per (setting, views, role, category, k, draw, image) with the ratios to the leave-one-out
maxima (``dis``, ``rev``; a frame is flagged when one exceeds its margin; ``rev_id``: the reverse statistic over each
reference image's own view only - a variant, not the product's), and prints, per views mode / setting / role / k, the
share of normal and of anomalous images each check flags at several margins, the smallest ratio of each odd frame kind
(black, white, grey, saturated red, Gaussian noise, and "another product": normal images of the setting's other
classes), and the share of odd frames flagged at the product's margins. With ``--image_scores`` (ablation's
per-image CSVs of the same settings and checkpoints, made without views: needs ``none`` among the modes) it also
prints the product's verdict (fused score over ``--margin`` or a statistic over its margin) with the forward check
alone and with both checks.

    python benchmarks/odd_frames.py \\
        --run shared_pcb_crack_to_tile=results/ablation_e3/shared_pcb_crack_to_tile/model.ckpt \\
        --image_scores results/rescore_tile/shared_pcb_crack_to_tile/image_scores.csv --output results/odd_frames.csv
"""

import argparse
import itertools
import math
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from PIL import Image
from torchmetrics.functional.classification import binary_auroc

from anomalib_resad import ResAD
from anomalib_resad.anomaly_map import odd_frame_statistics
from anomalib_resad.data.multi_class import CATEGORY_COLUMN, MultiClassDataModule, MultiClassDataset
from anomalib_resad.evaluation import _resize_of
from anomalib_resad.feature_converter import flatten_levels
from anomalib_resad.protocol import apply_scoring_options
from anomalib_resad.reference_views import REFERENCE_VIEWS, view_rows

REPO = Path(__file__).resolve().parents[1]
MARGINS = (1.0, 1.25, 1.5, 2.0)
KEYS = ["setting", "role", "category", "k", "draw"]


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
def statistics(
    resad: ResAD, query: list[torch.Tensor], references: list[torch.Tensor], views: list[int] | None = None
) -> torch.Tensor:
    """``(B, 3)`` dissimilarity, reverse dissimilarity and the reverse one over the references' own views only, of
    query features against reference features (per level ``(B, C, H, W)`` and ``(k * views_l, C, H, W)``), through
    the product's matching and formula.

    The third (``rev_id``, not the product's): each reference image's first view - the image as shot - must be
    covered by the query; its turned copies need not be (without views it equals the second).
    """
    matches = resad.model.feature_converter(query, flatten_levels(references))
    dissimilarity, reverse = odd_frame_statistics(matches.similarities, matches.coverage)
    views = views or [1] * len(references)
    own = [
        coverage.reshape(coverage.shape[0], -1, count, level.shape[-2] * level.shape[-1])[:, :, 0].flatten(1)
        for coverage, level, count in zip(matches.coverage, references, views, strict=True)
    ]
    _, reverse_own = odd_frame_statistics(matches.similarities, own)
    return torch.stack([dissimilarity, reverse, reverse_own], dim=1)


@torch.no_grad()
def leave_one_out_maxima(resad: ResAD, features: list[torch.Tensor], views: list[int] | None = None) -> torch.Tensor:
    """``(3,)`` the largest of each statistic over the references, each scored against the other k - 1.

    With ``views`` (per level, :attr:`ResADModel.bank_views`): image ``i``'s first view against the other images'
    views - the product's leave-one-out rule (:meth:`ResADModel.calibrate`).
    """
    views = views or [1] * len(features)
    k = int(features[0].shape[0]) // views[0]
    return torch.cat([
        statistics(resad, [level[i * count : i * count + 1] for level, count in zip(features, views, strict=True)],
                   [torch.cat([level[: view_rows(i, count).start], level[view_rows(i, count).stop :]])
                    for level, count in zip(features, views, strict=True)], views)
        for i in range(k)
    ]).amax(dim=0)  # fmt: skip


@torch.no_grad()
def encode(resad: ResAD, images: torch.Tensor, batch_size: int = 16) -> list[torch.Tensor]:
    """Backbone features of images in ``[0, 1]`` (pre-processed by the model's own transform)."""
    parts = [resad.model.feature_extractor(resad.pre_processor.transform(chunk)) for chunk in images.split(batch_size)]
    return [torch.cat(level) for level in zip(*parts, strict=True)]


def run_setting(
    setting: str, checkpoint: str, shots: list[int], draws: int, others: int, modes: list[str] = ("none",)
) -> pd.DataFrame:
    config = yaml.safe_load((REPO / "configs" / "settings" / f"{setting}.yaml").read_text())
    seed = config.get("seed", 42)
    datamodule = MultiClassDataModule(sources=config["sources"], targets=config["targets"], num_workers=0, seed=seed)
    datamodule.setup()
    resad = ResAD.load_from_checkpoint(checkpoint, map_location="cpu").eval()
    size = tuple(int(v) for v in resad.input_size)
    pools = {name: datamodule.reference_pool(name) for name in datamodule.target_categories}
    pools.update({name: datamodule.reference_pool(name) for name in datamodule.source_categories})
    resad.references.set_pools(pools)
    groups = [("target", name, datamodule.test_data.samples) for name in datamodule.target_categories]
    groups += [("source", name, datamodule.val_data.samples) for name in datamodule.source_categories]
    frames = synthetic_frames(size)
    rows = []
    for role, category, table in groups:
        samples = table[table[CATEGORY_COLUMN] == category]
        if samples.label_index.nunique() < 2:  # as ablation.py: classes without both labels are not evaluated
            continue
        dataset = MultiClassDataset(samples, "classification", _resize_of(resad))
        images = torch.stack([dataset[index].image for index in range(len(dataset))])
        query = encode(resad, images)
        labels = samples.label_index.to_numpy()
        other = [path for name in pools if name != category for path in pools[name][:others]]
        odd = {**frames, **{f"another product: {Path(path).parent.parent.parent.name}": read(path, size)
                            for path in other}}  # fmt: skip
        odd_query = encode(resad, torch.stack(list(odd.values())))
        for mode, k, draw in itertools.product(modes, shots, range(draws)):
            # the product's evaluation bank of this reference_views mode (on the checkpoint's deepest levels)
            apply_scoring_options(resad, {"reference_views": mode})
            views = resad.model.bank_views
            selection = resad.references.select(category, k, seed + draw)
            features = resad.references.features(selection.paths, views)
            maxima = leave_one_out_maxima(resad, features, views)
            base = {"setting": setting, "views": mode, "category": category, "k": k, "draw": draw}
            ratios = statistics(resad, query, features, views) / maxima
            rows += [{**base, "role": role, "frame": "test", "label": int(label), "index": index,
                      "dis": float(r[0]), "rev": float(r[1]), "rev_id": float(r[2])}
                     for index, (label, r) in enumerate(zip(labels, ratios, strict=True))]  # fmt: skip
            ratios = statistics(resad, odd_query, features, views) / maxima
            rows += [{**base, "role": "odd", "frame": kind, "label": -1, "index": index,
                      "dis": float(r[0]), "rev": float(r[1]), "rev_id": float(r[2])}
                     for index, (kind, r) in enumerate(zip(odd, ratios, strict=True))]  # fmt: skip
        print(f"[{setting}] {role} {category} done", flush=True)
    return pd.DataFrame(rows)


def check_rates(frame: pd.DataFrame) -> pd.DataFrame:
    """Share of images flagged by each check, per setting / role / k / label, at each margin."""
    tests = frame[frame.role != "odd"]
    out = []
    for key, cell in tests.groupby(["views", "setting", "role", "k", "label"]):
        row = dict(zip(["views", "setting", "role", "k", "label"], key, strict=True))
        for margin in MARGINS:
            row[f"fwd@{margin}"] = float((cell.dis > margin).mean())
            row[f"rev@{margin}"] = float((cell.rev > margin).mean())
            row[f"both@{margin}"] = float(((cell.dis > margin) | (cell.rev > margin)).mean())
        out.append(row)
    return pd.DataFrame(out)


def odd_minima(frame: pd.DataFrame) -> pd.DataFrame:
    """Smallest ratio (over classes and draws) of each odd frame kind, forward / reverse / larger of the two."""
    odd = frame[frame.role == "odd"].copy()
    odd["kind"] = odd.frame.str.replace(r"another product: .*", "another product", regex=True)
    odd["either"] = odd[["dis", "rev"]].max(axis=1)
    return odd.groupby(["views", "setting", "k", "kind"])[["dis", "rev", "either"]].min().unstack("kind").round(2)


def odd_flagged(frame: pd.DataFrame, forward: float, reverse: float, column: str = "rev") -> pd.DataFrame:
    """Share of (class, draw) pairs whose odd frame of each kind is flagged at these margins, per views mode and k,
    and of the normal and anomalous test images the check alone flags (per role).

    The statistics depend on the frozen backbone and the draws only, so a class met in several settings counts once.
    ``column``: the reverse statistic to read (``rev``, the product's, or ``rev_id``, the references' own views).
    """
    odd = frame[frame.role == "odd"].drop_duplicates(["views", "category", "k", "draw", "frame"]).copy()
    odd["kind"] = odd.frame.str.replace(r"another product: pcb_.*", "another board group", regex=True)
    odd["kind"] = odd.kind.str.replace(r"another product: .*", "another product", regex=True)
    odd["flagged"] = (odd.dis > forward) | (odd[column] > reverse)
    table = (100 * odd.groupby(["views", "k", "kind"]).flagged.mean()).unstack("kind")
    tests = frame[frame.role != "odd"].copy()
    tests["flagged"] = (tests.dis > forward) | (tests[column] > reverse)
    for (role, label), cell in tests.groupby(["role", "label"]):
        name = f"{role} {'normal' if label == 0 else 'anomalous'}"
        table[name] = 100 * cell.groupby(["views", "k"]).flagged.mean()
    table["classes"] = odd.groupby(["views", "k"]).category.nunique()
    return table.round(1)


def verdicts(
    frame: pd.DataFrame, scores: pd.DataFrame, margin: float, dissimilarity_margin: float, reverse_margin: float
) -> pd.DataFrame:
    """The previous release's verdict (mean of the two maxima over ``margin`` or a statistic over its own margin),
    forward check alone vs both checks, per setting / role / k: normal FPR and anomalous recall (mean over categories
    and draws)."""
    scores = scores.copy()
    scores["index"] = scores.groupby(KEYS).cumcount()
    merged = frame[frame.role != "odd"].merge(scores, on=[*KEYS, "index"], suffixes=("", "_ablation"))
    aligned = np.abs(merged.dis - merged.dis_ablation).max()
    if len(merged) != len(scores) or aligned > 1e-3 or (merged.label != merged.label_ablation).any():
        msg = f"image order differs from the ablation's ({len(merged)} of {len(scores)} rows; dis max diff {aligned})"
        raise RuntimeError(msg)
    fused = (merged["max"] + merged["nn2"]) / 2 > margin
    merged["forward"] = fused | (merged.dis > dissimilarity_margin)
    merged["both"] = merged.forward | (merged.rev > reverse_margin)
    rows = []
    for key, cell in merged.groupby(KEYS):
        normal, anomalous = cell[cell.label == 0], cell[cell.label == 1]
        rows.append({**dict(zip(KEYS, key, strict=True)),
                     "FPR forward": normal.forward.mean(), "FPR both": normal.both.mean(),
                     "recall forward": anomalous.forward.mean(), "recall both": anomalous.both.mean()})  # fmt: skip
    return (
        pd.DataFrame(rows)
        .groupby(["setting", "role", "k"])[["FPR forward", "FPR both", "recall forward", "recall both"]]
        .mean()
    )


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Image AUROC (NaN with one class only)."""
    if labels.min() == labels.max():
        return math.nan
    return float(binary_auroc(torch.from_numpy(scores.astype(np.float32)), torch.from_numpy(labels.astype(np.int64))))


SWEEP = (
    (math.inf, math.inf),
    (1.5, math.inf),
    (1.5, 1.5),
    (1.5, 2.0),
    (1.75, 1.75),
    (2.0, 1.5),
    (2.0, 2.0),
    (2.0, 1.25),
)
KINDS = ("black", "white", "grey", "saturated red", "noise")


def margin_sweep(frame: pd.DataFrame, scores: pd.DataFrame, margin: float) -> pd.DataFrame:
    """Per (forward, reverse) margin pair: the verdict's normal FPR on source validation (mean over categories, draws,
    then settings) and on the target classes (mean over classes), the targets' recall, and the share of (class, draw)
    pairs whose odd frame of each kind is flagged - what the defaults were chosen from."""
    scores = scores.copy()
    scores["index"] = scores.groupby(KEYS).cumcount()
    merged = frame[frame.role != "odd"].merge(scores, on=[*KEYS, "index"], suffixes=("", "_ablation"))
    odd = frame[(frame.role == "odd") & (frame.setting == frame.setting.iloc[0])]  # the same in every setting
    rows = []
    for forward, reverse in SWEEP:
        score = (merged["max"] + merged["nn2"]) / 2 / margin
        odd_ratio = np.maximum(merged.dis / forward, merged.rev / reverse)
        merged["flag"] = (score > 1) | (odd_ratio > 1)
        merged["gated"] = np.where(odd_ratio > 1, np.maximum(score, odd_ratio), score)  # the product's image score
        flagged = (odd.dis > forward) | (odd.rev > reverse)
        row = {"forward": forward, "reverse": reverse}
        for k in sorted(merged.k.unique()):
            source = merged[(merged.k == k) & (merged.role == "source") & (merged.label == 0)]
            per_setting = (
                source.groupby(["setting", "draw", "category"]).flag.mean().groupby(["setting", "draw"]).mean()
            )
            row[f"source FPR k={k}"] = 100 * per_setting.groupby("setting").mean().mean()
            for label, name in ((0, "target FPR"), (1, "target recall")):
                target = merged[(merged.k == k) & (merged.role == "target") & (merged.label == label)]
                row[f"{name} k={k}"] = (
                    100 * target.groupby(["category", "draw"]).flag.mean().groupby("category").mean().mean()
                )
            for kind in KINDS:
                row[f"{kind} k={k}"] = 100 * flagged[(odd.k == k) & (odd.frame == kind)].mean()
            # image AUROC of the gated score on the targets: mean over classes per draw, over draws, over settings
            target = merged[(merged.k == k) & (merged.role == "target")]
            per_cell = target.groupby(["setting", "draw", "category"]).apply(
                lambda cell: auroc(cell.gated.to_numpy(), cell.label.to_numpy()), include_groups=False
            )
            per_draw = per_cell.groupby(["setting", "draw"]).mean()
            row[f"target I-AUROC k={k}"] = 100 * per_draw.groupby("setting").mean().mean()
        rows.append(row)
    return pd.DataFrame(rows).round(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", nargs="+", required=True, help="setting=checkpoint pairs")
    parser.add_argument("--shots", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--others", type=int, default=1, help="normal images of each other class: 'another product'")
    parser.add_argument("--output", type=Path, default=Path("results/odd_frames.csv"))
    parser.add_argument("--image_scores", nargs="*", default=[], help="ablation's image_scores.csv of these runs")
    parser.add_argument("--margin", type=float, default=1.25)
    parser.add_argument("--dissimilarity_margin", type=float, default=2.0)
    parser.add_argument("--reverse_dissimilarity_margin", type=float, default=1.5)
    parser.add_argument(
        "--reference_views",
        nargs="+",
        default=["none"],
        choices=REFERENCE_VIEWS,
        help="the evaluation banks' reference_views modes to measure (the checkpoint's view levels)",
    )
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO,
                            check=False).stdout.strip()  # fmt: skip
    print(f"commit {commit}; args {vars(args)}", flush=True)
    if args.image_scores and "none" not in args.reference_views:
        parser.error("--image_scores are ablation's scores without views: add none to --reference_views")
    # resume: (setting, views mode) pairs already measured are read back
    frame = pd.read_csv(args.output) if args.output.exists() else pd.DataFrame(columns=["setting", "views"])
    if "views" not in frame:
        frame["views"] = "none"  # files of earlier runs
    for pair in args.run:
        setting, checkpoint = pair.split("=", 1)
        done = set(frame.views[frame.setting == setting])
        modes = [mode for mode in args.reference_views if mode not in done]
        if not modes:
            continue
        measured = run_setting(setting, checkpoint, args.shots, args.draws, args.others, modes)
        frame = pd.concat([frame, measured])
        args.output.parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(args.output, index=False)
    frame = frame.astype({"k": int, "draw": int, "label": int, "index": int})
    frame["views"] = frame["views"].fillna("none")
    pd.set_option("display.width", 250)
    print("\nShare of test images flagged by the check (ratio > margin): fwd = dissimilarity, rev = reverse")
    print(check_rates(frame).round(3).to_string(index=False))
    print("\nOdd frames: smallest ratio over classes and draws (flagged while above the margin)")
    print(odd_minima(frame).to_string())
    print(f"\nOdd frames flagged at margins {args.dissimilarity_margin} / {args.reverse_dissimilarity_margin}, "
          "% of (class, draw) pairs; of test images (the check alone):")  # fmt: skip
    print(odd_flagged(frame, args.dissimilarity_margin, args.reverse_dissimilarity_margin).to_string())
    if "rev_id" in frame and frame.rev_id.notna().all():
        print("\nThe same with the reverse statistic over the references' own views only (rev_id, not the product's):")
        table = odd_flagged(frame, args.dissimilarity_margin, args.reverse_dissimilarity_margin, "rev_id")
        print(table.to_string())
    if args.image_scores:  # ablation's scores were made without views
        frame = frame[frame.views == "none"]
        scores = pd.concat([pd.read_csv(path) for path in args.image_scores], ignore_index=True)
        table = verdicts(frame, scores, args.margin, args.dissimilarity_margin, args.reverse_dissimilarity_margin)
        print(f"\nVerdicts at margin {args.margin}, dissimilarity margins {args.dissimilarity_margin} (forward) / "
              f"{args.reverse_dissimilarity_margin} (reverse):")  # fmt: skip
        print((100 * table).round(1).to_string())
        print(f"\nMargin pairs (forward / reverse), verdict at score margin {args.margin}, in %:")
        print(margin_sweep(frame, scores, args.margin).to_string(index=False))


if __name__ == "__main__":
    main()
