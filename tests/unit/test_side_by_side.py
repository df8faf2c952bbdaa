# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""`resad evaluate` side by side on tiny generated data: same references, skipped baselines, cost, plot, resume."""

import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import timm
import torch

import anomalib_resad.experiments.protocol as protocol
from anomalib_resad.errors import ResADConfigurationError
from anomalib_resad.experiments.baselines import FewShotAnomalyDINO, FewShotPatchcore
from anomalib_resad.experiments.protocol import run_protocol
from anomalib_resad.lightning_model import ResAD
from tests.helpers.models import TINY_SETTINGS

TRAINER = {"max_epochs": 1, "accelerator": "cpu", "enable_progress_bar": False}
CELLS = 2 * 2  # shots [2, 3] x 2 draws, one target category


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def arguments(texture_root: Path, output: Path, **overrides: object) -> dict:
    return {
        "sources": [{"datamodule": "MVTecAD", "root": str(texture_root), "categories": ["grass", "gravel"]}],
        "targets": [{"datamodule": "MVTecAD", "root": str(texture_root), "categories": ["brick"]}],
        "output_dir": str(output),
        "model": {**TINY_SETTINGS, "first_stage_epochs": 0},
        "trainer": TRAINER,
        "shots": [2, 3],
        "draws": 2,
        "seed": 5,
        "num_workers": 0,
        "maps_per_category": 0,
        "cost_repeats": 1,
        **overrides,
    }


