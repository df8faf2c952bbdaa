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


def brute_force_oracle(scores: torch.Tensor, labels: torch.Tensor) -> tuple[float, float, float]:
    """Every distinct score as threshold: (recall, FPR) of the F1-max one, best recall with FPR <= 10 %."""
    best_f1, f1_rates, best_recall = -1.0, (0.0, 0.0), 0.0
    for threshold in torch.unique(scores).tolist():
        flagged = scores >= threshold
        recall = flagged[labels == 1].double().mean().item()
        fpr = flagged[labels == 0].double().mean().item()
        precision = (flagged & (labels == 1)).sum().item() / flagged.sum().item()
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        if f1 > best_f1:
            best_f1, f1_rates = f1, (recall, fpr)
        if fpr <= 0.1:
            best_recall = max(best_recall, recall)
    return (*f1_rates, best_recall)


def test_oracle_verdicts_equal_a_brute_force_search_over_thresholds() -> None:
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        labels = torch.cat([torch.zeros(40), torch.ones(25)]).long()
        # overlapping classes, with ties: no threshold separates them
        scores = (torch.randn(65, generator=generator) + 0.8 * labels).round(decimals=1)
        oracle = category_metrics(
            CategoryScores([str(i) for i in range(65)], scores, torch.zeros(65, 2, 2), labels, None),
        )
        recall, fpr, recall_at_fpr10 = brute_force_oracle(scores, labels)
        assert math.isclose(oracle["oracle_F1_recall"], recall, abs_tol=1e-6)
        assert math.isclose(oracle["oracle_F1_FPR"], fpr, abs_tol=1e-6)
        assert math.isclose(oracle["oracle_recall_at_FPR10"], recall_at_fpr10, abs_tol=1e-6)
        assert 0 < recall_at_fpr10 < 1  # the case is not trivial


def test_oracle_verdicts_are_nan_with_one_kind_of_image() -> None:
    metrics = category_metrics(scores_with([0, 0, 0], [False, False, True]))
    assert math.isnan(metrics["oracle_F1_recall"]) and math.isnan(metrics["oracle_recall_at_FPR10"])
