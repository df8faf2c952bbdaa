# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""A finished ``resad evaluate`` run's verdicts at this release's boundaries, without scoring its test images again.

Until format 8 a class's boundary was ``1.25 x`` its references' largest leave-one-out score, so a score of such a
run times 1.25 is the image's score in *relative* units (:func:`~anomalib_resad.calibration.relative_maps`: each map
over its own largest leave-one-out value). This script calibrates every (class, k, draw) cell's references again
with the run's checkpoint - the same model, the same k images - and flags an image where that relative score exceeds
the cell's boundary (:func:`~anomalib_resad.calibration.boundary`), for ResAD and its ``nearest`` and ``flows`` rows
(their boundaries: ``fused``, ``nearest``, ``paper``). Re-scoring a fold's target images takes hours on a CPU; this
takes one calibration per cell.

One approximation: a score the odd-frame check raised above 1 is read as a map's score. Such an image was flagged
and stays flagged (the check is unchanged); it is counted flagged here only where 1.25 x its score also passes the
boundary, so rates may come out a little low. ``--check <run of this release>`` compares with a run scored in full.

``--sensitivity`` and ``--floor`` (:data:`~anomalib_resad.calibration.BOUNDARY_FLOOR`) take candidate values: one
table each.

Prints per scoring and k the mean normal FPR, recall and ceiling over domains (the ceiling: the best recall any
threshold with FPR <= 10 % gets, as ``resad evaluate`` reports it), how many domains reach 60 % of their ceiling and
each domain's FPR / recall (%).

Example:
    python benchmarks/rescaled_verdicts.py --checkpoint model.ckpt --run results/fold1_targets
"""

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from verdict_boundaries import print_verdicts, run_domains  # the script beside this one

from anomalib_resad import ResAD
from anomalib_resad.calibration import BOUNDARY_FLOOR, SENSITIVITY, Scoring, boundary
from anomalib_resad.evaluation import oracle_verdicts
from anomalib_resad.references import ReferenceSelection

LEGACY_MARGIN = 1.25  # the boundary of the releases before format 8, in relative units of the references' largest
ROWS = {"ResAD": "fused", "nearest": "nearest", "flows": "paper"}  # run row -> the scoring whose boundary it gets
PLACES = ("fused_max", "fused_defects", "nearest_defects", "paper_defects")  # what of a record places the boundaries


def cell_places(model: ResAD, selection: ReferenceSelection) -> dict[str, float]:
    """The record fields that place a cell's boundaries, its references calibrated with ``model``."""
    model.set_references(selection)
    record = model.model.anomaly_map_generator.stored.get()
    return {name: float(getattr(record, name)) for name in PLACES}


def cell_boundaries(places: dict[str, float], sensitivity: float, floor: float) -> dict[str, float]:
    """Each scoring's boundary (relative units) from a cell's record fields."""
    record = replace(Scoring.neutral(1), **{name: torch.tensor(value) for name, value in places.items()})
    return {name: float(boundary(record, name, sensitivity, floor)) for name in ROWS.values()}


def verdicts(run: Path, boundaries: dict[tuple[str, int, int], dict[str, float]], legacy: bool) -> pd.DataFrame:
    """Per row, k and domain: mean FPR, recall and ceiling over the cells with a boundary.

    ``legacy``: the run's scores are in format-7 units (rescaled and compared with the cell's boundary); else they are
    this release's own (boundary 1).
    """
    scores = pd.read_csv(run / "image_scores.csv")
    domains = run_domains(run)
    rows = []
    for (model, category, k, draw), cell in scores[scores.model.isin(list(ROWS))].groupby(
        ["model", "category", "k", "draw"]
    ):
        if (category, k, draw) not in boundaries:
            continue
        limit = boundaries[(category, k, draw)][ROWS[model]] if legacy else 1.0
        relative = cell.score.to_numpy() * (LEGACY_MARGIN if legacy else 1.0)
        normal, anomalous = relative[cell.label.to_numpy() == 0], relative[cell.label.to_numpy() == 1]
        both = torch.tensor(np.concatenate([normal, anomalous]))
        labels = torch.tensor([0] * len(normal) + [1] * len(anomalous))
        rows.append({"model": model, "k": k, "domain": domains[category], "fpr": (normal > limit).mean(),
                     "recall": (anomalous > limit).mean(),
                     "ceiling": oracle_verdicts(both, labels)["oracle_recall_at_FPR10"]})  # fmt: skip
    return pd.DataFrame(rows).groupby(["model", "k", "domain"], sort=False).mean()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="the run's ResAD checkpoint")
    parser.add_argument("--run", required=True, type=Path, help="a resad evaluate output folder of a format-7 release")
    parser.add_argument("--sensitivity", type=float, nargs="+", default=[SENSITIVITY], help="one table each")
    parser.add_argument("--floor", type=float, nargs="+", default=[BOUNDARY_FLOOR], help="one table each")
    parser.add_argument("--check", type=Path, help="a run of this release on the same cells: its own verdicts too")
    parser.add_argument("--cache", type=Path, help="boundaries per cell (JSON lines; resumed). Default: in --run")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cache = args.cache or args.run / "boundary_places.jsonl"
    known = {}
    if cache.exists():
        for line in cache.read_text().splitlines():
            record = json.loads(line)
            known[(record["category"], record["k"], record["draw"])] = record["places"]
    model = ResAD.load_from_checkpoint(args.checkpoint, weights_only=True).eval()
    for path in sorted(args.run.glob("references/*/k*_draw*.json")):
        k, draw = (int(number) for number in path.stem.removeprefix("k").split("_draw"))  # k<k>_draw<draw>
        selection = ReferenceSelection.from_dict(json.loads(path.read_text()))
        key = (selection.class_name, k, draw)
        if key not in known:
            known[key] = cell_places(model, selection)
            with cache.open("a") as file:
                file.write(json.dumps({"category": key[0], "k": k, "draw": draw, "places": known[key]}) + "\n")
    for sensitivity in args.sensitivity:
        for floor in args.floor:
            boundaries = {key: cell_boundaries(places, sensitivity, floor) for key, places in known.items()}
            print(f"\n{args.run}: rescaled, sensitivity {sensitivity}, floor {floor}\n")
            print_verdicts(verdicts(args.run, boundaries, legacy=True), "model")
    if args.check:
        print(f"\n{args.check}: scored in full by this release\n")
        print_verdicts(verdicts(args.check, known, legacy=False), "model")


if __name__ == "__main__":
    main()
