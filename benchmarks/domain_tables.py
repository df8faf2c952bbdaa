# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""Per-domain tables of a finished (or partly finished) ``resad evaluate`` run, from its ``results.csv``.

Prints two markdown tables: image AUROC (pixel AUROC where masks exist) per model, domain and k, mean ± sample std
over the draws (a domain of several categories is averaged per draw first; the mean of domains likewise); and the
verdicts per model and k: normal FPR, anomalous recall and the ceiling (``oracle_recall_at_FPR10``), mean over the
draws per domain, then over the domains. Only finished rows count: a run stopped part-way gives its finished cells.

    python benchmarks/domain_tables.py results/fold2_targets
"""

import argparse

import pandas as pd

from anomalib_resad.experiments.protocol import _summarize  # the run's own aggregation (summary.csv), not a copy

MODELS = ("ResAD", "nearest", "flows", "PatchCore", "PatchCore+views")


def mean_std(row: pd.Series, name: str) -> str:
    """``mean ± sample std`` over draws of a summary row's metric, in percent (``-`` where not measured)."""
    if pd.isna(row[name]):
        return "-"
    std = row[f"{name}_std"]
    return f"{row[name] * 100:.1f}" + (f" ± {std * 100:.1f}" if pd.notna(std) else "")


def domain_rows(summary: pd.DataFrame, domains: list[str], categories: int) -> dict[str, str]:
    """Summary row label of each domain and of the mean over domains (one category per domain: the category's)."""
    if len(domains) < categories:
        return {**{domain: f"domain:{domain}" for domain in domains}, "mean": "domain mean"}
    return {**dict(zip(domains, summary.category.drop_duplicates(), strict=False)), "mean": "mean"}


def auroc_table(summary: pd.DataFrame, labels: dict[str, str], shots: list[int]) -> list[str]:
    """Image AUROC (mean pixel AUROC) per model and domain, k joined by ``/``, and the mean of domains."""
    domains = [name for name in labels if name != "mean"]
    lines = ["| model | " + " | ".join(domains) + " | mean of domains |", "|---" * (len(domains) + 2) + "|"]
    for model in MODELS:
        rows = summary[summary.model == model].set_index(["category", "k"])
        if rows.empty:
            continue
        cells = []
        for name, label in labels.items():
            parts = []
            for k in shots:
                row = rows.loc[(label, k)]
                pixel = row["pixel_AUROC"]
                shown = f" ({pixel * 100:.1f})" if pd.notna(pixel) and name != "mean" else ""
                parts.append(mean_std(row, "image_AUROC") + shown)
            cells.append(" / ".join(parts))
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return lines


def verdict_table(summary: pd.DataFrame, labels: dict[str, str], shots: list[int]) -> list[str]:
    """Normal FPR, recall and ceiling per model and k: the mean of domains, then each domain."""
    lines = [
        "| model | k | mean FPR | mean recall (ceiling) | each domain: FPR / recall / ceiling |",
        "|---|---|---|---|---|",
    ]
    columns = ["normal_FPR", "anomalous_recall", "oracle_recall_at_FPR10"]
    for model in MODELS:
        rows = summary[summary.model == model].set_index(["category", "k"])
        for k in shots:
            if rows.empty or pd.isna(rows.loc[(labels["mean"], k), "normal_FPR"]):
                continue
            each = ", ".join(
                f"{name} " + " / ".join(f"{rows.loc[(label, k), column] * 100:.0f}" for column in columns)
                for name, label in labels.items()
                if name != "mean"
            )
            fpr, recall, ceiling = (rows.loc[(labels["mean"], k), column] * 100 for column in columns)
            lines.append(f"| {model} | {k} | {fpr:.1f} | {recall:.1f} ({ceiling:.1f}) | {each} |")
    return lines


def main() -> None:
    """Print both tables of the run given on the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a `resad evaluate` output folder (holding results.csv)")
    results = pd.read_csv(f"{parser.parse_args().run}/results.csv")
    summary = _summarize(results)
    labels = domain_rows(summary, list(dict.fromkeys(results["domain"])), results["category"].nunique())
    shots = sorted(results["k"].unique().tolist())
    print("\n".join([*auroc_table(summary, labels, shots), "", *verdict_table(summary, labels, shots)]))


if __name__ == "__main__":
    main()
