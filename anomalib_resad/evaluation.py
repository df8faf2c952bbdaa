# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""Score one category's test images with any anomalib model and compute threshold-free metrics per category.

Used by ``resad demo``, the class-generalization protocol (:mod:`anomalib_resad.experiments.protocol`) and the PatchCore
baseline, so every model is measured by the same code on the same images:

* images go through the model's own pre-processing (``pre_processor.transform``) and ``model.model`` (the pure torch
  model, eval mode) - no post-processing, so the metrics see raw scores;
* metrics are anomalib's ``AUROC`` (image and pixel), ``AUPRO`` (pixel, FPR limit 0.3) and ``F1Max`` (image),
  computed per category. They depend only on the ranking of scores, so scores are min-max rescaled per category
  first: torchmetrics would otherwise pass values outside [0, 1] through a sigmoid, which saturates (anomalib #3407).
  Scoring itself never sees test-set statistics.

Example:
    >>> scores = score_samples(model, test_samples)  # doctest: +SKIP
    >>> category_metrics(scores)  # doctest: +SKIP
    {'image_AUROC': 0.98, 'pixel_AUROC': 0.97, 'pixel_AUPRO': 0.91, 'image_F1Max': 0.95}
"""

import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import torch
from anomalib.data import ImageItem, InferenceBatch
from anomalib.data.transforms.utils import extract_transforms_by_type
from anomalib.metrics import AUPRO, AUROC, F1Max
from anomalib.models.components import AnomalibModule
from anomalib.visualization.image.item_visualizer import visualize_image_item
from torch.utils.data import DataLoader
from torchmetrics.functional.classification import binary_precision_recall_curve, binary_roc
from torchvision.transforms.v2 import Resize

from .data.multi_class import MultiClassDataset
from .images import read_rgb
from .post_processor import CalibratedPostProcessor

logger = logging.getLogger(__name__)

METRIC_NAMES = ("image_AUROC", "pixel_AUROC", "pixel_AUPRO", "image_F1Max")
# The model's own verdicts (``pred_label``) on the category's test images: NaN for a model without a per-class
# threshold (few-shot PatchCore has none: its labels come from a threshold nobody set for the class).
VERDICT_NAMES = ("normal_FPR", "anomalous_recall")
# What the best possible threshold would give, chosen on the test labels (a ceiling for any threshold rule that sees
# normal images only, and the yardstick): the F1-max threshold's recall and false-positive rate, and the
# highest recall of any threshold that flags at most ``ORACLE_FPR`` of the normal images.
ORACLE_FPR = 0.1
ORACLE_NAMES = ("oracle_F1_recall", "oracle_F1_FPR", "oracle_recall_at_FPR10")


@dataclass
class CategoryScores:
    """Raw predictions and ground truth of one category's test images.

    Attributes:
        paths (list[str]): Image files.
        pred_scores (torch.Tensor): ``(N,)`` image scores.
        anomaly_maps (torch.Tensor): ``(N, H, W)`` anomaly maps.
        labels (torch.Tensor): ``(N,)`` 0 normal / 1 anomalous.
        masks (torch.Tensor | None): ``(N, H, W)`` ground-truth masks, ``None`` without pixel annotations.
        pred_labels (torch.Tensor | None): ``(N,)`` the model's own verdicts, ``None`` when it gives none.
    """

    paths: list[str]
    pred_scores: torch.Tensor
    anomaly_maps: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor | None
    pred_labels: torch.Tensor | None = None


def _resize_of(model: AnomalibModule) -> Resize | None:
    transform = model.pre_processor.transform if model.pre_processor is not None else None
    resizes = extract_transforms_by_type(transform, Resize) if transform is not None else []
    return resizes[0] if resizes else None


@torch.no_grad()
def score_samples(
    model: AnomalibModule,
    samples: pd.DataFrame,
    batch_size: int = 8,
    num_workers: int = 0,
) -> CategoryScores:
    """Score images (an anomalib sample table) with ``model``'s pre-processing and torch model.

    Args:
        model (AnomalibModule): Any anomalib model, references / memory bank already set.
        samples (pd.DataFrame): Sample table (``image_path``, ``label_index``, ``mask_path``, ``split``).
        batch_size (int): Defaults to ``8``.
        num_workers (int): Data loader workers. Defaults to ``0``.

    Returns:
        CategoryScores: Raw scores and maps with the ground truth, at the model's input resolution.
    """
    return _score(model, samples, lambda images: {"": model.model(images)}, batch_size, num_workers)[""]


@torch.no_grad()
def score_samples_scorings(
    model: AnomalibModule,
    samples: pd.DataFrame,
    scorings: Sequence[str],
    batch_size: int = 8,
    num_workers: int = 0,
) -> dict[str, CategoryScores]:
    """:func:`score_samples` for a ResAD model under several scorings, from one pass over the images.

    Each image goes through the backbone and the matching once
    (:meth:`~anomalib_resad.torch_model.ResADModel.forward_scorings`); the scores equal those of
    :func:`score_samples` with the model's ``scoring`` set to each name in turn.

    Args:
        model (AnomalibModule): A ResAD module, references set.
        samples (pd.DataFrame): Sample table.
        scorings (Sequence[str]): Scoring names (``"fused"``, ``"nearest"``, ``"paper"``).
        batch_size (int): Defaults to ``8``.
        num_workers (int): Data loader workers. Defaults to ``0``.

    Returns:
        dict[str, CategoryScores]: Scoring name -> that scoring's raw scores and maps with the ground truth.
    """
    return _score(
        model, samples, lambda images: model.model.forward_scorings(images, scorings), batch_size, num_workers
    )


def _score(
    model: AnomalibModule,
    samples: pd.DataFrame,
    forward: Callable[[torch.Tensor], dict[str, InferenceBatch]],
    batch_size: int,
    num_workers: int,
) -> dict[str, CategoryScores]:
    """``forward`` (name -> output) over the samples' pre-processed batches: one :class:`CategoryScores` per name."""
    has_masks = bool(samples.mask_path.astype(str).str.len().gt(0).any())
    dataset = MultiClassDataset(samples, "segmentation" if has_masks else "classification", _resize_of(model))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=dataset.collate_fn)
    was_training = model.training
    model.eval()
    transform = model.pre_processor.transform if model.pre_processor is not None else None
    paths, labels, masks = [], [], []
    scores, maps, verdicts = defaultdict(list), defaultdict(list), defaultdict(list)
    for batch in loader:
        images, gt_masks = batch.image.to(model.device), batch.gt_mask
        if transform is not None:
            images, gt_masks = transform(images, gt_masks)
        outputs = forward(images)
        paths.extend(str(path) for path in batch.image_path)
        labels.append(batch.gt_label.reshape(-1).cpu())
        for name, output in outputs.items():
            anomaly_map = output.anomaly_map.reshape(len(images), *output.anomaly_map.shape[-2:])
            scores[name].append(output.pred_score.reshape(-1).float().cpu())
            maps[name].append(anomaly_map.float().cpu())
            if isinstance(model.post_processor, CalibratedPostProcessor):  # the class's own threshold, as deployed
                verdicts[name].append(model.post_processor(output).pred_label.reshape(-1).bool().cpu())
        if has_masks:
            masks.append(gt_masks.reshape(len(images), *gt_masks.shape[-2:]).cpu().bool())
    model.train(was_training)
    return {
        name: CategoryScores(
            paths=paths,
            pred_scores=torch.cat(scores[name]),
            anomaly_maps=torch.cat(maps[name]),
            labels=torch.cat(labels).long(),
            masks=torch.cat(masks) if masks else None,
            pred_labels=torch.cat(verdicts[name]) if verdicts[name] else None,
        )
        for name in scores
    }


