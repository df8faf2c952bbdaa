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

MODELS = ("ResAD", "nearest", "flows", "PatchCore", "PatchCore+views")


def mean_std(values: pd.Series) -> str:
    """``mean ± sample std`` of fractions, in percent (the mean alone for one value, ``-`` for none)."""
    values = values.dropna() * 100
    if values.empty:
        return "-"
    return f"{values.mean():.1f} ± {values.std(ddof=1):.1f}" if len(values) > 1 else f"{values.mean():.1f}"


def auroc_table(per_draw: pd.DataFrame, domains: list[str], shots: list[int]) -> list[str]:
    """Image AUROC (mean pixel AUROC) per model and domain, k joined by ``/``, and the mean of domains."""
    lines = ["| model | " + " | ".join(domains) + " | mean of domains |", "|---" * (len(domains) + 2) + "|"]
    for model in MODELS:
        rows = per_draw[per_draw.model == model]
        if rows.empty:
            continue
        cells = []
        for domain in domains:
            parts = []
            for k in shots:
                cell = rows[(rows.domain == domain) & (rows.k == k)]
                pixel = cell["pixel_AUROC"].dropna()
                parts.append(mean_std(cell["image_AUROC"]) + (f" ({pixel.mean() * 100:.1f})" if len(pixel) else ""))
            cells.append(" / ".join(parts))
        means = [mean_std(rows[rows.k == k].groupby("draw")["image_AUROC"].mean()) for k in shots]
        lines.append(f"| {model} | " + " | ".join(cells) + " | " + " / ".join(means) + " |")
    return lines


def verdict_table(per_draw: pd.DataFrame, domains: list[str], shots: list[int]) -> list[str]:
    """Normal FPR, recall and ceiling per model and k: the mean of domains, then each domain."""
    lines = [
        "| model | k | mean FPR | mean recall (ceiling) | each domain: FPR / recall / ceiling |",
        "|---|---|---|---|---|",
    ]
    columns = ["normal_FPR", "anomalous_recall", "oracle_recall_at_FPR10"]
    for model in MODELS:
        for k in shots:
            rows = per_draw[(per_draw.model == model) & (per_draw.k == k)]
            if rows.empty or rows["normal_FPR"].isna().all():
                continue
            by_domain = rows.groupby("domain")[columns].mean().reindex(domains).dropna(how="all") * 100
            each = ", ".join(
                f"{domain} {fpr:.0f} / {recall:.0f} / {ceiling:.0f}"
                for domain, (fpr, recall, ceiling) in by_domain.iterrows()
            )
            fpr, recall, ceiling = by_domain.mean()
            lines.append(f"| {model} | {k} | {fpr:.1f} | {recall:.1f} ({ceiling:.1f}) | {each} |")
    return lines


def main() -> None:
    """Print both tables of the run given on the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a `resad evaluate` output folder (holding results.csv)")
    results = pd.read_csv(f"{parser.parse_args().run}/results.csv")
    domains = list(dict.fromkeys(results["domain"]))
    shots = sorted(results["k"].unique().tolist())
    per_draw = results.groupby(["model", "domain", "k", "draw"]).mean(numeric_only=True).reset_index()
    print("\n".join([*auroc_table(per_draw, domains, shots), "", *verdict_table(per_draw, domains, shots)]))


if __name__ == "__main__":
    main()
