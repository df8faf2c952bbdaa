# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""Class-generalization protocol: train once on source classes, detect anomalies in unseen classes from k shots.

:func:`run_protocol` (command line: ``resad evaluate --config configs/settings/<setting>.yaml``):

1. trains ResAD on the source categories (:class:`~anomalib_resad.data.MultiClassDataModule`: normal training images,
   then also the source test anomalies with masks), or loads a trained checkpoint;
2. for every target category, every k in ``shots`` and every reference draw (seeds ``seed``, ``seed + 1``, ...),
   draws k normal images from the category's training split - or takes them from ``reference_dirs`` - writes the list
   to ``references/<category>/k<k>_draw<d>.json``, and scores the category's test set;
3. writes per-draw rows (``results.csv``), every image's score (``image_scores.csv``), mean and std over draws
   (``summary.csv``, ``summary.md``) of image AUROC,
   pixel AUROC, pixel AUPRO and image F1-max, per category and as a mean over categories, anomaly-map images
   of the first draw (``anomaly_maps/<model>/<category>/k<k>/``, anomalib's visualiser) and a plot of image AUROC
   against k (``auroc_vs_k.png``);
4. optionally runs baselines on the very same reference images (``baselines: [nearest, patchcore, winclip, ...]``,
   :mod:`.baselines`); a baseline whose weights are not on this machine is skipped with one log line and shown as
   "skipped: no weights";
5. measures what each model costs per image in the same run (:mod:`.cost`, ``cost.csv`` and the cost
   columns of the summary): ms/image at batch 1, images/s at batch 16, peak memory, multiply-adds, the time to set
   a class up from its k images (``fit_s``) and ResAD's training time (``train_s``);
6. resumes: every finished cell (model x category x k x draw) is in ``results.csv`` at once, and a run started again
   with the same ``output_dir`` and settings skips it; ResAD's finished training is reused (:mod:`.grid`).

Example:
    >>> run_protocol(  # doctest: +SKIP
    ...     sources=[{"datamodule": "MVTecAD", "root": "./datasets/MVTecAD", "categories": "all"}],
    ...     targets=[{"datamodule": "Visa", "root": "./datasets/visa", "categories": "all"}],
    ...     shots=[2, 4, 8], draws=3, output_dir="results/mvtec_to_visa",
    ... )
"""

import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
from anomalib.data.transforms.utils import extract_transforms_by_type
from anomalib.engine import Engine
from anomalib.models.components import AnomalibModule
from lightning.pytorch import seed_everything
from torchvision.transforms.v2 import Resize

from ..anomaly_map import SCORINGS, check_sensitivity
from ..checkpoint_settings import SCORING_OPTIONS
from ..data.multi_class import CATEGORY_COLUMN, MultiClassDataModule
from ..errors import ResADConfigurationError, check_choice
from ..evaluation import (
    METRIC_NAMES,
    ORACLE_NAMES,
    VERDICT_NAMES,
    CategoryScores,
    category_metrics,
    save_anomaly_maps,
    score_samples,
    score_samples_scorings,
)
from ..lightning_model import ResAD
from ..reference_views import views_mode
from ..references import ReferenceSelection, list_folder_images
from .baselines import BASELINES, SKIPPED_STATUS, FewShotPatchcore, build_baselines
from .cost import COST_COLUMNS, OPENVINO_COST_COLUMNS, measure_cost, measure_openvino_cost
from .grid import CELL_KEYS, CsvStore, EpochProgress, Progress, check_run_config, plot_auroc_vs_k

logger = logging.getLogger(__name__)

COST_KEYS = ("model", "k")
# Rows that score with the trained ResAD itself, another way, on the same banks (row name -> ResAD ``scoring``):
# ``nearest`` - its matching alone (the class's nearest-neighbour map over its leave-one-out threshold, same levels,
# views and averaging choice), no trained part; ``flows`` - the flows' map alone (the paper's scoring).
RESAD_ROWS = {"nearest": "nearest", "flows": "paper"}
SPLITS = ("targets", "source_validation")


def _with_root(specs: Sequence[dict[str, Any]], root: str | None) -> list[dict[str, Any]]:
    return [{**spec, "root": root} if root is not None else dict(spec) for spec in specs]


def _summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Mean and sample std over draws per (model, category, k), per domain, and over categories and domains.

    Rows: each category; ``mean`` - the mean over categories; where the categories belong to fewer domains than
    there are categories (``domain`` in the source/target entries), each domain's mean (``domain:<name>``) and the
    mean over domains (``domain mean``, every domain weighted alike). A mean row's std is taken over draws (the mean
    of each draw), so it measures how much the choice of reference images moves the headline number.
    """
    keys = ["model", "category", "k"]
    columns = [name for name in METRIC_NAMES + VERDICT_NAMES + ORACLE_NAMES if name in results]

    def over_draws(per_draw: pd.DataFrame, label: str) -> pd.DataFrame:
        overall = per_draw.groupby(["model", "k"], sort=False)
        mean = overall.mean().join(overall.std(ddof=1), rsuffix="_std").reset_index()
        mean.insert(1, "category", label)
        return mean

    grouped = results.groupby(keys, sort=False)[columns]
    frames = [grouped.mean().join(grouped.std(ddof=1), rsuffix="_std").reset_index()]
    frames.append(over_draws(results.groupby(["model", "k", "draw"], sort=False)[columns].mean(), "mean"))
    if "domain" in results and results.domain.nunique() < results.category.nunique():
        per_domain = results.groupby(["model", "domain", "k", "draw"], sort=False)[columns].mean().reset_index()
        for domain, rows in per_domain.groupby("domain", sort=False):
            frames.append(over_draws(rows.drop(columns="domain").set_index(["model", "k", "draw"]), f"domain:{domain}"))
        domain_mean = per_domain.groupby(["model", "k", "draw"], sort=False)[columns].mean()
        frames.append(over_draws(domain_mean, "domain mean"))
    return pd.concat(frames, ignore_index=True)


def _with_cost(
    summary: pd.DataFrame,
    results: pd.DataFrame,
    costs: pd.DataFrame,
    train_s: float,
    skipped: Sequence[str],
    shots: Sequence[int],
) -> pd.DataFrame:
    """Add the cost columns to the mean rows, the latency ratio to PatchCore, and rows for skipped models."""
    summary = summary.copy()
    summary.insert(3, "status", "ok")
    if not costs.empty:
        table = costs.reindex(columns=[*COST_KEYS, *COST_COLUMNS, *OPENVINO_COST_COLUMNS])  # NaN: not measured
        if "fit_s" in results:
            table = table.merge(results.groupby(list(COST_KEYS), as_index=False).fit_s.mean(), on=list(COST_KEYS))
        table["train_s"] = [train_s if model == "ResAD" else 0.0 for model in table.model]
        patchcore = table[table.model == "PatchCore"].set_index("k").ms_per_image_b1
        table["latency_vs_PatchCore"] = [
            row.ms_per_image_b1 / patchcore[row.k] if row.k in patchcore.index else math.nan
            for row in table.itertuples()
        ]
        table.insert(1, "category", "mean")
        summary = summary.merge(table, on=["model", "category", "k"], how="left")
    extra = [{"model": model, "category": "mean", "k": k, "status": SKIPPED_STATUS} for model in skipped for k in shots]
    return pd.concat([summary, pd.DataFrame(extra)], ignore_index=True) if extra else summary


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
            status = row.get("status", "ok")
            if isinstance(status, str) and status != "ok":  # e.g. "skipped: no weights"
                cells.append(status)
                continue
            cells.append(" / ".join(_mean_std(row, name) for name in ("image_AUROC", "pixel_AUROC", "pixel_AUPRO")))
        label = f"**{category}**" if category in {"mean", "domain mean"} else category
        lines.append(f"| {model} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _mean_std(row: pd.Series, name: str) -> str:
    """``mean±std`` in percent; ``-`` where the metric does not apply (no masks), no std from a single draw."""
    mean, std = row.get(name, math.nan), row.get(name + "_std", math.nan)
    if pd.isna(mean):
        return "-"
    return f"{100 * mean:.1f}" if pd.isna(std) else f"{100 * mean:.1f}±{100 * std:.1f}"


def cost_markdown(summary: pd.DataFrame) -> str:
    """Markdown table of the cost columns: one row per model and k (empty when no cost was measured)."""
    if "ms_per_image_b1" not in summary:
        return ""
    rows = summary[(summary.category == "mean") & summary.ms_per_image_b1.notna()]
    if rows.empty:
        return ""
    lines = [
        "| model | k | ms/image (batch 1) | images/s (batch 16) | OpenVINO f32 ms/image (batch 1) | "
        "OpenVINO f32 images/s (batch 16) | peak MiB (batch 16) | GMACs/image | fit s (k images) | train s | "
        "latency / PatchCore |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def number(value: float, digits: int) -> str:
        return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"

    for row in rows.sort_values(["k"], kind="stable").itertuples():
        ratio = "-" if math.isnan(row.latency_vs_PatchCore) else f"{row.latency_vs_PatchCore:.2f}x"
        openvino = [getattr(row, column, math.nan) for column in OPENVINO_COST_COLUMNS]
        lines.append(
            f"| {row.model} | {row.k} | {row.ms_per_image_b1:.1f} | {row.images_per_s_b16:.1f} | "
            f"{number(openvino[0], 1)} | {number(openvino[1], 1)} | "
            f"{row.peak_mem_MiB_b16:.0f} | {row.GMACs_per_image:.2f} | {row.fit_s:.2f} | {row.train_s:.0f} | {ratio} |"
        )
    return "\n".join(lines) + "\n"


def _input_size(model: AnomalibModule) -> tuple[int, int]:
    """The pre-processed input size of a model (its pre-processor's resize)."""
    transform = model.pre_processor.transform if model.pre_processor is not None else None
    resizes = extract_transforms_by_type(transform, Resize) if transform is not None else []
    size = resizes[0].size if resizes else (224, 224)
    return (int(size[0]), int(size[-1])) if isinstance(size, (list, tuple)) else (int(size), int(size))


class _Evaluated:
    """A model of the grid: the anomalib module scored, how it takes a class's k references, and how it scores."""

    def __init__(
        self,
        module: AnomalibModule,
        set_references: Callable[[ReferenceSelection], None],
        scoring: str | None = None,
    ) -> None:
        self.module = module
        self.set_references = set_references
        self.scoring = scoring  # a ResAD scoring: the ResAD module scored that way

    @contextmanager
    def scored(self) -> Iterator[AnomalibModule]:
        """The module, scoring as this row asks while the block runs."""
        if self.scoring is None:
            yield self.module
            return
        generator = self.module.model.anomaly_map_generator
        saved, generator.scoring = generator.scoring, self.scoring
        try:
            yield self.module
        finally:
            generator.scoring = saved


def _module_groups(evaluated: dict[str, "_Evaluated"], names: Sequence[str]) -> list[list[str]]:
    """``names`` grouped by the module they score (first appearance order): each group takes references once."""
    groups: dict[int, list[str]] = {}
    for name in names:
        groups.setdefault(id(evaluated[name].module), []).append(name)
    return list(groups.values())


def _score_rows(
    evaluated: dict[str, "_Evaluated"], names: Sequence[str], samples: pd.DataFrame, batch_size: int
) -> dict[str, CategoryScores]:
    """Scores of rows that share one module: a ResAD module scores all its scorings in one pass."""
    if not names:
        return {}
    module = evaluated[names[0]].module
    if not isinstance(module, ResAD):
        return {name: score_samples(module, samples, batch_size=batch_size) for name in names}
    default = module.model.anomaly_map_generator.scoring
    scorings = {name: evaluated[name].scoring or default for name in names}
    scored = score_samples_scorings(module, samples, sorted(set(scorings.values())), batch_size=batch_size)
    return {name: scored[scoring] for name, scoring in scorings.items()}


def _measure_cost(
    entry: _Evaluated, name: str, category: str, k: int, costs: CsvStore, repeats: int, openvino: bool
) -> None:
    """Record what ``entry`` costs per image with the references it holds (:mod:`.cost`)."""
    size = _input_size(entry.module)
    with entry.scored() as module:
        measured = measure_cost(module.model, size, repeats=repeats).as_row()
        if openvino:
            measured.update(measure_openvino_cost(module, size, repeats=repeats))
    costs.add({"model": name, "k": k, "category": category, **measured})


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
    baseline_weights: dict[str, str] | None = None,
    cost: bool = True,
    cost_repeats: int = 5,
    openvino_cost: bool = True,
    resume: bool = True,
    split: str = "targets",
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
        baselines (Sequence[str]): Also evaluate these on the same references: ``"nearest"`` (ResAD's own
            matching with no trained part: the nearest-neighbour map alone, same levels, views, averaging choice and
            leave-one-out calibration), ``"flows"`` (the flows' map alone, the paper's scoring), ``"patchcore"``,
            ``"patchcore_views"`` (its memory bank also holding the views ResAD's banks hold: ResAD's
            ``reference_views``), ``"winclip"``, ``"anomaly_dino"``. Defaults to none.
        baseline_layers (Sequence[str] | None): Levels of PatchCore's backbone. Defaults to ResAD's two deepest.
        baseline_weights (dict[str, str] | None): Baseline -> local weights file (``winclip``: the open_clip
            ``ViT-B-16-plus-240`` / ``laion400m_e31`` file; ``anomaly_dino``: the timm
            ``vit_small_patch14_dinov2.lvd142m`` state dict). Defaults to the caches (see :mod:`.baselines`).
        cost (bool): Measure each model's cost per image (:mod:`.cost`). Defaults to ``True``.
        cost_repeats (int): Timed forward passes per batch size (the median is reported). Defaults to ``5``.
        openvino_cost (bool): With ``cost``, also export each model to OpenVINO (as ``anomalib export`` does) and
            time it in f32 (:func:`.cost.measure_openvino_cost`; about a minute of export per model
            and k). Defaults to ``True``.
        resume (bool): Keep the finished cells and the finished training found in ``output_dir``; ``False``
            recomputes everything. Defaults to ``True``.
        split (str): What is scored: ``"targets"`` (the unseen categories' test images) or ``"source_validation"``
            (the source categories' held-out validation images, references drawn from their training split: where
            defaults are chosen). Defaults to ``"targets"``.

    Returns:
        pd.DataFrame: The summary (also written to ``summary.csv`` / ``summary.md``).
    """
    start = time.perf_counter()
    unknown = sorted(set(baselines) - set(BASELINES) - set(RESAD_ROWS))
    if unknown:
        msg = f"Unknown baseline(s) {unknown}; available: {[*RESAD_ROWS, *BASELINES]}."
        raise ResADConfigurationError(msg)
    if split not in SPLITS:
        msg = f"split must be one of {list(SPLITS)}, got {split!r}."
        raise ResADConfigurationError(msg)
    sources, targets = _with_root(sources, source_root), _with_root(targets, target_root)
    # an impossible run is refused before it writes anything or trains
    seed_everything(seed, workers=True)
    datamodule = MultiClassDataModule(
        sources=sources,
        targets=targets,
        include_test=include_test,
        allow_overlap=allow_overlap,
        train_batch_size=batch_size,
        eval_batch_size=batch_size,
        num_workers=num_workers,
        seed=seed,
        name="protocol",
    )
    categories = datamodule.target_categories if split == "targets" else datamodule.source_categories
    check_before_training(datamodule, categories, shots, reference_dirs)
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    check_run_config(
        output / "run_config.json",
        {
            "sources": sources,
            "targets": targets,
            "model": model or {},
            "trainer": trainer or {},
            "checkpoint": checkpoint,
            "seed": seed,
            "reference_dirs": reference_dirs or {},
            "allow_overlap": allow_overlap,
            "include_test": include_test,
            "batch_size": batch_size,
            "baseline_layers": list(baseline_layers) if baseline_layers else None,
            "baseline_weights": baseline_weights or {},
            "split": split,
        },
        resume=resume,
    )
    results = CsvStore(output / "results.csv", CELL_KEYS, resume=resume)
    # every image's score (ResAD's in units of the class's threshold): verdict rules can be studied without rescoring
    image_scores = CsvStore(output / "image_scores.csv", (*CELL_KEYS, "image"), resume=resume)
    costs = CsvStore(output / "cost.csv", COST_KEYS, resume=resume)
    resad, checkpoint, train_s = _trained_resad(datamodule, output, model, trainer, checkpoint, resume)

    evaluated = {"ResAD": _Evaluated(resad, resad.set_references)}
    for name, scoring in RESAD_ROWS.items():
        if name in baselines:  # the same module and banks, scored another way
            evaluated[name] = _Evaluated(resad, resad.set_references, scoring=scoring)

    def patchcore(with_views: bool = False) -> FewShotPatchcore:
        pre_trained = (model or {}).get("pre_trained", True)
        return patchcore_baseline(resad, pre_trained, baseline_layers, with_views=with_views)

    built, skipped = build_baselines([name for name in baselines if name in BASELINES], patchcore, baseline_weights)
    for name, baseline in built.items():
        baseline.model.to(resad.device)
        evaluated[name] = _Evaluated(baseline.model, baseline.set_references)

    test_samples = datamodule.target_samples if split == "targets" else datamodule.validation_samples
    resad.references.set_pools({name: datamodule.reference_pool(name) for name in categories})
    cells = [
        (category, k, draw)
        for category in categories
        for k in shots
        for draw in range(1 if reference_dirs and category in reference_dirs else draws)
    ]
    progress = Progress(
        len(cells) * len(evaluated),
        sum(results.done(name, *cell) for cell in cells for name in evaluated),
    )
    for category, k, draw in cells:
        pending = [name for name in evaluated if not results.done(name, category, k, draw)]
        # a (model, k) without its cost gets it here even where its cells are finished: a grid run with
        # `cost: false` on a busy machine can be given its cost columns later, alone, without rescoring anything
        unmeasured = [name for name in evaluated if cost and not costs.done(name, k)]
        if not pending and not unmeasured:
            continue
        samples = test_samples[test_samples[CATEGORY_COLUMN] == category]
        folder = reference_dirs.get(category) if reference_dirs else None
        selection = resad.references.select(category, k, seed + draw, folder=folder)
        selection.save(output / "references" / category / f"k{k}_draw{draw}.json")
        # the rows scoring one module (ResAD and its own `nearest` / `flows`) share one pass over the images: each
        # row's scores are those it would get alone
        for group in _module_groups(evaluated, [name for name in evaluated if name in pending or name in unmeasured]):
            fit_s = {}
            for name in group:  # each row timed as it takes the references (a bank made once is cached by paths)
                fit_start = time.perf_counter()
                evaluated[name].set_references(selection)
                fit_s[name] = time.perf_counter() - fit_start
            scored = _score_rows(evaluated, [name for name in group if name in pending], samples, batch_size)
            for name in group:
                entry = evaluated[name]
                if name not in pending:  # finished cell: its references are set for the cost alone
                    logger.info("%s k=%d: cells finished, measuring its cost (%s, draw %d)", name, k, category, draw)
                    _measure_cost(entry, name, category, k, costs, cost_repeats, openvino_cost)
                    continue
                scores = scored[name]
                metrics = category_metrics(scores)
                image_scores.add_all(
                    {"model": name, "category": category, "k": k, "draw": draw, "image": path, "label": int(label),
                     "score": float(value)}
                    for path, label, value in zip(scores.paths, scores.labels.tolist(), scores.pred_scores.tolist(),
                                                  strict=True)
                )  # fmt: skip
                if draw == 0 and maps_per_category:
                    save_anomaly_maps(scores, output / "anomaly_maps" / name / category / f"k{k}", maps_per_category)
                row = {
                    "model": name,
                    "domain": datamodule.domain_of(category),
                    "category": category,
                    "k": k,
                    "draw": draw,
                    "seed": selection.seed,
                }
                if isinstance(entry.module, ResAD):  # which matching the class's references chose
                    row["averaged"] = float(entry.module.model.anomaly_map_generator.stored.averaging)
                results.add({**row, "fit_s": fit_s[name], **metrics})
                if name in unmeasured:  # once per model and k, with this class's bank
                    _measure_cost(entry, name, category, k, costs, cost_repeats, openvino_cost)
                progress.finished(
                    f"{name} {category} k={k} draw {draw}: image AUROC {metrics['image_AUROC']:.3f}, "
                    f"pixel AUROC {metrics['pixel_AUROC']:.3f}",
                )

    table = results.frame()
    summary = _with_cost(_summarize(table), table, costs.frame(), train_s, list(skipped), shots)
    summary.to_csv(output / "summary.csv", index=False)
    markdown = summary_markdown(summary)
    costs_markdown = cost_markdown(summary)
    (output / "summary.md").write_text(markdown + ("\n" + costs_markdown if costs_markdown else ""))
    plot = plot_auroc_vs_k(summary, output / "auroc_vs_k.png")
    print(markdown)
    if costs_markdown:
        print(costs_markdown)
    print(f"checkpoint: {checkpoint}\nresults: {output}  ({time.perf_counter() - start:.0f} s)")
    if plot is not None:
        print(f"plot: {plot}")
    return summary


def check_before_training(
    datamodule: MultiClassDataModule,
    categories: Sequence[str],
    shots: Sequence[int],
    reference_dirs: dict[str, str] | None = None,
) -> None:
    """Check what would otherwise fail hours later, before anything is trained.

    Every dataset root must exist (anomalib would otherwise try to download its dataset into a mistyped path and
    create the folder), every category must be readable, and every evaluated category must have ``max(shots)`` normal
    images to draw references from (or that many in its reference folder); k must be at least 2.

    Raises:
        ResADConfigurationError: A missing root or an impossible k, named with the fix.
    """
    for entry in [*datamodule.sources, *datamodule.targets]:
        root = entry.arguments.get("root")
        if root is not None and not Path(root).is_dir():
            msg = (
                f"Dataset root '{root}' ({entry.datamodule}, categories {entry.categories}) does not exist. Fix the "
                "path (source_root / target_root, or 'root' in the config); a dataset anomalib can download must be "
                "downloaded there first."
            )
            raise ResADConfigurationError(msg)
    if min(shots) < 2:
        msg = f"shots {list(shots)}: each class's threshold is set from its k references by leave-one-out, k >= 2."
        raise ResADConfigurationError(msg)
    datamodule.setup()
    short = []
    for category in categories:
        folder = (reference_dirs or {}).get(category)
        available = len(list_folder_images(folder)) if folder else len(datamodule.reference_pool(category))
        if available < max(shots):
            short.append(f"{category} ({available})")
    if short:
        msg = (
            f"shots {list(shots)} need {max(shots)} normal reference images per class; these have fewer: "
            f"{', '.join(short)}. Lower shots or give more normal training images."
        )
        raise ResADConfigurationError(msg)


def patchcore_baseline(
    resad: ResAD,
    pre_trained: bool | str | Path = True,
    layers: Sequence[str] | None = None,
    with_views: bool = False,
) -> FewShotPatchcore:
    """PatchCore with ResAD's backbone, weights and input size (levels: ``layers``, else ResAD's two deepest).

    ``with_views``: its memory bank also holds the flipped and rotated views ResAD's evaluation banks hold (on every
    PatchCore level: with the default levels, the two that hold them in ResAD's banks).

    Example:
        >>> baseline = patchcore_baseline(resad, with_views=True)  # doctest: +SKIP
        >>> baseline.reference_views  # doctest: +SKIP
        'dihedral'
    """
    extractor = resad.model.feature_extractor
    size = tuple(int(value) for value in resad.input_size) if resad.input_size is not None else (224, 224)
    return FewShotPatchcore(
        backbone=extractor.backbone,
        layers=list(layers or extractor.layers[-2:]),
        pre_trained=pre_trained,
        image_size=size[0],
        reference_views=views_mode(size) if with_views else "none",
    )


def scoring_overrides(model: dict[str, Any] | None) -> dict[str, Any]:
    """The scoring options of a ``model`` section that apply to a given trained checkpoint.

    A checkpoint fixes the architecture and the training; how it scores (:data:`SCORING_OPTIONS`) can be compared on
    the very same trained model, e.g. ``--model.scoring nearest``. The other keys of ``model`` (the setting's training
    recipe) are the checkpoint's own business and ignored.

    Example:
        >>> scoring_overrides({"backbone": "resnet18", "sensitivity": 0.5})
        {'sensitivity': 0.5}
    """
    overrides = {key: value for key, value in (model or {}).items() if key in SCORING_OPTIONS}
    if overrides:
        logger.warning("Scoring the checkpoint with %s", overrides)
    return overrides


def apply_scoring_options(resad: ResAD, options: dict[str, Any]) -> ResAD:
    """Set scoring options (``scoring``, ``sensitivity``) on a loaded model; they apply to every class."""
    generator = resad.model.anomaly_map_generator
    for name, given in options.items():
        if name not in SCORING_OPTIONS:
            msg = f"{name} is not a scoring option of ResAD; those are {list(SCORING_OPTIONS)}."
            raise ResADConfigurationError(msg)
        if name == "scoring":
            check_choice("scoring", given, SCORINGS)
        value = given if name == "scoring" else check_sensitivity(given)
        setattr(generator, name, value)
        resad.hparams[name] = value
    return resad


def _trained_resad(
    datamodule: MultiClassDataModule,
    output: Path,
    model: dict[str, Any] | None,
    trainer: dict[str, Any] | None,
    checkpoint: str | None,
    resume: bool,
) -> tuple[ResAD, str | None, float]:
    """ResAD from ``checkpoint``, from this output folder's finished training (on resume), or trained now.

    Returns:
        tuple[ResAD, str | None, float]: The model, its checkpoint and the training time in seconds (NaN when
        the model came from a given checkpoint).
    """
    record = output / "train" / "trained.json"
    if not checkpoint and resume and record.is_file():
        trained = json.loads(record.read_text())
        if trained.get("checkpoint") and Path(trained["checkpoint"]).is_file():
            logger.info("Reusing the finished training of this output folder: %s", trained["checkpoint"])
            datamodule.setup()
            resad = ResAD.load_from_checkpoint(trained["checkpoint"], map_location="cpu")
            resad = apply_scoring_options(resad, scoring_overrides(model))
            return resad, trained["checkpoint"], float(trained.get("train_s", math.nan))
    if checkpoint:
        datamodule.setup()
        overrides = scoring_overrides(model)
        resad = apply_scoring_options(ResAD.load_from_checkpoint(checkpoint, map_location="cpu"), overrides)
        return resad, checkpoint, math.nan
    start = time.perf_counter()
    resad = ResAD(**(model or {}))
    trainer = dict(trainer or {})
    if not sys.stderr.isatty():  # a log file: one line per epoch instead of a progress bar redrawn in place
        trainer.setdefault("enable_progress_bar", False)
        trainer["callbacks"] = [*trainer.get("callbacks", []), EpochProgress()]
    engine = Engine(default_root_dir=output / "train", logger=False, **trainer)
    engine.fit(resad, datamodule=datamodule)
    train_s = time.perf_counter() - start
    callback = engine.trainer.checkpoint_callback
    checkpoint = callback.best_model_path if callback is not None else None
    logger.info("Trained in %.0f s; checkpoint %s", train_s, checkpoint)
    if checkpoint:  # written last: only a finished training is reused
        record.write_text(json.dumps({"checkpoint": str(checkpoint), "train_s": train_s}, indent=2) + "\n")
    return resad, checkpoint, train_s