def _rescale(values: torch.Tensor) -> torch.Tensor:
    low, high = values.min(), values.max()
    return (values - low) / (high - low) if high > low else torch.zeros_like(values)


def oracle_verdicts(pred_scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Verdict rates of thresholds chosen on the test labels: the most any threshold rule could reach.

    Args:
        pred_scores (torch.Tensor): ``(N,)`` image scores (any scale; only their order matters).
        labels (torch.Tensor): ``(N,)`` 0 normal / 1 anomalous, both present.

    Returns:
        dict[str, float]: ``oracle_F1_recall`` / ``oracle_F1_FPR`` at the F1-max threshold (anomalib's ``F1Max``
        picks the same one), and ``oracle_recall_at_FPR10``: the highest recall among thresholds that flag at most
        :data:`ORACLE_FPR` of the normal images.

    Example:
        >>> oracle_verdicts(torch.tensor([0.1, 0.2, 0.3, 0.9]), torch.tensor([0, 0, 1, 1]))["oracle_F1_recall"]
        1.0
    """
    # rescaled to [0, 1] first: torchmetrics passes scores outside [0, 1] through a sigmoid (see the module docstring)
    scores, targets = _rescale(pred_scores.double()), labels.long()
    precision, recall, thresholds = binary_precision_recall_curve(scores, targets)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    threshold = thresholds[f1[:-1].argmax()]  # the last point (recall 0) has no threshold
    false_positive_rate, true_positive_rate, _ = binary_roc(scores, targets)
    return {
        "oracle_F1_recall": float((scores[targets == 1] >= threshold).double().mean()),
        "oracle_F1_FPR": float((scores[targets == 0] >= threshold).double().mean()),
        "oracle_recall_at_FPR10": float(true_positive_rate[false_positive_rate <= ORACLE_FPR + 1e-9].max()),
    }


def category_metrics(scores: CategoryScores) -> dict[str, float]:
    """Image AUROC and F1-max, pixel AUROC and AUPRO, the model's own verdict rates and the oracle's (NaN: undefined).

    Args:
        scores (CategoryScores): Predictions and ground truth.

    Returns:
        dict[str, float]: Metric name -> value, names as in :data:`METRIC_NAMES`, :data:`VERDICT_NAMES` and
        :data:`ORACLE_NAMES` (``normal_FPR``: share of normal images flagged, ``anomalous_recall``: share of
        anomalous ones flagged; the oracle's as in :func:`oracle_verdicts`).
    """
    results = dict.fromkeys(METRIC_NAMES + VERDICT_NAMES + ORACLE_NAMES, float("nan"))
    labels = scores.labels
    if scores.pred_labels is not None:
        for name, wanted in (("normal_FPR", 0), ("anomalous_recall", 1)):
            if (labels == wanted).any():
                results[name] = float(scores.pred_labels[labels == wanted].float().mean())
    if labels.min() == labels.max():
        logger.warning("Image metrics need normal and anomalous images; this category has one kind only.")
    else:
        batch = SimpleNamespace(pred_score=_rescale(scores.pred_scores), gt_label=labels)
        for name, metric in (("image_AUROC", AUROC), ("image_F1Max", F1Max)):
            instance = metric(fields=["pred_score", "gt_label"])
            instance.update(batch)
            results[name] = float(instance.compute())
        results.update(oracle_verdicts(scores.pred_scores, labels))
    if scores.masks is not None and scores.masks.any():
        batch = SimpleNamespace(anomaly_map=_rescale(scores.anomaly_maps), gt_mask=scores.masks.int())
        for name, metric in (("pixel_AUROC", AUROC), ("pixel_AUPRO", AUPRO)):
            instance = metric(fields=["anomaly_map", "gt_mask"])
            instance.update(batch)
            results[name] = float(instance.compute())
    return results


def save_anomaly_maps(
    scores: CategoryScores,
    output_dir: str | Path,
    max_images: int | None = 12,
) -> list[Path]:
    """Write anomaly-map images with anomalib's visualiser: image, ground truth and anomaly-map overlay.

    Maps are rescaled by the category's own range for display. Anomalous images come first.

    Args:
        scores (CategoryScores): Predictions of one category.
        output_dir (str | Path): Folder to write PNG files into.
        max_images (int | None): Images to write (``None``: all). Defaults to ``12``.

    Returns:
        list[Path]: Written files.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    maps = _rescale(scores.anomaly_maps)
    order = sorted(range(len(scores.paths)), key=lambda index: (-int(scores.labels[index]), scores.paths[index]))
    written = []
    for index in order[:max_images]:
        image = read_rgb(scores.paths[index])
        image = Resize(maps.shape[-2:], antialias=True)(image)
        item = ImageItem(
            image=image,
            gt_mask=scores.masks[index] if scores.masks is not None else None,
            anomaly_map=maps[index],
            pred_score=_rescale(scores.pred_scores)[index],
        )
        fields = ["image", "gt_mask"] if scores.masks is not None else ["image"]
        picture = visualize_image_item(item, fields=fields, overlay_fields=[("image", ["anomaly_map"])])
        if picture is None:
            continue
        label = "anomalous" if int(scores.labels[index]) else "normal"
        path = output_dir / f"{label}_{Path(scores.paths[index]).parent.name}_{Path(scores.paths[index]).stem}.png"
        picture.save(path)
        written.append(path)
    return written
