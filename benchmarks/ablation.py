# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""Ablation of ResAD's scoring levers against few-shot PatchCore on the leave-one-dataset-out settings.

One training per setting (the config's ResAD, optionally with ``--flow_steps chunk`` or more epochs), then for every
target category, k and reference draw - the very same k images for every variant and for PatchCore - every scoring
variant is computed from *one* forward pass per test image:

* ``constants``: ``global`` (one learned constant per level for every class) vs ``per_class`` (leave-one-out over
  the k references);
* ``image score``: the map's ``max`` (reference) vs ``top1`` (mean of its top 1 % pixels) vs ``max+dis`` (max, or
  the dissimilarity ratio when larger: the odd-frame check);
* diagnostics, ranking only: ``nll max`` / ``nll top1`` - the same flows' per-level negative log-likelihood
  ``relu(c_l - logp_l)`` summed over levels, *uncapped* (the product map saturates at ``1 - exp(-x)``), and
  ``nn max`` - no flows at all, the blurred map of ``1 - cos`` to the nearest reference feature (PatchCore's score on
  ResAD's own levels and matching): whether the flows add anything to the image verdict; ``nn`` on the two deepest
  levels only (``nn2``, PatchCore's levels; also calibrated by leave-one-out like the map) and after PatchCore's 3x3
  neighbourhood averaging (``nn2 pool``, which the reference ResAD does not do): whether ResAD's matching input, not
  its flows, is what trails PatchCore; ``max+nn2``: the mean of the flow score's and the ``nn2`` score's calibrated
  ratios;
* the calibrated verdict (``max`` and ``max+dis``) at threshold margins 0.8 ... 1.25: false-positive
  rate on normal test images, recall on anomalous ones, next to the oracle F1-max and its recall.

The same verdicts are computed on the *source* classes' held-out validation images (their own references drawn from
their training split): defaults are chosen there, never on a target class.

    python benchmarks/ablation.py --settings shared_pcb_crack_to_tile --output results/ablation
    python benchmarks/ablation.py --settings shared_pcb_crack_to_tile --checkpoint results/ablation/<setting>/model.ckpt

Writes ``rows.csv`` (one row per setting x category x k x draw x model/variant) and ``<setting>/image_scores.csv`` (per
test image: label and the calibrated flow, ``nn2`` and dissimilarity ratios, for verdict-rule studies), and prints mean
tables.
"""

import argparse
import json
import subprocess
import time
from pathlib import Path

import pandas as pd
import torch
import yaml
from anomalib.engine import Engine
from anomalib.metrics import AUPRO, AUROC, F1Max
from lightning.pytorch import Callback, Trainer, seed_everything
from torch.nn import functional as F  # noqa: N812

from anomalib_resad import ResAD
from anomalib_resad.anomaly_map import leave_one_out_calibration
from anomalib_resad.baselines import FewShotPatchcore
from anomalib_resad.data.multi_class import CATEGORY_COLUMN, MultiClassDataModule, MultiClassDataset
from anomalib_resad.evaluation import _resize_of, category_metrics, score_samples
from anomalib_resad.feature_converter import flatten_levels, flatten_positions, nearest_reference

REPO = Path(__file__).resolve().parents[1]
MARGINS = (0.7, 0.8, 0.85, 0.9, 0.95, 1.0, 1.1, 1.25)


def _rescale(values: torch.Tensor) -> torch.Tensor:
    low, high = values.min(), values.max()
    return (values - low) / (high - low) if high > low else torch.zeros_like(values)


def image_metrics(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    from types import SimpleNamespace

    batch = SimpleNamespace(pred_score=_rescale(scores), gt_label=labels)
    out = {}
    for name, metric in (("image_AUROC", AUROC), ("image_F1Max", F1Max)):
        instance = metric(fields=["pred_score", "gt_label"])
        instance.update(batch)
        out[name] = float(instance.compute())
    return out


def pixel_metrics(maps: torch.Tensor, masks: torch.Tensor | None, aupro: bool) -> dict[str, float]:
    from types import SimpleNamespace

    if masks is None or not masks.any():
        return {"pixel_AUROC": float("nan"), "pixel_AUPRO": float("nan")}
    batch = SimpleNamespace(anomaly_map=_rescale(maps), gt_mask=masks.int())
    out = {"pixel_AUPRO": float("nan")}
    metrics = (("pixel_AUROC", AUROC), ("pixel_AUPRO", AUPRO)) if aupro else (("pixel_AUROC", AUROC),)
    for name, metric in metrics:
        instance = metric(fields=["anomaly_map", "gt_mask"])
        instance.update(batch)
        out[name] = float(instance.compute())
    return out


def verdicts(calibrated: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """FPR / recall at the calibrated threshold (x margins) and the oracle F1-max's recall."""
    normal, anomalous = labels == 0, labels == 1
    out = {}
    for margin in MARGINS:
        predicted = calibrated > margin
        out[f"fpr@{margin}"] = float(predicted[normal].float().mean()) if normal.any() else float("nan")
        out[f"recall@{margin}"] = float(predicted[anomalous].float().mean()) if anomalous.any() else float("nan")
    if normal.any() and anomalous.any():
        best_f1, best_recall, best_fpr = -1.0, 0.0, 0.0
        for threshold in calibrated.unique():
            predicted = calibrated >= threshold
            tp = float((predicted & anomalous).sum())
            fp = float((predicted & normal).sum())
            fn = float((~predicted & anomalous).sum())
            f1 = 2 * tp / max(2 * tp + fp + fn, 1e-9)
            if f1 > best_f1:
                best_f1, best_recall, best_fpr = f1, tp / max(float(anomalous.sum()), 1), fp / float(normal.sum())
        out.update({"oracle_f1": best_f1, "oracle_recall": best_recall, "oracle_fpr": best_fpr})
    return out


@torch.no_grad()
def resad_variants(
    resad: ResAD, samples: pd.DataFrame, selection, batch_size: int, aupro: bool
) -> tuple[list[dict], pd.DataFrame]:
    """All scoring variants of ResAD on one category from one forward pass per image.

    Also returns the per-image calibrated statistics (label; flow score, ``nn2`` and dissimilarity as ratios to their
    leave-one-out thresholds, per-class constants), so that verdict rules can be studied without new forward passes.
    """
    model = resad.model.eval()
    generator = model.anomaly_map_generator
    features = resad.references.features(selection.paths)
    image_size = tuple(int(v) for v in resad.input_size)
    calibrations = {}
    for mode in ("global", "per_class"):

        def score_reference(index: int, constants: torch.Tensor, features=features) -> object:
            others = [torch.cat([level[:index], level[index + 1 :]]) for level in features]
            query = [level[index : index + 1] for level in features]
            return model.score_components(query, flatten_levels(others), constants, image_size)

        calibrations[mode] = leave_one_out_calibration(
            score_reference,
            selection.k,
            model.num_levels,
            global_constants=generator.global_level_constants if mode == "global" else None,
        )
    bank = flatten_levels(features)
    device = features[0].device
    has_masks = bool(samples.mask_path.astype(str).str.len().gt(0).any())
    dataset = MultiClassDataset(samples, "segmentation" if has_masks else "classification", _resize_of(resad))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=dataset.collate_fn)
    transform = resad.pre_processor.transform
    collected = {mode: {"map": [], "max": [], "top1": [], "dis": [], "rev": [], "nll_max": [], "nll_top1": []}
                 for mode in calibrations}  # fmt: skip
    nearest = {name: [] for name in ("nn", "nn2", "nn2 pool")}
    nearest_maps = {name: [] for name in ("nn2", "nn2 pool")}
    pooled_bank = [F.avg_pool2d(level, 3, stride=1, padding=1) for level in features[-2:]]

    def nearest_map(query: list[torch.Tensor], references: list[torch.Tensor], size: torch.Size) -> torch.Tensor:
        maps = []
        for feature, reference in zip(query, references, strict=True):
            _, similarity = nearest_reference(flatten_positions(feature), flatten_positions(reference))
            level_map = (1 - similarity).reshape(feature.shape[0], 1, *feature.shape[-2:])
            maps.append(generator._upsample(level_map, size))
        return generator.blur(sum(maps))

    def nearest_score(query: list[torch.Tensor], references: list[torch.Tensor], size: torch.Size) -> torch.Tensor:
        return nearest_map(query, references, size).flatten(start_dim=1).amax(dim=1).cpu()

    labels, masks = [], []

    def top_mean(maps: torch.Tensor) -> torch.Tensor:
        flat = maps.flatten(start_dim=1)
        return flat.topk(max(1, round(flat.shape[1] * 0.01)), dim=1).values.mean(dim=1)

    for batch in loader:
        images, gt_masks = transform(batch.image, batch.gt_mask)
        images = images.to(device)
        query = model.feature_extractor(images)
        log_likelihoods, similarities, coverage = model.level_outputs(query, bank)
        size = images.shape[-2:]
        nn_map = generator.blur(sum(generator._upsample((1 - s).unsqueeze(1), size) for s in similarities))
        nearest["nn"].append(nn_map.flatten(start_dim=1).amax(dim=1).cpu())
        nn2_map = nearest_map(query[-2:], features[-2:], size)
        nearest["nn2"].append(nn2_map.flatten(start_dim=1).amax(dim=1).cpu())
        pooled = [F.avg_pool2d(level, 3, stride=1, padding=1) for level in query[-2:]]
        pool_map = nearest_map(pooled, pooled_bank, size)
        nearest["nn2 pool"].append(pool_map.flatten(start_dim=1).amax(dim=1).cpu())
        if has_masks:  # pixel maps of the flow-free scores (uncalibrated here; divided by their thresholds below)
            nearest_maps["nn2"].append(nn2_map[:, 0].cpu())
            nearest_maps["nn2 pool"].append(pool_map[:, 0].cpu())
        for mode, calibration in calibrations.items():
            parts = generator.components(
                log_likelihoods, similarities, images.shape[-2:], calibration.level_constants, coverage
            )
            top = top_mean(parts.anomaly_map)
            collected[mode]["map"].append((parts.anomaly_map[:, 0] / calibration.map_threshold).cpu())
            collected[mode]["max"].append(parts.map_max.cpu())
            collected[mode]["top1"].append(top.cpu())
            collected[mode]["dis"].append(parts.dissimilarity.cpu())
            collected[mode]["rev"].append(parts.reverse_dissimilarity.cpu())
            constants = calibration.level_constants
            nll = sum(
                generator._upsample(torch.relu(constants[level] - log_normal).unsqueeze(1), size)
                for level, (log_normal, _) in enumerate(log_likelihoods)
            )
            nll = generator.blur(nll)
            collected[mode]["nll_max"].append(nll.flatten(start_dim=1).amax(dim=1).cpu())
            collected[mode]["nll_top1"].append(top_mean(nll).cpu())
        labels.append(batch.gt_label.reshape(-1))
        if has_masks:
            masks.append(gt_masks.reshape(len(images), *images.shape[-2:]).bool().cpu())
    labels = torch.cat(labels).long()
    masks = torch.cat(masks) if masks else None
    # leave-one-out threshold of the flow-free nearest-neighbour score (as the calibration does for the map)
    nn2_threshold = max(
        float(nearest_score([level[index : index + 1] for level in features[-2:]],
                            [torch.cat([level[:index], level[index + 1 :]]) for level in features[-2:]],
                            image_size)[0])
        for index in range(selection.k)
    )  # fmt: skip
    ratio_nn2 = torch.cat(nearest["nn2"]) / max(nn2_threshold, 1e-6)
    rows = [{"variant": "ResAD nn2 calibrated", **image_metrics(ratio_nn2, labels), **verdicts(ratio_nn2, labels)}]
    # the same with PatchCore's 3 x 3 neighbourhood averaging of both sides (diagnostic: helps textures, hurts boards)
    pool_threshold = max(
        float(nearest_score([level[index : index + 1] for level in pooled_bank],
                            [torch.cat([level[:index], level[index + 1 :]]) for level in pooled_bank],
                            image_size)[0])
        for index in range(selection.k)
    )  # fmt: skip
    ratio_pool = torch.cat(nearest["nn2 pool"]) / max(pool_threshold, 1e-6)
    nn2_both = (ratio_nn2 + ratio_pool) / 2
    rows.append({"variant": "ResAD nn2+pool calibrated", **image_metrics(nn2_both, labels)})
    if masks is not None:  # pixel AUROC of the flow-free maps, alone and fused with the flows' calibrated map
        nn2_maps = torch.cat(nearest_maps["nn2"]) / max(nn2_threshold, 1e-6)
        pool_maps = torch.cat(nearest_maps["nn2 pool"]) / max(pool_threshold, 1e-6)
        flow_maps = torch.cat(collected["per_class"]["map"])
        for name, maps in (("nn2", nn2_maps), ("nn2 pool", pool_maps), ("flows+nn2", (flow_maps + nn2_maps) / 2),
                           ("flows+nn2 pool", (flow_maps + pool_maps) / 2)):  # fmt: skip
            rows.append({"variant": f"ResAD map {name}", **pixel_metrics(maps, masks, aupro=False)})
    for mode, calibration in calibrations.items():
        values = {name: torch.cat(parts) for name, parts in collected[mode].items()}
        pixel = pixel_metrics(values["map"], masks, aupro=aupro)
        ratio_max = values["max"] / calibration.score_threshold
        ratio_dis = values["dis"] / calibration.dissimilarity_threshold
        ratio_rev = values["rev"] / calibration.reverse_dissimilarity_threshold
        top_calibrated = values["top1"]  # ranking only
        for score_name, scores in (
            ("max", ratio_max),
            ("top1", top_calibrated),
            ("max+dis", torch.maximum(ratio_max, ratio_dis)),
        ):
            row = {"variant": f"ResAD {mode} {score_name}", **image_metrics(scores, labels), **pixel}
            if score_name != "top1":
                row.update(verdicts(scores, labels))
            rows.append(row)
        fused = (ratio_max + ratio_nn2) / 2  # both in units of their own leave-one-out threshold
        rows.append({"variant": f"ResAD {mode} max+nn2", **image_metrics(fused, labels), **verdicts(fused, labels)})
        fused_pool = (ratio_max + nn2_both) / 2
        rows.append({"variant": f"ResAD {mode} max+nn2+pool", **image_metrics(fused_pool, labels)})
        # the previous release's product: fused score with the odd-frame check (max with the dissimilarity ratio) ...
        checked = torch.maximum(fused, ratio_dis)
        rows.append(
            {"variant": f"ResAD {mode} max+nn2+dis", **image_metrics(checked, labels), **verdicts(checked, labels)}
        )
        # ... and the check gated at its own threshold: same labels at margin 1, the ranking below it untouched
        gated = torch.where(ratio_dis > 1, checked, fused)
        rows.append({"variant": f"ResAD {mode} max+nn2+dis gated", **image_metrics(gated, labels)})
        # ... and with the reverse statistic too (the product's checks, but here at margin 1 like every ratio of this
        # table; benchmarks/odd_frames.py evaluates them at the product's margins): both checks, gated
        odd = torch.maximum(ratio_dis, ratio_rev)
        both = torch.where(odd > 1, torch.maximum(fused, odd), fused)
        rows.append({"variant": f"ResAD {mode} max+nn2+odd gated", **image_metrics(both, labels),
                     **verdicts(both, labels)})  # fmt: skip
        if mode == "per_class":
            per_image = pd.DataFrame({"label": labels.numpy(), "max": ratio_max.numpy(), "nn2": ratio_nn2.numpy(),
                                      "dis": ratio_dis.numpy(), "rev": ratio_rev.numpy(),
                                      "nn2pool": ratio_pool.numpy()})  # fmt: skip
        rows.extend(
            {"variant": f"ResAD {mode} nll {name}", **image_metrics(values[f"nll_{name}"], labels)}
            for name in ("max", "top1")
        )
    rows.extend(
        {"variant": f"ResAD {name} max", **image_metrics(torch.cat(values), labels)} for name, values in nearest.items()
    )
    return rows, per_image


