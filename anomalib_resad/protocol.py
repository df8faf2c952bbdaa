# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""Class-generalization protocol: train once on source classes, detect anomalies in unseen classes from k shots.

:func:`run_protocol` (command line: ``resad evaluate --config configs/settings/<setting>.yaml``):

1. trains ResAD on the source categories (:class:`~anomalib_resad.data.MultiClassDataModule`: normal training images,
   then also the source test anomalies with masks), or loads a trained checkpoint;
2. for every target category, every k in ``shots`` and every reference draw (seeds ``seed``, ``seed + 1``, ...),
   draws k normal images from the category's training split - or takes them from ``reference_dirs`` - writes the list
   to ``references/<category>/k<k>_draw<d>.json``, and scores the category's test set;
3. writes per-draw rows (``results.csv``), mean and std over draws (``summary.csv``, ``summary.md``) of image AUROC,
   pixel AUROC, pixel AUPRO and image F1-max, per category and as a mean over categories, and anomaly-map images
   of the first draw (``anomaly_maps/<model>/<category>/k<k>/``, anomalib's visualiser);
4. optionally runs baselines on the same reference images (``baselines: [patchcore]``).

Example:
    >>> run_protocol(  # doctest: +SKIP
    ...     sources=[{"datamodule": "MVTecAD", "root": "./datasets/MVTecAD", "categories": "all"}],
    ...     targets=[{"datamodule": "Visa", "root": "./datasets/visa", "categories": "all"}],
    ...     shots=[2, 4, 8], draws=3, output_dir="results/mvtec_to_visa",
    ... )
"""

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from anomalib.engine import Engine
from lightning.pytorch import seed_everything

from .baselines import FewShotPatchcore
from .data.multi_class import CATEGORY_COLUMN, MultiClassDataModule
from .errors import ResADConfigurationError
from .evaluation import METRIC_NAMES, VERDICT_NAMES, category_metrics, save_anomaly_maps, score_samples
from .lightning_model import ResAD

logger = logging.getLogger(__name__)

BASELINES = ("patchcore",)


def _with_root(specs: Sequence[dict[str, Any]], root: str | None) -> list[dict[str, Any]]:
    return [{**spec, "root": root} if root is not None else dict(spec) for spec in specs]


def _summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over draws per (model, category, k), plus the mean over categories per (model, k).

    The std of the category mean is taken over draws (the mean over categories of each draw), so it measures how
    much the choice of reference images moves the headline number.
    """
    keys = ["model", "category", "k"]
    columns = [name for name in METRIC_NAMES + VERDICT_NAMES if name in results]
    grouped = results.groupby(keys, sort=False)[columns]
    per_category = grouped.mean().join(grouped.std(ddof=0), rsuffix="_std").reset_index()
    per_draw = results.groupby(["model", "k", "draw"], sort=False)[columns].mean()
    overall = per_draw.groupby(["model", "k"], sort=False)
    mean = overall.mean().join(overall.std(ddof=0), rsuffix="_std").reset_index()
    mean.insert(1, "category", "mean")
    return pd.concat([per_category, mean], ignore_index=True)


def summary_markdown(summary: pd.DataFrame) -> str:
    """Markdown table: one row per model and category, columns ``I-AUROC / P-AUROC`` (mean ± std) per k."""
    shots = sorted(summary.k.unique())
    header = "| model | category | " + " | ".join(f"k={k} I-AUROC / P-AUROC / P-AUPRO" for k in shots) + " |"
    lines = [header, "|" + "---|" * (2 + len(shots))]
    for (model, category), rows in summary.groupby(["model", "category"], sort=False):
        cells = []
        for k in shots:
            row = rows[rows.k == k]
            if row.empty:
                cells.append("-")
                continue
            row = row.iloc[0]
            cells.append(
                " / ".join(
                    f"{100 * row[name]:.1f}±{100 * row[name + '_std']:.1f}"
                    for name in ("image_AUROC", "pixel_AUROC", "pixel_AUPRO")
                ),
            )
        label = f"**{category}**" if category == "mean" else category
        lines.append(f"| {model} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_protocol(
    sources: Sequence[dict[str, Any]],
    targets: Sequence[dict[str, Any]],
    output_dir: str = "results/protocol",
    model: dict[str, Any] | None = None,
    trainer: dict[str, Any] | None = None,
    checkpoint: str | None = None,
    shots: Sequence[int] = (2, 4, 8),
    draws: int = 3,
    seed: int = 42,
    reference_dirs: dict[str, str] | None = None,
    source_root: str | None = None,
    target_root: str | None = None,
    allow_overlap: bool = False,
    include_test: bool = True,
    batch_size: int = 8,
    num_workers: int = 2,
    maps_per_category: int = 8,
    baselines: Sequence[str] = (),
    baseline_layers: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Train on source categories and evaluate on unseen target categories with k reference images.

    Args:
        sources (Sequence[dict]): Training categories (``MultiClassDataModule`` entries).
        targets (Sequence[dict]): Unseen categories.
        output_dir (str): Where everything is written. Defaults to ``"results/protocol"``.
        model (dict | None): :class:`ResAD` arguments. Defaults to the reference settings.
        trainer (dict | None): ``Engine`` / Lightning Trainer arguments (``max_epochs`` ...).
        checkpoint (str | None): A trained ResAD checkpoint: skip training. Defaults to ``None``.
        shots (Sequence[int]): Numbers of reference images. Defaults to ``(2, 4, 8)``.
        draws (int): Reference draws per k (seeds ``seed .. seed + draws - 1``). Defaults to ``3``.
        seed (int): Seed of training and of the first draw. Defaults to ``42``.
        reference_dirs (dict[str, str] | None): Category -> folder of reference images (its first k, sorted), used
            instead of drawing; one draw. Defaults to ``None``.
        source_root (str | None): Replace the ``root`` of every source entry. Defaults to ``None``.
        target_root (str | None): Replace the ``root`` of every target entry. Defaults to ``None``.
        allow_overlap (bool): Allow target categories that are also sources. Defaults to ``False``.
        include_test (bool): Train on the sources' test anomalies (reference protocol). Defaults to ``True``.
        batch_size (int): Training and evaluation batch size. Defaults to ``8``.
        num_workers (int): Data loader workers. Defaults to ``2``.
        maps_per_category (int): Anomaly-map images written per category and k (first draw). Defaults to ``8``.
        baselines (Sequence[str]): Also evaluate these on the same references: ``"patchcore"``. Defaults to none.
        baseline_layers (Sequence[str] | None): Levels of the baselines' backbone. Defaults to ResAD's two deepest.

    Returns:
        pd.DataFrame: The summary (also written to ``summary.csv`` / ``summary.md``).
    """
    start = time.perf_counter()
    unknown = sorted(set(baselines) - set(BASELINES))
    if unknown:
        msg = f"Unknown baseline(s) {unknown}; available: {list(BASELINES)}."
        raise ResADConfigurationError(msg)
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    seed_everything(seed, workers=True)
    datamodule = MultiClassDataModule(
        sources=_with_root(sources, source_root),
        targets=_with_root(targets, target_root),
        include_test=include_test,
        allow_overlap=allow_overlap,
        train_batch_size=batch_size,
        eval_batch_size=batch_size,
        num_workers=num_workers,
        seed=seed,
        name="protocol",
    )
    if checkpoint:
        resad = ResAD.load_from_checkpoint(checkpoint, map_location="cpu")
        datamodule.setup()
    else:
        resad = ResAD(**(model or {}))
        engine = Engine(default_root_dir=output / "train", logger=False, **(trainer or {}))
        engine.fit(resad, datamodule=datamodule)
        callback = engine.trainer.checkpoint_callback
        checkpoint = callback.best_model_path if callback is not None else None
        logger.info("Trained in %.0f s; checkpoint %s", time.perf_counter() - start, checkpoint)

    evaluated: dict[str, Any] = {"ResAD": resad}
    if "patchcore" in baselines:
        backbone = resad.model.feature_extractor
        evaluated["PatchCore"] = FewShotPatchcore(
            backbone=backbone.backbone,
            layers=list(baseline_layers or backbone.layers[-2:]),
            pre_trained=(model or {}).get("pre_trained", True),
            image_size=int(resad.input_size[0]) if resad.input_size is not None else 224,
        )

    rows = []
    test_samples = datamodule.test_data.samples
    resad.references.set_pools({name: datamodule.reference_pool(name) for name in datamodule.target_categories})
    for category in datamodule.target_categories:
        samples = test_samples[test_samples[CATEGORY_COLUMN] == category]
        for k in shots:
            for draw in range(1 if reference_dirs and category in reference_dirs else draws):
                folder = reference_dirs.get(category) if reference_dirs else None
                selection = resad.references.select(category, k, seed + draw, folder=folder)
                selection.save(output / "references" / category / f"k{k}_draw{draw}.json")
                for name, evaluator in evaluated.items():
                    evaluator.set_references(selection)
                    module = evaluator if name == "ResAD" else evaluator.model
                    scores = score_samples(module, samples, batch_size=batch_size)
                    metrics = category_metrics(scores)
                    if draw == 0 and maps_per_category:
                        save_anomaly_maps(
                            scores, output / "anomaly_maps" / name / category / f"k{k}", maps_per_category
                        )
                    row = {"model": name, "category": category, "k": k, "draw": draw, "seed": selection.seed}
                    rows.append({**row, **metrics})
                    logger.info("%s %s k=%d draw %d: %s", name, category, k, draw, metrics)
    results = pd.DataFrame(rows)
    results.to_csv(output / "results.csv", index=False)
    summary = _summarize(results)
    summary.to_csv(output / "summary.csv", index=False)
    (output / "summary.md").write_text(summary_markdown(summary))
    print(summary_markdown(summary))
    print(f"checkpoint: {checkpoint}\nresults: {output}  ({time.perf_counter() - start:.0f} s)")
    return summary
