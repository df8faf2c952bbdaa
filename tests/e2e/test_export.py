# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""Export round trips (anomalib export, OpenVINO / ONNX / Torch) and new classes at deploy time."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import openvino as ov
import pytest
import torch
from anomalib.data.utils.image import read_image
from anomalib.deploy import OpenVINOInferencer, TorchInferencer
from anomalib.engine import Engine

from anomalib_resad import ResAD, ResADInputError
from anomalib_resad.calibration import Scoring
from anomalib_resad.data import MultiClassDataModule
from anomalib_resad.deploy import (
    ReferenceConditionedInferencer,
    export_deployment,
    load_references,
    make_references,
    model_signature,
    save_references,
)
from anomalib_resad.offline_weights import LITE0_BACKBONE, LITE0_LAYERS
from anomalib_resad.references import select_folder_references

pytestmark = pytest.mark.slow
F32 = {"INFERENCE_PRECISION_HINT": "f32"}  # OpenVINO would pick bf16 on CPUs that have it
TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def checkpoint(texture_root: Path, lite0_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small ResAD trained for one epoch on two texture classes (brick stays unseen)."""
    root = tmp_path_factory.mktemp("export_train")
    datamodule = MultiClassDataModule(
        sources=[{"datamodule": "MVTecAD", "root": str(texture_root), "categories": ["grass", "gravel"]}],
        targets=[{"datamodule": "MVTecAD", "root": str(texture_root), "categories": ["brick"]}],
        train_batch_size=4,
        eval_batch_size=4,
        num_workers=0,
    )
    model = ResAD(
        backbone=LITE0_BACKBONE,
        layers=list(LITE0_LAYERS),
        pre_trained=str(lite0_weights),
        image_size=96,
        coupling_layers=2,
        pos_embed_dim=16,
        first_stage_epochs=0,
        lr=1e-3,
        visualizer=False,
    )
    engine = Engine(max_epochs=1, accelerator="cpu", default_root_dir=root, logger=False, enable_progress_bar=False)
    engine.fit(model, datamodule=datamodule)
    return next(root.rglob("*.ckpt"))


def images_of(texture_root: Path, category: str, count: int = 3) -> list[Path]:
    return sorted((texture_root / category / "test").rglob("*.png"))[:count]


def eager(checkpoint: Path, image: Path) -> dict[str, np.ndarray]:
    model = ResAD.load_from_checkpoint(checkpoint).eval()
    with torch.no_grad():
        output = model(read_image(image, as_tensor=True).unsqueeze(0))
    return {name: value.numpy() for name, value in output._asdict().items() if value is not None}


def assert_parity(reference: dict[str, np.ndarray], exported: dict[str, np.ndarray]) -> None:
    for name in ("pred_score", "anomaly_map"):
        difference = np.abs(reference[name].reshape(-1) - np.asarray(exported[name]).reshape(-1)).max()
        assert difference <= TOLERANCE, f"{name} differs by {difference}"
    assert np.array_equal(reference["pred_label"].reshape(-1), np.asarray(exported["pred_label"]).reshape(-1))


def assert_inferencer_matches_eager(
    inferencer: ReferenceConditionedInferencer, model: ResAD, images: list[Path], class_name: str
) -> None:
    """The reference-conditioned OpenVINO model scores ``images`` like eager PyTorch holding the same bank."""
    for image in images:
        prediction = inferencer.predict(image, class_name=class_name)
        with torch.no_grad():
            reference = model(read_image(image, as_tensor=True).unsqueeze(0))
        assert_parity({name: value.numpy() for name, value in reference._asdict().items() if value is not None},
                      {"pred_score": prediction.pred_score, "anomaly_map": prediction.anomaly_map,
                       "pred_label": prediction.pred_label})  # fmt: skip


def assert_same_record(exported: Scoring, eager: Scoring) -> None:
    """Two measurements of one class's scoring record agree (f32 OpenVINO vs eager) and choose the same matching."""
    for name, value in eager.tensors().items():
        torch.testing.assert_close(getattr(exported, name), value.cpu(), rtol=1e-2, atol=1e-3, msg=name)
    assert float(exported.averaging) == float(eager.averaging)


EXPORTED_FILES = {
    "torch": ["weights/torch/model.pt"],
    "onnx": ["weights/onnx/model.onnx", "weights/onnx/model.onnx.data"],  # torch writes the weights beside the graph
    "openvino": ["weights/openvino/model.xml", "weights/openvino/model.bin"],
}
# What `anomalib export --model ResAD` prints, stdout and stderr together, is ~45 lines of anomalib's, Lightning's and
# our own (the model is built twice - by the command line, then from the checkpoint - and anomalib's command line
# prints every log record twice, plainly on stderr and through rich on stdout). The ONNX/OpenVINO exports added
# ~3,100 more: onnxscript/onnx_ir INFO records per rewritten node, torch.export's dump of a failed non-strict trace
# (~500 lines, twice), a failed opset-14 down-conversion with its traceback. 100 leaves room for a few more library
# warnings and still fails on any of those.
MAX_EXPORT_LINES = 100


@pytest.fixture(scope="module")
def anomalib_exports(
    checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, subprocess.CompletedProcess]]:
    """`anomalib export` of all three types through the real command line: (export root, each command's result)."""
    root = tmp_path_factory.mktemp("anomalib_export")
    anomalib = Path(sys.executable).parent / "anomalib"
    results = {}
    for export_type in EXPORTED_FILES:
        result = subprocess.run(
            [str(anomalib), "export", "--model", "ResAD", "--ckpt_path", str(checkpoint),
             "--export_type", export_type, "--export_root", str(root)],
            capture_output=True, text=True, timeout=900, check=False, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )  # fmt: skip
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
        results[export_type] = result
    return root, results


