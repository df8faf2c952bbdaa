# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""Per-category metrics, including the model's own verdict rates at its calibrated threshold."""

import math

import torch

from anomalib_resad.evaluation import CategoryScores, category_metrics


def scores_with(labels: list[int], verdicts: list[bool] | None) -> CategoryScores:
    count = len(labels)
    return CategoryScores(
        paths=[f"{index}.png" for index in range(count)],
        pred_scores=torch.linspace(0, 1, count),
        anomaly_maps=torch.zeros(count, 4, 4),
        labels=torch.tensor(labels),
        masks=None,
        pred_labels=None if verdicts is None else torch.tensor(verdicts),
    )


def test_verdict_rates_count_flagged_normal_and_anomalous_images_separately() -> None:
    # 4 normal images, one flagged; 3 anomalous, two flagged
    metrics = category_metrics(scores_with([0, 0, 0, 0, 1, 1, 1], [False, True, False, False, True, False, True]))
    assert metrics["normal_FPR"] == 0.25
    assert math.isclose(metrics["anomalous_recall"], 2 / 3, rel_tol=1e-6)
    assert metrics["image_AUROC"] > 0.5  # scores rise with the index: anomalous images rank last


def test_a_model_without_its_own_threshold_has_no_verdict_rates() -> None:
    metrics = category_metrics(scores_with([0, 1], None))
    assert math.isnan(metrics["normal_FPR"]) and math.isnan(metrics["anomalous_recall"])