@pytest.fixture
def no_cached_weights(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Empty Hugging Face and open_clip caches, whatever this machine holds."""
    import huggingface_hub.constants

    home = tmp_path_factory.mktemp("home")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setenv("HOME", str(home))


@pytest.fixture(scope="module")
def grid(texture_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """One tiny run with every baseline requested: WinCLIP and AnomalyDINO have no weights here."""
    import huggingface_hub.constants

    output = tmp_path_factory.mktemp("grid")
    home = tmp_path_factory.mktemp("home")
    selections: dict[str, list] = {"ResAD": [], "PatchCore": []}
    records = Records()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(home / "hub"))
        patch.setenv("HOME", str(home))
        for name, owner in (("ResAD", ResAD), ("PatchCore", FewShotPatchcore)):
            original = owner.set_references

            def recording(self, selection, *args, _name=name, _original=original, **kwargs) -> None:
                if kwargs.get("pinned", True):  # the evaluation references (not ResAD's own bookkeeping)
                    selections[_name].append(list(selection.paths))
                return _original(self, selection, *args, **kwargs)

            patch.setattr(owner, "set_references", recording)
        exported: list[str] = []

        def openvino_cost(model: object, image_size: tuple[int, int], **kwargs: object) -> dict[str, float]:
            """Stands in for the export (about a minute per model here; the real one: tests/unit/test_cost.py)."""
            exported.append(type(model).__name__)
            return {"openvino_ms_per_image_b1": 2.0 * len(exported), "openvino_images_per_s_b16": 100.0}

        patch.setattr(protocol, "measure_openvino_cost", openvino_cost)
        loggers = [logging.getLogger(f"anomalib_resad.experiments.{name}") for name in ("baselines", "grid")]
        levels = [logger.level for logger in loggers]
        for logger in loggers:
            logger.addHandler(records)
            logger.setLevel(logging.INFO)
        try:
            summary = run_protocol(
                **arguments(texture_root, output, baselines=["patchcore", "winclip", "anomaly_dino"])
            )
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.removeHandler(records)
                logger.setLevel(level)
    yield {"output": output, "summary": summary, "selections": selections, "messages": records.messages,
           "exported": exported}  # fmt: skip


def test_resad_and_patchcore_fill_every_cell_with_the_same_references(grid: dict) -> None:
    results = pd.read_csv(grid["output"] / "results.csv")
    assert len(results) == 2 * CELLS
    assert set(results.model) == {"ResAD", "PatchCore"}
    assert results.image_AUROC.between(0, 1).all() and results.pixel_AUROC.between(0, 1).all()
    assert (results.fit_s > 0).all()
    resad, patchcore = grid["selections"]["ResAD"], grid["selections"]["PatchCore"]
    assert resad == patchcore and len(patchcore) == CELLS  # one selection object per cell, given to both
    recorded = [
        json.loads((grid["output"] / "references" / "brick" / f"k{k}_draw{draw}.json").read_text())["paths"]
        for k in (2, 3)
        for draw in (0, 1)
    ]
    assert patchcore == recorded


def test_baselines_without_weights_are_skipped_with_their_fetch_command(grid: dict) -> None:
    skipped = [message for message in grid["messages"] if "skipped" in message]
    assert len(skipped) == 2, skipped  # one line per skipped model
    winclip = next(message for message in skipped if message.startswith("WinCLIP"))
    dino = next(message for message in skipped if message.startswith("AnomalyDINO"))
    assert "open-clip-torch" in winclip or "pretrained='laion400m_e31'" in winclip
    assert "hf download timm/vit_small_patch14_dinov2.lvd142m" in dino
    assert "baseline_weights: {anomaly_dino: <file>}" in dino
    markdown = (grid["output"] / "summary.md").read_text()
    for model in ("WinCLIP", "AnomalyDINO"):
        assert f"| {model} | **mean** | skipped: no weights | skipped: no weights |" in markdown
    summary = pd.read_csv(grid["output"] / "summary.csv")
    assert set(summary[summary.model == "WinCLIP"].status) == {"skipped: no weights"}
    assert summary[summary.model == "WinCLIP"].image_AUROC.isna().all()  # never numbers under its name


def test_cost_columns_come_from_the_same_run(grid: dict) -> None:
    cost = pd.read_csv(grid["output"] / "cost.csv").set_index(["model", "k"])
    assert sorted(cost.index) == [("PatchCore", 2), ("PatchCore", 3), ("ResAD", 2), ("ResAD", 3)]
    assert (cost.ms_per_image_b1 > 0).all() and (cost.images_per_s_b16 > 0).all()
    # the nearest-neighbour search runs over the memory bank of the k images: more references, more multiply-adds
    assert cost.loc[("PatchCore", 3), "GMACs_per_image"] > cost.loc[("PatchCore", 2), "GMACs_per_image"]
    summary = pd.read_csv(grid["output"] / "summary.csv")
    mean = summary[(summary.category == "mean") & (summary.status == "ok")].set_index(["model", "k"])
    for k in (2, 3):
        expected = cost.loc[("ResAD", k), "ms_per_image_b1"] / cost.loc[("PatchCore", k), "ms_per_image_b1"]
        assert mean.loc[("ResAD", k), "latency_vs_PatchCore"] == pytest.approx(expected)
        assert mean.loc[("PatchCore", k), "latency_vs_PatchCore"] == pytest.approx(1.0)
        assert mean.loc[("ResAD", k), "train_s"] > 0 and mean.loc[("PatchCore", k), "train_s"] == 0
    assert "| ms/image (batch 1) |" in (grid["output"] / "summary.md").read_text()


def test_openvino_cost_is_measured_once_per_model_and_k_on_the_anomalib_module(grid: dict) -> None:
    # the whole anomalib model is exported (pre/post-processing and the class's references in the graph), once per
    # model and k, in the order the cells ran
    assert grid["exported"] == ["ResAD", "Patchcore", "ResAD", "Patchcore"]
    cost = pd.read_csv(grid["output"] / "cost.csv").set_index(["model", "k"])
    assert cost.openvino_ms_per_image_b1.to_dict() == {("ResAD", 2): 2.0, ("PatchCore", 2): 4.0,
                                                       ("ResAD", 3): 6.0, ("PatchCore", 3): 8.0}  # fmt: skip
    markdown = (grid["output"] / "summary.md").read_text()
    assert "| OpenVINO f32 ms/image (batch 1) |" in markdown
    assert "| ResAD | 3 |" in markdown and "| 6.0 | 100.0 |" in markdown


def test_plot_is_written_beside_the_summary(grid: dict) -> None:
    plot = grid["output"] / "auroc_vs_k.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_progress_one_line_per_cell(grid: dict) -> None:
    lines = [message for message in grid["messages"] if message.startswith("[")]
    assert len(lines) == 2 * CELLS
    assert lines[-1].startswith(f"[{2 * CELLS}/{2 * CELLS}] ")


def test_resume_skips_finished_cells_and_training(
    grid: dict, texture_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_cached_weights: None
) -> None:
    output = tmp_path / "resumed"
    shutil.copytree(grid["output"], output)
    results = pd.read_csv(output / "results.csv")
    dropped = (results.model == "PatchCore") & (results.k == 3) & (results.draw == 1)
    dropped |= (results.model == "ResAD") & (results.k == 2) & (results.draw == 0)
    results[~dropped].to_csv(output / "results.csv", index=False)  # as if interrupted before these two cells

    scored: list[str] = []
    original, original_scorings = protocol.score_samples, protocol.score_samples_scorings

    def counting(module: object, samples: pd.DataFrame, **kwargs: object) -> object:
        scored.append(type(module).__name__)
        return original(module, samples, **kwargs)

    def counting_scorings(module: object, samples: pd.DataFrame, *args: object, **kwargs: object) -> object:
        scored.append(type(module).__name__)
        return original_scorings(module, samples, *args, **kwargs)

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("the finished training must be reused")

    monkeypatch.setattr(protocol, "score_samples", counting)
    monkeypatch.setattr(protocol, "score_samples_scorings", counting_scorings)
    monkeypatch.setattr(protocol, "Engine", no_training)
    monkeypatch.setattr(protocol, "measure_cost", no_training)  # every (model, k) cost is already in cost.csv
    run_protocol(**arguments(texture_root, output, baselines=["patchcore"]))
    assert sorted(scored) == ["Patchcore", "ResAD"]
    resumed = pd.read_csv(output / "results.csv")
    assert len(resumed) == 2 * CELLS
    keys = ["model", "k", "draw"]
    kept = results[~dropped].merge(resumed, on=keys, suffixes=("", "_resumed"))
    assert (kept.image_AUROC == kept.image_AUROC_resumed).all()

    scored.clear()
    run_protocol(**arguments(texture_root, output, baselines=["patchcore"]))
    assert scored == []  # nothing left to compute


def test_resume_refuses_results_of_other_settings(grid: dict, texture_root: Path, tmp_path: Path) -> None:
    output = tmp_path / "other"
    shutil.copytree(grid["output"], output)
    with pytest.raises(ResADConfigurationError, match="seed"):
        run_protocol(**arguments(texture_root, output, seed=6))


def test_resume_refuses_results_without_recorded_settings(texture_root: Path, tmp_path: Path) -> None:
    output = tmp_path / "older"
    output.mkdir()
    pd.DataFrame([{"model": "ResAD", "category": "brick", "k": 2, "draw": 0, "image_AUROC": 0.5}]).to_csv(
        output / "results.csv", index=False
    )
    with pytest.raises(ResADConfigurationError, match=r"no run_config\.json"):
        run_protocol(**arguments(texture_root, output))


@pytest.mark.slow
def test_anomaly_dino_from_a_given_weights_file(grid: dict, texture_root: Path, tmp_path: Path) -> None:
    weights = tmp_path / "dino.pth"
    reference = timm.create_model("vit_small_patch14_dinov2.lvd142m", pretrained=False)
    torch.save(reference.state_dict(), weights)
    checkpoint = json.loads((grid["output"] / "train" / "trained.json").read_text())["checkpoint"]
    built: list[FewShotAnomalyDINO] = []
    original = FewShotAnomalyDINO.__init__

    def keep(self: FewShotAnomalyDINO, *args: object, **kwargs: object) -> None:
        original(self, *args, **kwargs)
        built.append(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FewShotAnomalyDINO, "__init__", keep)
        run_protocol(
            **arguments(
                texture_root,
                tmp_path / "dino",
                checkpoint=checkpoint,
                shots=[2],
                draws=1,
                baselines=["anomaly_dino"],
                baseline_weights={"anomaly_dino": str(weights)},
                openvino_cost=False,  # the GMACs below suffice; exporting ViT-S to OpenVINO took most of this test
            ),
        )
    loaded = built[0].model.model.feature_encoder.feature_extractor.state_dict()
    assert all(torch.equal(loaded[name], value) for name, value in reference.state_dict().items())
    results = pd.read_csv(tmp_path / "dino" / "results.csv")
    assert set(results.model) == {"ResAD", "AnomalyDINO"}
    assert results.image_AUROC.between(0, 1).all()
    cost = pd.read_csv(tmp_path / "dino" / "cost.csv").set_index("model")
    assert cost.loc["AnomalyDINO", "GMACs_per_image"] > 1  # ViT-S/14 at 252 px: about 6 GMACs


def test_resume_with_cost_measures_only_the_missing_costs(
    grid: dict, texture_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_cached_weights: None
) -> None:
    # a grid scored with `cost: false` on a busy machine, given its cost columns later by the same command with cost on
    output = tmp_path / "costs_later"
    shutil.copytree(grid["output"], output)
    cost = pd.read_csv(output / "cost.csv")
    cost[cost.k == 2].to_csv(output / "cost.csv", index=False)  # k = 3's costs missing
    results = pd.read_csv(output / "results.csv")

    def no_scoring(*args: object, **kwargs: object) -> None:
        raise AssertionError("finished cells must not be scored again")

    given: list[tuple[int, int]] = []  # (k, seed) of the references each model was last given
    for owner in (ResAD, FewShotPatchcore):
        setter = owner.set_references

        def recording(self, selection, *args, _original=setter, **kwargs) -> None:
            if kwargs.get("pinned", True):  # the evaluation references (not ResAD's own bookkeeping)
                given.append((len(selection.paths), selection.seed))
            return _original(self, selection, *args, **kwargs)

        monkeypatch.setattr(owner, "set_references", recording)
    measured: list[tuple[str, tuple[int, int]]] = []
    original = protocol.measure_cost

    def counting(module: torch.nn.Module, *args: object, **kwargs: object) -> object:
        measured.append((type(module).__name__, given[-1]))
        return original(module, *args, **kwargs)

    monkeypatch.setattr(protocol, "score_samples", no_scoring)
    monkeypatch.setattr(protocol, "score_samples_scorings", no_scoring)
    monkeypatch.setattr(protocol, "measure_cost", counting)
    monkeypatch.setattr(protocol, "measure_openvino_cost", lambda *args, **kwargs: {})  # real one: test_cost.py
    run_protocol(**arguments(texture_root, output, baselines=["patchcore"]))
    # k = 3 only, once per model, each with the references of k = 3's first cell (draw 0: seed 5) just set
    assert measured == [("ResADModel", (3, 5)), ("PatchcoreModel", (3, 5))]
    after = pd.read_csv(output / "cost.csv").set_index(["model", "k"])
    assert sorted(after.index) == [("PatchCore", 2), ("PatchCore", 3), ("ResAD", 2), ("ResAD", 3)]
    assert (after.ms_per_image_b1 > 0).all()
    pd.testing.assert_frame_equal(pd.read_csv(output / "results.csv"), results)
    summary = pd.read_csv(output / "summary.csv")
    mean = summary[(summary.category == "mean") & (summary.status == "ok")].set_index(["model", "k"])
    assert mean.loc[("ResAD", 3), "latency_vs_PatchCore"] > 0