@pytest.fixture(scope="module")
def exported(anomalib_exports: tuple[Path, dict[str, subprocess.CompletedProcess]]) -> Path:
    """The folder `anomalib export` wrote all three types to."""
    return anomalib_exports[0]


def test_anomalib_export_writes_every_type(exported: Path) -> None:
    for path in ("weights/torch/model.pt", "weights/onnx/model.onnx", "weights/openvino/model.xml"):
        assert (exported / path).is_file(), path


@pytest.mark.parametrize("export_type", list(EXPORTED_FILES))
def test_anomalib_export_is_quiet_and_names_the_files_it_wrote(
    anomalib_exports: tuple[Path, dict[str, subprocess.CompletedProcess]], export_type: str
) -> None:
    root, results = anomalib_exports
    result = results[export_type]
    output = result.stdout + result.stderr
    assert len(output.splitlines()) < MAX_EXPORT_LINES, output[-3000:]
    assert "Traceback" not in output
    assert "[torch.onnx]" not in output  # the exporter's progress report (and its ❌ for the first trace attempt)
    announced = [line for line in result.stdout.splitlines() if line.startswith("ResAD ") and "export wrote" in line]
    assert len(announced) == 1, result.stdout[-3000:]
    files = [str((root / path).resolve()) for path in EXPORTED_FILES[export_type]]
    assert announced[0].endswith(" export wrote " + ", ".join(files))  # every file, each path unbroken
    assert all(Path(file).is_file() for file in files)
    # which class it bakes in: the checkpoint's stored references (the first class validated in training)
    assert result.stdout.count("Exporting ResAD with the references of class 'grass' baked in (k=4)") == 1


def test_openvino_inferencer_matches_eager(exported: Path, checkpoint: Path, texture_root: Path) -> None:
    inferencer = OpenVINOInferencer(exported / "weights/openvino/model.xml", device="CPU", config=F32)
    for image in images_of(texture_root, "grass"):
        prediction = inferencer.predict(image)
        assert_parity(eager(checkpoint, image), {"pred_score": prediction.pred_score,
                                                 "anomaly_map": prediction.anomaly_map,
                                                 "pred_label": prediction.pred_label})  # fmt: skip


