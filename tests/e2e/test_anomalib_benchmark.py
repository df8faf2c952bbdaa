# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""`anomalib benchmark` with the shipped ResAD + PatchCore grid (configs/benchmark/), on tiny generated data."""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from anomalib.models import get_model
from anomalib.pipelines.components.utils import get_iterator_from_grid_dict

from tests.conftest import REPO_ROOT

CONFIG = REPO_ROOT / "configs" / "benchmark" / "resad_patchcore_mvtec.yaml"
ANOMALIB = Path(sys.executable).parent / "anomalib"


def shipped_config() -> dict:
    return yaml.safe_load(CONFIG.read_text())


def test_every_model_of_the_grid_has_the_same_keys_and_is_found_by_get_model() -> None:
    """anomalib 2.7 collects the results table from the first job's keys: other keys fail the whole run."""
    models = shipped_config()["benchmark"]["model"]["grid"]
    assert [model["class_path"] for model in models] == ["ResAD", "Patchcore"]
    assert len({tuple(sorted(model["init_args"])) for model in models}) == 1
    for model in models:  # the bare name resolves the way anomalib's benchmark resolves it
        small = {**model["init_args"], "backbone": "resnet18", "pre_trained": False}  # wide_resnet50_2 is slow to build
        small["layers"] = ["layer2", "layer3"]
        built = get_model({**model, "init_args": small})
        assert type(built).__name__ == model["class_path"]


def tiny_config(texture_root: Path) -> dict:
    """The shipped grid on the generated textures, random ResNet-18 weights, one category."""
    config = shipped_config()
    for model in config["benchmark"]["model"]["grid"]:
        model["init_args"].update(backbone="resnet18", pre_trained=False)
    # two levels at strides 8 and 16: with layer1 (stride 4) among the two deepest, the class's calibration matches
    # 8 views of 56 x 56 positions per synthetic defect and took ~7 of the test's 8 minutes
    config["benchmark"]["model"]["grid"][0]["init_args"]["layers"] = ["layer2", "layer3"]
    data = config["benchmark"]["data"]["init_args"]
    data.update(root=str(texture_root), category={"grid": ["brick"]}, num_workers=0)
    return config


def test_tiny_config_keeps_the_shipped_keys(texture_root: Path) -> None:
    jobs = list(get_iterator_from_grid_dict(tiny_config(texture_root)["benchmark"]))
    shipped = list(get_iterator_from_grid_dict(shipped_config()["benchmark"]))
    assert len(jobs) == 2 and len(shipped) == 2 * 15
    assert {tuple(sorted(job["model"]["init_args"])) for job in jobs + shipped} == {
        ("backbone", "layers", "pre_trained", "visualizer"),
    }


@pytest.mark.slow
def test_anomalib_benchmark_runs_resad_and_patchcore(texture_root: Path, tmp_path: Path) -> None:
    config = tmp_path / "benchmark.yaml"
    config.write_text(yaml.safe_dump(tiny_config(texture_root)))
    result = subprocess.run(
        [str(ANOMALIB), "benchmark", "--config", str(config)],
        capture_output=True, text=True, cwd=tmp_path, timeout=1800, check=False,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PL_TRAINER_MAX_EPOCHS": "1"},
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    # anomalib's pipeline reports a failed runner only in its log and still exits 0: the CSV is the evidence
    tables = list((tmp_path / "runs" / "benchmark").glob("*/results.csv"))
    assert len(tables) == 1, output[-3000:] + (tmp_path / "runs" / "pipeline.log").read_text()[-3000:]
    results = pd.read_csv(tables[0]).set_index("model.class_path")
    assert sorted(results.index) == ["Patchcore", "ResAD"]
    assert (results["data.init_args.category"] == "brick").all()
    assert results.image_AUROC.between(0, 1).all() and results.pixel_AUROC.between(0, 1).all()
    assert (results.fit_duration > 0).all()  # ResAD trained PL_TRAINER_MAX_EPOCHS epochs (1000 would time out)
