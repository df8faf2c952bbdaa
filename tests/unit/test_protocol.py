# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""The class-generalization protocol on a tiny generated texture set (pipeline behaviour, not accuracy)."""

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from anomalib_resad.experiments.protocol import run_protocol
from anomalib_resad.references import sample_references
from tests.helpers.models import TINY_SETTINGS

TINY_MODEL = {**TINY_SETTINGS, "first_stage_epochs": 0}
TRAINER = {"max_epochs": 1, "accelerator": "cpu", "enable_progress_bar": False}


def protocol_arguments(texture_root: Path, output: Path) -> dict:
    return {
        "sources": [{"datamodule": "MVTecAD", "root": str(texture_root), "categories": ["grass", "gravel"]}],
        "targets": [{"datamodule": "MVTecAD", "root": str(texture_root), "categories": ["brick"]}],
        "output_dir": str(output),
        "model": TINY_MODEL,
        "trainer": TRAINER,
        "shots": [2, 3],
        "draws": 2,
        "seed": 5,
        "num_workers": 0,
        "maps_per_category": 2,
        "baselines": ["nearest", "flows", "patchcore"],
        "cost": False,  # cost.csv, with its OpenVINO export (two thirds of this run): tests/unit/test_side_by_side.py
    }


@pytest.fixture(scope="module")
def protocol_run(texture_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("protocol")
    run_protocol(**protocol_arguments(texture_root, output))
    return output


def test_one_row_per_model_category_k_and_draw(protocol_run: Path) -> None:
    results = pd.read_csv(protocol_run / "results.csv")
    assert len(results) == 4 * 1 * 2 * 2
    assert set(results.model) == {"ResAD", "nearest", "flows", "PatchCore"}
    # the same trained module and banks, scored three ways: the rows differ where the scorings do
    resad, nearest = (results[results.model == name].image_AUROC.to_numpy() for name in ("ResAD", "nearest"))
    assert len(resad) == len(nearest) == 4
    assert set(results.category) == {"brick"}
    assert sorted(results.groupby(["model", "k"]).draw.apply(list).iloc[0]) == [0, 1]
    metrics = results[["image_AUROC", "pixel_AUROC", "pixel_AUPRO", "image_F1Max"]]
    assert metrics.notna().all().all()
    assert ((metrics >= 0) & (metrics <= 1)).all().all()
    # every model gets the oracle's verdict rates (thresholds chosen on the test labels), PatchCore included
    oracle = results[["oracle_F1_recall", "oracle_F1_FPR", "oracle_recall_at_FPR10"]]
    assert oracle.notna().all().all() and ((oracle >= 0) & (oracle <= 1)).all().all()
    assert ((results.oracle_recall_at_FPR10 <= results.oracle_F1_recall + 1e-6) | (results.oracle_F1_FPR <= 0.1)).all()


def test_resad_rows_score_as_each_scoring_alone(protocol_run: Path, texture_root: Path) -> None:
    # ResAD, `nearest` and `flows` share one pass over the images: each row must hold its own scoring's scores
    from anomalib_resad import ResAD
    from anomalib_resad.data.multi_class import CATEGORY_COLUMN, MultiClassDataModule
    from anomalib_resad.evaluation import score_samples
    from anomalib_resad.references import ReferenceSelection

    resad = ResAD.load_from_checkpoint(next((protocol_run / "train").rglob("*.ckpt")), weights_only=True)
    path = protocol_run / "references" / "brick" / "k3_draw1.json"
    resad.set_references(ReferenceSelection.from_dict(json.loads(path.read_text())))
    datamodule = MultiClassDataModule(
        sources=[{"datamodule": "MVTecAD", "root": str(texture_root), "categories": ["grass", "gravel"]}],
        targets=[{"datamodule": "MVTecAD", "root": str(texture_root), "categories": ["brick"]}],
        num_workers=0,
    )
    datamodule.setup()
    samples = datamodule.target_samples[datamodule.target_samples[CATEGORY_COLUMN] == "brick"]
    recorded = pd.read_csv(protocol_run / "image_scores.csv")
    recorded = recorded[(recorded.k == 3) & (recorded.draw == 1)]
    generator = resad.model.anomaly_map_generator
    for row, scoring in (("ResAD", "fused"), ("nearest", "nearest"), ("flows", "paper")):
        generator.scoring = scoring
        alone = score_samples(resad, samples)
        kept = recorded[recorded.model == row].set_index("image").score
        assert len(kept) == len(alone.paths) > 0
        expected = torch.tensor([kept[image] for image in alone.paths], dtype=torch.float32)
        torch.testing.assert_close(alone.pred_scores, expected, atol=1e-5, rtol=1e-5)


def test_resume_scores_only_the_missing_row_of_a_shared_pass(
    protocol_run: Path, texture_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from anomalib_resad.experiments import protocol

    output = tmp_path / "resumed"
    shutil.copytree(protocol_run, output)
    results = pd.read_csv(output / "results.csv")
    dropped = (results.model == "nearest") & (results.k == 3) & (results.draw == 0)
    results[~dropped].to_csv(output / "results.csv", index=False)  # as if interrupted after ResAD's row of the cell
    calls: list[list[str]] = []
    original = protocol.score_samples_scorings

    def recording(module: object, samples: pd.DataFrame, scorings: list[str], **kwargs: object) -> object:
        calls.append(list(scorings))
        return original(module, samples, scorings, **kwargs)

    def no_scoring(*args: object, **kwargs: object) -> None:
        raise AssertionError("PatchCore's cells are finished")

    monkeypatch.setattr(protocol, "score_samples_scorings", recording)
    monkeypatch.setattr(protocol, "score_samples", no_scoring)
    run_protocol(**protocol_arguments(texture_root, output))
    assert calls == [["nearest"]]  # the cell's finished rows are not scored again
    resumed = pd.read_csv(output / "results.csv")
    pd.testing.assert_frame_equal(resumed.iloc[: len(results) - 1], results[~dropped].reset_index(drop=True))
    metrics = ["image_AUROC", "pixel_AUROC", "pixel_AUPRO", "image_F1Max", "normal_FPR", "anomalous_recall"]
    pd.testing.assert_series_equal(
        resumed.iloc[-1][metrics], results[dropped].iloc[0][metrics], check_names=False, atol=1e-6
    )


def test_summary_has_mean_and_std_over_draws(protocol_run: Path) -> None:
    results = pd.read_csv(protocol_run / "results.csv")
    summary = pd.read_csv(protocol_run / "summary.csv")
    row = summary[(summary.model == "ResAD") & (summary.category == "brick") & (summary.k == 2)].iloc[0]
    draws = results[(results.model == "ResAD") & (results.k == 2)].image_AUROC
    assert row.image_AUROC == pytest.approx(draws.mean())
    assert row.image_AUROC_std == pytest.approx(draws.std(ddof=1))  # the sample std over draws
    assert set(summary[summary.category == "mean"].k) == {2, 3}
    markdown = (protocol_run / "summary.md").read_text()
    assert "| ResAD | **mean** |" in markdown and "| PatchCore | brick |" in markdown


def test_reference_files_record_seeded_draws(protocol_run: Path, texture_root: Path) -> None:
    pool = sorted(str(path) for path in (texture_root / "brick" / "train" / "good").glob("*.png"))
    for draw in (0, 1):
        selection = json.loads((protocol_run / "references" / "brick" / f"k2_draw{draw}.json").read_text())
        assert selection["paths"] == sample_references(pool, 2, seed=5 + draw)
        assert selection["seed"] == 5 + draw


def test_anomaly_maps_are_written_per_model(protocol_run: Path) -> None:
    for model in ("ResAD", "PatchCore"):
        assert len(list((protocol_run / "anomaly_maps" / model / "brick" / "k2").glob("*.png"))) == 2


def test_reference_folder_and_checkpoint_reuse(protocol_run: Path, texture_root: Path, tmp_path: Path) -> None:
    checkpoint = next((protocol_run / "train").rglob("*.ckpt"))
    folder = texture_root / "brick" / "test" / "good"  # any folder of normal images of the class
    output = tmp_path / "from_checkpoint"
    run_protocol(
        sources=[{"datamodule": "MVTecAD", "root": str(texture_root), "categories": ["grass", "gravel"]}],
        targets=[{"datamodule": "MVTecAD", "root": str(texture_root), "categories": ["brick"]}],
        output_dir=str(output),
        checkpoint=str(checkpoint),
        shots=[2],
        draws=3,
        reference_dirs={"brick": str(folder)},
        num_workers=0,
        maps_per_category=0,
        cost=False,
        # a scoring option applies to the given checkpoint; the training recipe's keys are the checkpoint's own
        model={"sensitivity": 0.5, "coupling_layers": 99},
    )
    results = pd.read_csv(output / "results.csv")
    assert len(results) == 1  # a folder is one fixed draw
    assert results.averaged.isin([0.0, 1.0]).all()  # which matching the class's references chose is recorded
    selection = json.loads((output / "references" / "brick" / "k2_draw0.json").read_text())
    assert selection["paths"] == sorted(str(path) for path in folder.glob("*.png"))[:2]
    assert not (output / "train").exists()


def test_scoring_options_apply_to_a_loaded_model() -> None:
    from anomalib_resad.errors import ResADConfigurationError
    from anomalib_resad.experiments.protocol import apply_scoring_options
    from tests.helpers.models import tiny_resad

    resad = tiny_resad()
    apply_scoring_options(resad, {"scoring": "nearest", "sensitivity": 0.5})
    generator = resad.model.anomaly_map_generator
    assert (generator.scoring, generator.sensitivity) == ("nearest", 0.5)
    assert resad.hparams["scoring"] == "nearest"
    with pytest.raises(ResADConfigurationError, match="not a scoring option"):
        apply_scoring_options(resad, {"no_such_option": 1})
    with pytest.raises(ResADConfigurationError, match="scoring"):
        apply_scoring_options(resad, {"scoring": "flows"})
    with pytest.raises(ResADConfigurationError, match="outside"):
        apply_scoring_options(resad, {"sensitivity": -0.1})


def test_summary_means_over_domains() -> None:
    from anomalib_resad.experiments.protocol import _summarize

    rows = [
        {"model": "ResAD", "domain": domain, "category": category, "k": 2, "draw": draw, "image_AUROC": value}
        for domain, category, values in (
            ("boards", "a", (0.6, 0.8)),
            ("boards", "b", (0.8, 1.0)),
            ("tile", "t", (0.5, 0.7)),
        )
        for draw, value in enumerate(values)
    ]
    summary = _summarize(pd.DataFrame(rows)).set_index("category")
    assert summary.loc["mean", "image_AUROC"] == pytest.approx((0.7 + 0.9 + 0.6) / 3)  # over categories
    assert summary.loc["domain:boards", "image_AUROC"] == pytest.approx(0.8)
    assert summary.loc["domain mean", "image_AUROC"] == pytest.approx((0.8 + 0.6) / 2)  # each domain alike
    # the std of a mean row is over draws: the domain means of draw 0 and 1 are 0.6 and 0.8
    assert summary.loc["domain mean", "image_AUROC_std"] == pytest.approx(pd.Series([0.6, 0.8]).std(ddof=1))


def test_training_logs_one_line_per_epoch_to_a_file(caplog: pytest.LogCaptureFixture) -> None:
    """`resad evaluate > log`: one readable line per epoch, not a progress bar redrawn in place until the end."""
    import logging
    from types import SimpleNamespace

    from anomalib_resad.experiments.grid import EpochProgress

    progress = EpochProgress()
    progress.on_train_start(None, None)
    with caplog.at_level(logging.INFO, logger="anomalib_resad.experiments.grid"):
        for epoch in range(2):
            trainer = SimpleNamespace(current_epoch=epoch, max_epochs=3, callback_metrics={"train_loss": 0.5 - epoch})
            progress.on_train_epoch_end(trainer, None)
    lines = [record.getMessage() for record in caplog.records]
    assert lines[0].startswith("Training epoch 1/3: train_loss 0.5 (") and "s left" in lines[0]
    assert lines[1].startswith("Training epoch 2/3: train_loss -0.5 (")


def test_impossible_settings_are_refused_before_any_training(texture_root: Path, tmp_path: Path) -> None:
    from anomalib_resad.errors import ResADConfigurationError

    def run(**overrides: object) -> None:
        settings = {
            "sources": [{"datamodule": "MVTecAD", "root": str(texture_root), "categories": ["grass"]}],
            "targets": [{"datamodule": "MVTecAD", "root": str(texture_root), "categories": ["brick"]}],
            "output_dir": str(tmp_path / "run"), "model": TINY_MODEL, "trainer": TRAINER, "shots": [2],
            "draws": 1, "num_workers": 0, "cost": False, **overrides,
        }  # fmt: skip
        run_protocol(**settings)

    mistyped = tmp_path / "datasets" / "MVTecAd"
    with pytest.raises(ResADConfigurationError, match=r"Dataset root '.*MVTecAd' .* does not exist"):
        run(target_root=str(mistyped))
    assert not mistyped.exists()  # nothing downloaded into it, not even the folder
    with pytest.raises(ResADConfigurationError, match=r"k >= 2"):
        run(shots=[1])
    with pytest.raises(ResADConfigurationError, match=r"need 100 normal reference images per class; .*brick \(8\)"):
        run(shots=[2, 100])
    assert not (tmp_path / "run" / "train").exists()  # refused before training