def test_onnx_graph_matches_eager(exported: Path, checkpoint: Path, texture_root: Path) -> None:
    core = ov.Core()
    compiled = core.compile_model(core.read_model(exported / "weights/onnx/model.onnx"), "CPU", F32)
    image = images_of(texture_root, "gravel")[0]
    outputs = compiled(read_image(image, as_tensor=True).unsqueeze(0).numpy())
    assert_parity(eager(checkpoint, image), {key.get_any_name(): value for key, value in outputs.items()})


def test_torch_inferencer_matches_eager(
    exported: Path, checkpoint: Path, texture_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRUST_REMOTE_CODE", "1")  # anomalib's TorchInferencer unpickles the whole module
    inferencer = TorchInferencer(exported / "weights/torch/model.pt", device="cpu")
    image = images_of(texture_root, "grass")[1]
    prediction = inferencer.predict(read_image(image, as_tensor=True))
    assert_parity(eager(checkpoint, image), {name: getattr(prediction, name).detach().cpu().numpy()
                                             for name in ("pred_score", "anomaly_map", "pred_label")})  # fmt: skip


@pytest.fixture(scope="module")
def deployment(checkpoint: Path, texture_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = export_deployment(checkpoint, tmp_path_factory.mktemp("deployment"))
    for category in ("brick", "grass"):  # brick was never trained on
        make_references(root, texture_root / category / "train" / "good", root / "refs" / f"{category}.npz", k=3)
    return root


def test_new_classes_side_by_side_with_one_exported_model(
    deployment: Path, checkpoint: Path, texture_root: Path
) -> None:
    inferencer = ReferenceConditionedInferencer(deployment)
    for category in ("brick", "grass"):
        inferencer.add_class(category, deployment / "refs" / f"{category}.npz")
    model = ResAD.load_from_checkpoint(checkpoint).eval()
    scores = {}
    for category in ("brick", "grass"):
        # the class's scoring record, measured by the exported OpenVINO calibrator, agrees with eager PyTorch's ...
        bank, _ = load_references(deployment / "refs" / f"{category}.npz")
        model.set_references(select_folder_references(texture_root / category / "train" / "good", 3, category))
        assert_same_record(bank.scoring, model.model.anomaly_map_generator.stored.get())
        # ... and given the same bank and record, the exported graph scores like eager PyTorch
        model.model.set_references(bank)
        assert_inferencer_matches_eager(inferencer, model, images_of(texture_root, category, 2), category)
        normal = texture_root / category / "test" / "good" / "000.png"
        scores[category] = {other: float(inferencer.predict(normal, class_name=other).pred_score[0])
                            for other in ("brick", "grass")}  # fmt: skip
    # a normal image looks more normal against its own class's references than against another class's
    assert scores["brick"]["brick"] < scores["brick"]["grass"]
    assert scores["grass"]["grass"] < scores["grass"]["brick"]


def test_references_of_another_model_are_refused(deployment: Path, texture_root: Path, tmp_path: Path) -> None:
    inferencer = ReferenceConditionedInferencer(deployment)
    other = ResAD(backbone="resnet18", layers=["layer1", "layer2"], pre_trained=False, image_size=96,
                  coupling_layers=2, pos_embed_dim=16, visualizer=False)  # fmt: skip
    make_references(other, texture_root / "brick" / "train" / "good", tmp_path / "resnet.npz", k=2)
    with pytest.raises(ResADInputError, match="backbone: references 'resnet18', model 'tf_efficientnet_lite0'"):
        inferencer.add_class("brick", tmp_path / "resnet.npz")


def test_references_of_another_image_size_are_refused(deployment: Path, texture_root: Path, tmp_path: Path) -> None:
    inferencer = ReferenceConditionedInferencer(deployment)
    larger = ResAD(backbone=LITE0_BACKBONE, layers=list(LITE0_LAYERS), pre_trained=False, image_size=128,
                   coupling_layers=2, pos_embed_dim=16, visualizer=False)  # fmt: skip
    make_references(larger, texture_root / "brick" / "train" / "good", tmp_path / "large.npz", k=2)
    with pytest.raises(ResADInputError, match=r"image_size: references \[128, 128\], model \[96, 96\]"):
        inferencer.add_class("brick", tmp_path / "large.npz")


def test_missing_class_is_named(deployment: Path, texture_root: Path) -> None:
    inferencer = ReferenceConditionedInferencer(deployment)
    inferencer.add_class("grass", deployment / "refs" / "grass.npz")
    with pytest.raises(ResADInputError, match=r"No references for class 'brick'; known classes: \['grass'\]"):
        inferencer.predict(images_of(texture_root, "brick")[0], class_name="brick")


def test_resad_references_command_line(deployment: Path, texture_root: Path, tmp_path: Path) -> None:
    resad = Path(sys.executable).parent / "resad"
    output, images = tmp_path / "gravel.npz", texture_root / "gravel" / "train" / "good"
    result = subprocess.run(
        [str(resad), "references", "--model", str(deployment), "--images", str(images), "--k", "2",
         "--output", str(output)],
        capture_output=True, text=True, timeout=600, check=False, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    inferencer = ReferenceConditionedInferencer(deployment)
    inferencer.add_class("gravel", output)
    assert inferencer.banks["gravel"]["reference_0"].shape[0] == 2 * 24 * 24  # k=2 images, 24x24 grid at 96 px
    # the class's scoring record, one named input per field
    assert inferencer.banks["gravel"]["level_constants"].shape == (3,)
    assert set(Scoring.names()) <= set(inferencer.banks["gravel"])
    assert "Wrote" in result.stdout and str(output) in result.stdout  # says what it wrote


def odd_frames(texture_root: Path, other_category: str, size: int = 96) -> dict[str, np.ndarray]:
    """Frames an inspection must never pass: dead camera, blown exposure, a colour cast, noise, another product."""
    rng = np.random.default_rng(0)
    other = read_image(images_of(texture_root, other_category, 1)[0], as_tensor=False)
    return {
        "black": np.zeros((size, size, 3), np.float32),
        "white": np.ones((size, size, 3), np.float32),
        "saturated red": np.stack([np.ones((size, size)), np.zeros((size, size)), np.zeros((size, size))], -1),
        "noise": np.clip(rng.normal(0.5, 0.25, (size, size, 3)), 0, 1),
        f"a {other_category} image": np.asarray(other, dtype=np.float32),
    }


def test_frames_unlike_the_references_are_flagged_in_eager_onnx_and_openvino(
    exported: Path, deployment: Path, checkpoint: Path, texture_root: Path
) -> None:
    """Eager and anomalib's exports hold the checkpoint's references (class 'grass'); the conditioned model brick's."""
    model = ResAD.load_from_checkpoint(checkpoint).eval()
    stored = model.reference_selection.class_name
    other = "brick" if stored != "brick" else "gravel"
    openvino = OpenVINOInferencer(exported / "weights/openvino/model.xml", device="CPU", config=F32)
    core = ov.Core()
    onnx = core.compile_model(core.read_model(exported / "weights/onnx/model.onnx"), "CPU", F32)
    conditioned = ReferenceConditionedInferencer(deployment)
    conditioned.add_class("brick", deployment / "refs" / "brick.npz")
    for name, frame in odd_frames(texture_root, other).items():
        tensor = torch.from_numpy(np.ascontiguousarray(frame.transpose(2, 0, 1))).float().unsqueeze(0)
        with torch.no_grad():
            assert bool(model(tensor).pred_label.item()), f"eager passed {name} against {stored} references"
        assert bool(openvino.predict(frame).pred_label.item()), f"OpenVINO passed {name}"
        labels = {key.get_any_name(): value for key, value in onnx(tensor.numpy()).items()}["pred_label"]
        assert bool(np.asarray(labels).item()), f"ONNX passed {name}"
    for name, frame in odd_frames(texture_root, "grass").items():
        assert bool(conditioned.predict(frame, class_name="brick").pred_label.item()), f"{name} vs brick refs"


def test_a_new_class_gets_its_own_threshold_from_its_k_references(deployment: Path, texture_root: Path) -> None:
    """Normal images of an unseen class pass at that class's calibrated threshold; its defects mostly do not."""
    inferencer = ReferenceConditionedInferencer(deployment)
    inferencer.add_class("brick", deployment / "refs" / "brick.npz")
    normal = sorted((texture_root / "brick" / "test" / "good").glob("*.png"))
    defects = sorted(path for path in (texture_root / "brick" / "test").rglob("*.png") if path.parent.name != "good")
    assert not any(bool(inferencer.predict(path, class_name="brick").pred_label.item()) for path in normal)
    flagged = [bool(inferencer.predict(path, class_name="brick").pred_label.item()) for path in defects]
    assert sum(flagged) >= len(flagged) / 2, flagged


def test_damaged_references_file_and_unreadable_image_are_named(deployment: Path, tmp_path: Path) -> None:
    content = dict(np.load(deployment / "refs" / "brick.npz"))
    content["reference_0"] = content["reference_0"][:-5]
    np.savez(tmp_path / "damaged.npz", **content)
    inferencer = ReferenceConditionedInferencer(deployment)
    with pytest.raises(ResADInputError, match=r"damaged: reference_0 is \("):
        inferencer.add_class("brick", tmp_path / "damaged.npz")
    inferencer.add_class("brick", deployment / "refs" / "brick.npz")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ResADInputError, match=r"broken\.png"):
        inferencer.predict(tmp_path / "broken.png", class_name="brick")
    with pytest.raises(ResADInputError, match=r"missing\.png' does not exist"):
        inferencer.predict(tmp_path / "missing.png", class_name="brick")


def test_references_made_in_openvino_equal_eagers_and_score_alike(
    checkpoint: Path, deployment: Path, texture_root: Path, tmp_path: Path
) -> None:
    """The OpenVINO reference encoder and calibrator make the same bank (each image's 8 views on the two deepest
    levels), the same scoring record and the same matching choice (the same synthetic defects) as eager PyTorch; with
    the averaged matching switched on, the exported graph scores like eager too."""
    model = ResAD.load_from_checkpoint(checkpoint).eval()
    root = deployment  # the checkpoint's export (exporting it again took two minutes)
    folder = texture_root / "brick" / "train" / "good"
    bank, metadata = load_references(make_references(root, folder, tmp_path / "brick.npz", k=2))
    assert (bank.k, bank.views, metadata["views"]) == (2, [1, 8, 8], [1, 8, 8])
    model.set_references(select_folder_references(folder, 2, "brick"))
    for exported_level, eager_level in zip(bank.levels, model.model.feature_converter.reference_levels, strict=True):
        torch.testing.assert_close(exported_level, eager_level, rtol=1e-3, atol=1e-3)
    assert_same_record(bank.scoring, model.model.anomaly_map_generator.stored.get())
    bank.scoring.averaging = torch.tensor(1.0)  # the averaged term on: the graph computes it like eager
    bank_file = tmp_path / "brick_averaged.npz"
    save_references(bank_file, bank, model_signature(model), select_folder_references(folder, 2, "brick"))
    inferencer = ReferenceConditionedInferencer(root)
    inferencer.add_class("brick", bank_file)
    model.model.set_references(bank)
    assert_inferencer_matches_eager(inferencer, model, images_of(texture_root, "brick", 2), "brick")