class EpochSnapshots(Callback):
    """Saves the model after chosen epochs, so that one training is scored at several lengths (``--save_epochs``)."""

    def __init__(self, folder: Path, epochs: list[int]) -> None:
        self.folder, self.epochs, self.saved, self.last_step = folder, set(epochs), {}, 0

    def on_train_epoch_end(self, trainer: Trainer, pl_module: ResAD) -> None:
        del pl_module
        done, self.last_step = trainer.current_epoch + 1, trainer.global_step
        if done in self.epochs and trainer.is_global_zero:
            self.saved[done] = self.folder / f"model_e{done}.ckpt"
            trainer.save_checkpoint(self.saved[done])


def draw_selection(resad: ResAD, category: str, k: int, seed: int):
    return resad.references.select(category, k, seed)


def run_setting(args: argparse.Namespace, setting: str) -> pd.DataFrame:
    config = yaml.safe_load((REPO / "configs" / "settings" / f"{setting}.yaml").read_text())
    output = Path(args.output) / setting
    output.mkdir(parents=True, exist_ok=True)
    seed = config.get("seed", 42)
    seed_everything(seed, workers=True)
    datamodule = MultiClassDataModule(
        sources=config["sources"],
        targets=config["targets"],
        train_batch_size=config.get("batch_size", 8),
        eval_batch_size=config.get("batch_size", 8),
        num_workers=args.num_workers,
        seed=seed,
        name=setting,
    )
    model_args = {**config["model"], **json.loads(args.model_overrides)}
    start = time.perf_counter()
    models: dict[str, ResAD] = {}  # variant-name suffix -> model (one model: no suffix)
    if args.checkpoint:
        resad = ResAD.load_from_checkpoint(args.checkpoint, map_location="cpu", **json.loads(args.model_overrides))
        datamodule.setup()
        train_seconds = float("nan")
        models[""] = resad
    else:
        resad = ResAD(**model_args)
        trainer = {**config.get("trainer", {}), "enable_progress_bar": False}
        if args.epochs:
            trainer["max_epochs"] = args.epochs
        if args.max_minutes:
            trainer["max_time"] = {"minutes": args.max_minutes}
        snapshots = EpochSnapshots(output, args.save_epochs)
        engine = Engine(default_root_dir=output / "train", logger=False, callbacks=[snapshots], **trainer)
        engine.fit(resad, datamodule=datamodule)
        train_seconds = time.perf_counter() - start
        engine.trainer.save_checkpoint(output / "model.ckpt")
        completed = engine.trainer.fit_loop.epoch_progress.current.completed
        print(f"[{setting}] {completed} epoch(s) completed; snapshots at {sorted(snapshots.saved)}", flush=True)
        partial = engine.trainer.global_step > snapshots.last_step  # --max_minutes stopped it inside an epoch
        for epochs, path in sorted(snapshots.saved.items()):
            if epochs < completed or partial:
                models[f" @e{epochs}"] = ResAD.load_from_checkpoint(path, map_location="cpu")
        models[f" @e{completed}{'+' if partial else ''}" if snapshots.saved or partial else ""] = resad
    print(f"[{setting}] trained in {train_seconds:.0f} s", flush=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pools = {name: datamodule.reference_pool(name) for name in datamodule.target_categories}
    pools.update({name: datamodule.reference_pool(name) for name in datamodule.source_categories})
    for model in models.values():
        model.to(device).eval()
        model.references.set_pools(pools)
    patchcore = FewShotPatchcore(
        backbone=model_args["backbone"],
        layers=list(resad.model.feature_extractor.layers[-2:]),
        pre_trained=model_args.get("pre_trained", True),
        image_size=int(resad.input_size[0]),
    )
    patchcore.model.to(device)
    rows, per_image = [], []
    groups = [("target", name, datamodule.test_data.samples) for name in datamodule.target_categories]
    if args.source_val:
        groups += [("source", name, datamodule.val_data.samples) for name in datamodule.source_categories]
    groups = [(role, category, table[table[CATEGORY_COLUMN] == category]) for role, category, table in groups]
    groups = [group for group in groups if group[2].label_index.nunique() >= 2]
    # draws outermost: a run stopped by a time limit still has whole draws over every category
    for draw in range(args.draws):
        for role, category, samples in groups:
            for k in args.shots:
                selection = draw_selection(resad, category, k, seed + draw)
                base = {"setting": setting, "role": role, "category": category, "k": k, "draw": draw,
                        "train_s": train_seconds}  # fmt: skip
                aupro = role == "target" and args.aupro
                for suffix, model in models.items():
                    variants, images = resad_variants(model, samples, selection, args.batch_size, aupro=aupro)
                    rows.extend({**base, **row, "variant": row["variant"] + suffix} for row in variants)
                    keys = ("setting", "role", "category", "k", "draw")
                    per_image.append(images.assign(model=suffix.strip(), **{key: base[key] for key in keys}))
                if role == "target":
                    patchcore.set_references(selection)
                    metrics = category_metrics(score_samples(patchcore.model, samples, batch_size=args.batch_size))
                    rows.append({**base, "variant": "PatchCore", **metrics})
                pd.DataFrame(rows).to_csv(output / "rows.csv", index=False)  # partial results survive a time-out
                pd.concat(per_image).to_csv(output / "image_scores.csv", index=False)
                print(f"[{setting}] {role} {category} k={k} draw={draw} done ({time.perf_counter() - start:.0f} s)",
                      flush=True)  # fmt: skip
    return pd.DataFrame(rows)


def summarize(frame: pd.DataFrame) -> str:
    targets = frame[frame.role == "target"]
    metrics = ["image_AUROC", "pixel_AUROC", "pixel_AUPRO"]
    # mean over categories per draw, then mean ± std over draws (std = how much the reference draw moves it)
    per_draw = targets.groupby(["setting", "variant", "k", "draw"])[metrics].mean()
    table = per_draw.groupby(["setting", "variant", "k"]).agg(["mean", "std"])
    lines = [table.to_string(float_format=lambda v: f"{100 * v:.1f}")]
    verdict_columns = [c for c in frame.columns if c.startswith(("fpr@", "recall@", "oracle_"))]
    if verdict_columns:
        verdict = (
            frame[frame[verdict_columns[0]].notna()]
            .groupby(["role", "setting", "variant", "k"])[verdict_columns]
            .mean()
        )
        lines.append(verdict.to_string(float_format=lambda v: f"{100 * v:.1f}"))
    return "\n\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=["shared_pcb_crack_to_tile", "shared_tile_crack_to_pcb",
                                                          "shared_pcb_tile_to_crack"])  # fmt: skip
    parser.add_argument("--output", default="results/ablation")
    parser.add_argument("--shots", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--max_minutes", type=float, default=None, help="stop training after this wall-clock time")
    parser.add_argument("--save_epochs", nargs="*", type=int, default=[],
                        help="also score the model as it was after these epochs (e.g. 3 10)")  # fmt: skip
    parser.add_argument("--model_overrides", default="{}", help='JSON, e.g. \'{"flow_steps": "chunk"}\'')
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--no_source_val", dest="source_val", action="store_false")
    parser.add_argument("--no_aupro", dest="aupro", action="store_false", help="skip ResAD's pixel AUPRO (slow)")
    args = parser.parse_args()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO, check=False
    ).stdout
    print(f"commit {commit.strip()}; command args {vars(args)}", flush=True)
    frames = [run_setting(args, setting) for setting in args.settings]
    frame = pd.concat(frames, ignore_index=True)
    frame.to_csv(Path(args.output) / "rows.csv", index=False)
    print(summarize(frame))


if __name__ == "__main__":
    main()
