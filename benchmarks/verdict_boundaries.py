# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""Per-class verdict boundaries from a class's own references, applied to a finished ``resad evaluate`` run.

The shipped boundary (1.0 in the image score's units) is the *midway* rule with a = 1 - ``sensitivity``, never
below ``BOUNDARY_FLOOR`` x the largest reference score (its study: ``rescaled_verdicts.py --floor``); until
format 8 it was 1.25 x the largest leave-one-out score of the k references (the study that chose the midway rule
ran on such a run: docs/runs/shared_domains_fold1_verdict_boundaries.md). This script measures, for every (class,
k, draw) cell of a run, what else the references can tell about a class's boundary - each reference scored against
the others (k values), its flipped and rotated views (k x views - 1) and its synthetic defects (k x 12,
:func:`~anomalib_resad.synthetic_defects.synthetic_defects`), all leave-one-out and in the image score's units - and
applies candidate boundaries to the run's ``image_scores.csv``.
Below 1 the verdict at a boundary ``b`` is exactly ``score > b`` (the odd-frame check only raises scores above 1);
above 1 the score is read as the map's score, an approximation for boundaries above 1.

Prints, per candidate and k, the mean normal FPR and anomalous recall over domains, the domains whose recall reaches
60 % of the best recall any threshold with FPR <= 10 % gets (issue 32's target), and each domain's FPR and recall.

Example:
    python benchmarks/verdict_boundaries.py --checkpoint demo/model.ckpt --run results/verdicts
"""

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from anomalib_resad import ResAD
from anomalib_resad.calibration import leave_one_out_banks
from anomalib_resad.evaluation import oracle_verdicts
from anomalib_resad.feature_converter import flatten_levels
from anomalib_resad.reference_views import reference_views, views_mode
from anomalib_resad.references import ReferenceSelection, load_images
from anomalib_resad.synthetic_defects import synthetic_defects


def reference_statistics(model: ResAD, selection: ReferenceSelection) -> dict[str, list[float]]:
    """The class's references, their views and their synthetic defects, each scored against the other references."""
    model.set_references(selection)
    net = model.model
    scoring = net.anomaly_map_generator.stored.get()
    images = load_images(selection.paths, model.pre_processor.transform)
    size = images.shape[-2:]
    views = reference_views(images, views_mode(size))
    per_image = views.shape[0] // images.shape[0]
    defects = synthetic_defects(images)
    normal, turned, defective = [], [], []
    with torch.no_grad():
        for index, _, others in leave_one_out_banks(net.bank_features(images), net.bank_views(size)):
            batch = torch.cat([views[index * per_image : (index + 1) * per_image], defects[index]])
            scores = net(batch, reference_bank=flatten_levels(others), scoring=scoring).pred_score.tolist()
            normal.append(scores[0])
            turned += scores[1:per_image]
            defective += scores[per_image:]
    return {"normal": normal, "views": turned, "defects": defective}


def boundaries(stats: dict[str, list[float]]) -> dict[str, float]:
    """Candidate boundaries of one cell, in the image score's units (the shipped one is 1)."""
    normal, defects = np.array(stats["normal"]), np.array(stats["defects"])
    with_views = np.concatenate([normal, stats["views"]])
    candidates = {
        "shipped (1.0)": 1.0,
        "views max x 1.0": float(with_views.max()),
        "mean + 3 std (views)": float(with_views.mean() + 3 * with_views.std(ddof=1)),
        "mean + 4 std (views)": float(with_views.mean() + 4 * with_views.std(ddof=1)),
    }
    # "midway": a fraction a of the way from the largest normal leave-one-out score to the synthetic defects' median
    for a in (0.5, 0.55, 0.6, 0.65, 0.7):
        candidates[f"midway, a = {a}"] = float(normal.max() + a * (np.median(defects) - normal.max()))
        candidates[f"midway +views, a = {a}"] = float(with_views.max() + a * (np.median(defects) - with_views.max()))
    return candidates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="the run's ResAD checkpoint")
    parser.add_argument("--run", required=True, type=Path, help="a resad evaluate output folder")
    parser.add_argument("--cache", type=Path, help="statistics per cell (JSON lines; resumed). Default: in --run")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip_domains", nargs="*", default=[], help="domains left out of the table")
    parser.add_argument("--shots", type=int, nargs="*", help="score these k only (default: every k of the run)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cache = args.cache or args.run / "verdict_boundaries.jsonl"
    known = (
        {json.loads(line)["cell"]: json.loads(line) for line in cache.read_text().splitlines()}
        if cache.exists()
        else {}
    )
    model = ResAD.load_from_checkpoint(args.checkpoint, weights_only=True).eval()
    for path in sorted(args.run.glob("references/*/k*_draw*.json")):
        cell = f"{path.parent.name}/{path.stem}"
        k, draw = (int(number) for number in path.stem.removeprefix("k").split("_draw"))  # k<k>_draw<draw>
        if cell not in known and (not args.shots or k in args.shots):
            selection = ReferenceSelection.from_dict(json.loads(path.read_text()))
            record = {"cell": cell, "category": selection.class_name, "k": k, "draw": draw,
                      **reference_statistics(model, selection)}  # fmt: skip
            known[cell] = record
            with cache.open("a") as file:
                file.write(json.dumps(record) + "\n")
    table(args.run, known.values(), args.skip_domains)


def table(run: Path, records: object, skip_domains: list[str]) -> None:
    """Print the candidates' verdicts per domain (the entries the run scored name each category's domain)."""
    scores = pd.read_csv(run / "image_scores.csv")
    scores = scores[scores.model == "ResAD"]  # a run's baselines score in other units
    domains = run_domains(run)
    stats = {(record["category"], record["k"], record["draw"]): record for record in records}
    rows = []
    for (category, k, draw), cell in scores.groupby(["category", "k", "draw"]):
        if (category, k, draw) not in stats or domains[category] in skip_domains:
            continue
        normal, anomalous = cell[cell.label == 0].score.to_numpy(), cell[cell.label == 1].score.to_numpy()
        both = torch.tensor(np.concatenate([normal, anomalous]))
        labels = torch.tensor([0] * len(normal) + [1] * len(anomalous))
        best = oracle_verdicts(both, labels)["oracle_recall_at_FPR10"]  # the same ceiling resad evaluate reports
        for rule, boundary in boundaries(stats[(category, k, draw)]).items():
            rows.append({"rule": rule, "k": k, "domain": domains[category], "fpr": (normal > boundary).mean(),
                         "recall": (anomalous > boundary).mean(), "ceiling": best})  # fmt: skip
    print_verdicts(pd.DataFrame(rows).groupby(["rule", "k", "domain"], sort=False).mean(), "boundary")


def run_domains(run: Path) -> dict[str, str]:
    """Category -> domain of the entries a ``resad evaluate`` run scored (its sources on source validation)."""
    config = json.loads((run / "run_config.json").read_text())
    scored = config["sources"] if config.get("split") == "source_validation" else config["targets"]
    return {name: entry.get("domain") or name for entry in scored for name in entry["categories"]}


def print_verdicts(per_domain: pd.DataFrame, first: str) -> None:
    """One line per (``first``, k) of a ``(first, k, domain)``-indexed frame of ``fpr``, ``recall``, ``ceiling``."""
    print(f"| {first} | k | mean FPR | mean recall (ceiling) | domains >= 60 % of ceiling | each domain: FPR, recall |")
    print("|---|---|---|---|---|---|")
    for (name, k), domain_rows in per_domain.groupby(level=[0, 1], sort=False):
        values = domain_rows.droplevel([0, 1])
        reached = int((values.recall >= 0.6 * values.ceiling).sum())
        each = ", ".join(f"{domain} {100 * row.fpr:.0f} / {100 * row.recall:.0f}" for domain, row in values.iterrows())
        print(f"| {name} | {k} | {100 * values.fpr.mean():.1f} | {100 * values.recall.mean():.1f} "
              f"({100 * values.ceiling.mean():.1f}) | {reached} of {len(values)} | {each} |")  # fmt: skip


if __name__ == "__main__":
    main()
