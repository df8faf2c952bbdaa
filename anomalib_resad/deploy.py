# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""Deployment: new classes at deploy time with one exported model, no retraining, no re-export.

A ResAD model's reference bank is data, not weights. :func:`export_deployment` writes an OpenVINO (and ONNX) model
that takes the bank as inputs next to the image, plus a small *reference encoder* model (images -> bank) and a
``metadata.json``. Then, for any class:

* ``make_references(...)`` (command line ``resad references``) turns a folder of k normal images into a references
  file (``.npz``: the bank and the class's scoring record - its constants and leave-one-out maxima, measured on those
  k images), with the exported encoder and calibrator (OpenVINO only, no torch checkpoint needed) or
  a checkpoint;
* :class:`ReferenceConditionedInferencer` (anomalib's ``OpenVINOInferencer`` with the bank as extra inputs) scores
  images of every class it was given references for, side by side, with the one compiled model.

The simple path needs none of this: ``anomalib export --model ResAD --ckpt_path ... --export_type openvino`` bakes
the checkpoint's references into the graph, and ``resad export --bake_references <file>`` bakes another class's.
Pre-processing (resize, normalise) and anomalib's post-processing (normalisation and thresholds from validation)
are inside every exported graph, so ``pred_label`` means the same in torch and OpenVINO.

OpenVINO runs on CPUs with bf16 support in bf16 unless told otherwise; nearest-neighbour matching then picks other
reference features and scores move by ~1e-2. The inferencer here compiles in f32 (``precision="f32"``); pass
``config={"INFERENCE_PRECISION_HINT": "f32"}`` to anomalib's ``OpenVINOInferencer`` for baked exports.

Example:
    >>> export_deployment("model.ckpt", "deploy/")  # doctest: +SKIP
    >>> make_references("deploy/", "new_part/good", "deploy/references/new_part.npz", k=4)  # doctest: +SKIP
    >>> inferencer = ReferenceConditionedInferencer("deploy/")  # doctest: +SKIP
    >>> inferencer.add_class("new_part", "deploy/references/new_part.npz")  # doctest: +SKIP
    >>> inferencer.predict("new_part/test/0001.png", class_name="new_part").pred_score  # doctest: +SKIP
"""

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from anomalib.data import NumpyImageBatch
from anomalib.deploy import OpenVINOInferencer
from PIL.Image import Image as PILImage
from torch import nn
from torchvision.transforms.v2 import Resize

from .calibration import ScoreComponents, Scoring, leave_one_out_rows, leave_one_out_scoring
from .errors import ResADConfigurationError, ResADInputError
from .export_output import ONNX_OPSET_VERSION, quiet_export, written_files
from .feature_converter import ReferenceBank, flatten_levels
from .images import read_rgb
from .lightning_model import ResAD
from .reference_views import keep_views, reference_views, views_mode
from .references import ReferenceSelection, folder_class_name, load_images, select_folder_references
from .synthetic_defects import synthetic_defects

logger = logging.getLogger(__name__)

# The layout of references files and deployments: a file of another format is refused with the command that remakes
# it (7: the class's scoring record by field name, views per level recorded; 8: the record places each scoring's
# boundary from synthetic defects, and the calibrator gives the maps they are read from).
FORMAT_VERSION = 8
MODEL_FILE = "model"
ENCODER_FILE = "reference_encoder"
CALIBRATOR_FILE = "reference_calibrator"
METADATA_FILE = "metadata.json"


def model_signature(model: ResAD) -> dict[str, Any]:
    """What a reference bank must match to be used with ``model``: backbone, levels, input size, channels, grids."""
    extractor = model.model.feature_extractor
    size = model.input_size
    if size is None:
        msg = "The model's pre-processor must resize to a fixed size to export references (e.g. image_size=224)."
        raise ResADConfigurationError(msg)
    height, width = (int(value) for value in size)
    with torch.no_grad():  # the exact feature-map sizes (padding rules differ between backbones)
        features = extractor(torch.zeros(1, 3, height, width, device=model.device))
    return {
        "backbone": extractor.backbone,
        "layers": list(extractor.layers),
        "image_size": [height, width],
        "channels": list(extractor.out_dims),
        "grids": [list(feature.shape[-2:]) for feature in features],
    }


def check_format(metadata: dict[str, Any], what: str, remake: str) -> None:
    """Refuse a file of another format than this release's, naming how to remake or read it.

    Example:
        >>> check_format({"format_version": FORMAT_VERSION}, "references", "resad references ...")  # accepted
    """
    version = metadata.get("format_version", 1)
    if version > FORMAT_VERSION:
        msg = (
            f"{what} was made by a newer anomalib-resad (format {version}; this release reads {FORMAT_VERSION}). "
            "Upgrade anomalib-resad (pip install --upgrade anomalib-resad), or make it again with this release."
        )
        raise ResADInputError(msg)
    if version < FORMAT_VERSION:
        msg = (
            f"{what} was made by an older anomalib-resad (format {version}, this one reads {FORMAT_VERSION}). {remake}"
        )
        raise ResADInputError(msg)


def check_signature(expected: dict[str, Any], found: dict[str, Any], what: str) -> None:
    """Raise a clear error when references were made for a different model (backbone, levels or image size)."""
    problems = [
        f"{key}: references {found.get(key)!r}, model {expected[key]!r}"
        for key in ("backbone", "layers", "image_size", "channels")
        if found.get(key) != expected[key]
    ]
    if problems:
        msg = (
            f"{what} was made for another model ({'; '.join(problems)}). Make the references again with this model: "
            "resad references --model <exported model folder or checkpoint> --images <folder> --output <file>."
        )
        raise ResADInputError(msg)


def save_references(
    path: str | Path, bank: ReferenceBank, signature: dict[str, Any], selection: ReferenceSelection
) -> Path:
    """Write a references file (``.npz``: one array per level + JSON metadata) readable without torch."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if bank.scoring is None:
        msg = "Only calibrated banks can be saved: make the bank with ResADModel.make_reference_bank."
        raise ValueError(msg)
    metadata = {
        "format_version": FORMAT_VERSION,
        **signature,
        "k": bank.k,
        "views": bank.views,
        "reference_grids": [list(grid) for grid in bank.grids],
        "selection": selection.to_dict(),
    }
    arrays = {f"reference_{level}": features.detach().cpu().numpy() for level, features in enumerate(bank.levels)}
    arrays.update(
        {
            f"scoring_{name}": value.detach().cpu().numpy().astype(np.float32)
            for name, value in bank.scoring.tensors().items()
        }
    )
    with path.open("wb") as file:
        np.savez(file, metadata=np.array(json.dumps(metadata)), **arrays)
    logger.info("Wrote references of class '%s' (k=%d) to %s", selection.class_name, bank.k, path)
    return path


def load_references(path: str | Path, expected: dict[str, Any] | None = None) -> tuple[ReferenceBank, dict]:
    """Read a references file; with ``expected`` (a model signature) refuse references made for another model.

    Returns:
        tuple[ReferenceBank, dict]: The calibrated bank (numpy-backed tensors) and the file's metadata.

    Raises:
        ResADInputError: Not a references file, an older format, another model's, or arrays of the wrong shape.
    """
    path = Path(path)
    remake = (
        "Make it again with: resad references --model <deployment or checkpoint> --images <folder> --output <file>."
    )
    try:
        with np.load(path, allow_pickle=False) as content:
            metadata = json.loads(str(content["metadata"]))
            check_format(metadata, f"References file '{path}'", remake)  # before the arrays: laid out otherwise there
            levels = [content[f"reference_{level}"] for level in range(len(metadata["layers"]))]
            scoring = {name: content[f"scoring_{name}"] for name in Scoring.names() if f"scoring_{name}" in content}
    except ResADInputError:
        raise
    except (OSError, KeyError, ValueError, AttributeError) as error:
        msg = f"'{path}' is not a ResAD references file ({error}). Make one with: resad references ..."
        raise ResADInputError(msg) from error
    if expected is not None:
        check_signature(expected, metadata, f"References file '{path}'")
    _check_shapes(path, levels, scoring, metadata)
    bank = ReferenceBank(
        levels=[torch.from_numpy(np.ascontiguousarray(level, dtype=np.float32)) for level in levels],
        grids=[tuple(grid) for grid in metadata["reference_grids"]],
        k=int(metadata["k"]),
        views=[int(count) for count in metadata["views"]],
        scoring=Scoring.from_tensors({name: torch.from_numpy(value) for name, value in scoring.items()}),
    )
    return bank, metadata


def _check_shapes(
    path: Path, levels: list[np.ndarray], scoring: dict[str, np.ndarray], metadata: dict[str, Any]
) -> None:
    """Arrays must be ``(k * views_l * H_l * W_l, C_l)`` per level and a complete scoring record."""
    problems = []
    k = int(metadata.get("k", 0))
    views = metadata.get("views", [])
    if len(views) != len(levels):
        problems.append(f"views lists {len(views)} levels, the file holds {len(levels)}")
        views = [1] * len(levels)
    for level, (array, channels, grid, count) in enumerate(
        zip(levels, metadata["channels"], metadata["reference_grids"], views, strict=True)
    ):
        expected = (k * int(count) * int(grid[0]) * int(grid[1]), int(channels))
        if tuple(array.shape) != expected:
            problems.append(f"reference_{level} is {tuple(array.shape)}, expected {expected}")
    missing = [name for name in Scoring.names() if name not in scoring]
    if missing:
        problems.append(f"its scoring record lacks {missing}")
    elif tuple(scoring["level_constants"].shape) != (len(levels),):
        problems.append(f"level_constants is {tuple(scoring['level_constants'].shape)}, expected ({len(levels)},)")
    non_finite = [f"reference_{level}" for level, array in enumerate(levels) if not np.isfinite(array).all()]
    non_finite += [f"scoring {name}" for name, array in scoring.items() if not np.isfinite(array).all()]
    if non_finite:
        problems.append(f"{', '.join(non_finite)} hold non-finite values (NaN or infinity)")
    if problems:
        msg = f"References file '{path}' is damaged: {'; '.join(problems)}. Make it again with: resad references ..."
        raise ResADInputError(msg)


class ReferenceConditionedModel(nn.Module):
    """``image, reference_0..L-1, <scoring record> -> (pred_score, pred_label, anomaly_map, pred_mask)``.

    The class's :class:`~anomalib_resad.calibration.Scoring` comes in as one named input per field.
    """

    def __init__(self, model: ResAD) -> None:
        super().__init__()
        self.pre_processor = model.pre_processor
        self.model = model.model
        self.post_processor = model.post_processor

    def forward(
        self, image: torch.Tensor, references: list[torch.Tensor], scoring: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, ...]:
        """Score ``image`` (float ``[0, 1]``, ``(B, 3, H, W)``) against a class's bank and scoring record."""
        image = self.pre_processor(image) if self.pre_processor is not None else image
        output = self.model(image, reference_bank=references, scoring=Scoring(**scoring))
        if self.post_processor is not None:
            output = self.post_processor(output)
        return tuple(value for value in output if value is not None)


class ReferenceEncoder(nn.Module):
    """``images (k, 3, H, W) in [0, 1] -> reference_0..L-1`` (the bank of those k images)."""

    def __init__(self, model: ResAD) -> None:
        super().__init__()
        self.pre_processor = model.pre_processor
        self.feature_extractor = model.model.feature_extractor

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Flattened per-level features of the reference images."""
        images = self.pre_processor(images) if self.pre_processor is not None else images
        return tuple(flatten_levels(self.feature_extractor(images)))


class ReferenceCalibrator(nn.Module):
    """``image (B, 3, H, W), reference_0..L-1, level_constants -> uncalibrated score components``.

    Exported next to the conditioned model so that ``resad references`` can calibrate a new class with OpenVINO alone:
    :func:`~anomalib_resad.calibration.leave_one_out_scoring` runs it on each reference image against the bank of
    the others, exactly as eager PyTorch does.
    """

    OUTPUTS = (
        "anomaly_map",
        "map_max",
        "dissimilarity",
        "level_max_log_likelihood",
        "nearest",
        "reverse_dissimilarity",
        "averaged_nearest",
        "nearest_map",
        "averaged_map",
    )

    def __init__(self, model: ResAD) -> None:
        super().__init__()
        self.pre_processor = model.pre_processor
        self.model = model.model

    def forward(
        self, image: torch.Tensor, references: list[torch.Tensor], level_constants: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """Score components of ``image`` against ``references`` with the given per-level constants."""
        image = self.pre_processor(image) if self.pre_processor is not None else image
        features = self.model.feature_extractor(image)
        parts = self.model.score_components(features, references, level_constants, image.shape[-2:])
        return tuple(getattr(parts, name) for name in self.OUTPUTS)


def _load_model(model: ResAD | str | Path) -> ResAD:
    if isinstance(model, ResAD):
        return model.eval()
    path = Path(model)
    if not path.is_file():
        msg = f"Checkpoint '{path}' does not exist."
        raise ResADInputError(msg)
    return ResAD.load_from_checkpoint(path, map_location="cpu").eval()


def _export_onnx(
    module: nn.Module, arguments: tuple, path: Path, names: tuple[list[str], list[str]], dynamic: Any
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with quiet_export():
        torch.onnx.export(
            module,
            arguments,
            str(path),
            input_names=names[0],
            output_names=names[1],
            dynamic_shapes=dynamic,
            dynamo=True,
            opset_version=ONNX_OPSET_VERSION,
            verbose=False,
        )
    return path


def export_deployment(
    model: ResAD | str | Path,
    export_root: str | Path,
    example_k: int = 2,
) -> Path:
    """Export the reference-conditioned model, the reference encoder and calibrator to ONNX and OpenVINO.

    Args:
        model (ResAD | str | Path): A trained ResAD or its checkpoint.
        export_root (str | Path): Output folder (``model``, ``reference_encoder``, ``reference_calibrator`` as
            ``openvino/*.xml`` and ``onnx/*.onnx``, plus ``metadata.json``).
        example_k (int): k of the example bank used for tracing (any k works at run time). Defaults to ``2``.

    Returns:
        Path: ``export_root``.
    """
    import openvino as ov

    resad = _load_model(model)
    signature = model_signature(resad)
    export_root = Path(export_root)
    height, width = signature["image_size"]
    levels = len(signature["layers"])
    images = torch.rand(2, 3, height + 16, width + 32)  # any input size: the graph resizes (like anomalib's exports)
    encoder = ReferenceEncoder(resad).eval()
    with torch.no_grad():
        example_bank = list(encoder(torch.rand(example_k, 3, height, width)))
    example_scoring = {name: torch.ones_like(value) for name, value in Scoring.neutral(levels).tensors().items()}
    conditioned = ReferenceConditionedModel(resad).eval()
    calibrator = ReferenceCalibrator(resad).eval()
    output_names = ["pred_score", "pred_label", "anomaly_map", "pred_mask"]
    with torch.no_grad():
        produced = conditioned(images, example_bank, example_scoring)
    output_names = output_names[: len(produced)]
    batch = torch.export.Dim("batch", min=1, max=1024)
    image_height, image_width = (
        torch.export.Dim("height", min=32, max=8192),
        torch.export.Dim("width", min=32, max=8192),
    )
    # k images of the model's grid per level: the averaged matching reshapes a bank into its k feature maps
    bank_k = torch.export.Dim("bank_k", min=1, max=1024)
    rows = [bank_k * (grid_height * grid_width) for grid_height, grid_width in signature["grids"]]
    reference_names = [f"reference_{level}" for level in range(levels)]
    image_axes = {0: batch, 2: image_height, 3: image_width}
    written = [
        _export_onnx(
            conditioned,
            (images, example_bank, example_scoring, {}),  # a last dict would be read as keyword arguments
            export_root / "onnx" / f"{MODEL_FILE}.onnx",
            (["image", *reference_names, *example_scoring], output_names),
            {
                "image": image_axes,
                "references": [{0: row} for row in rows],
                "scoring": dict.fromkeys(example_scoring),
            },
        ),
        _export_onnx(
            encoder,
            (torch.rand(example_k, 3, height, width),),
            export_root / "onnx" / f"{ENCODER_FILE}.onnx",
            (["images"], reference_names),
            {"images": {0: torch.export.Dim("k", min=1, max=1024)}},
        ),
        _export_onnx(
            calibrator,
            (images, example_bank, example_scoring["level_constants"]),
            export_root / "onnx" / f"{CALIBRATOR_FILE}.onnx",
            (["image", *reference_names, "level_constants"], list(ReferenceCalibrator.OUTPUTS)),
            {"image": image_axes, "references": [{0: row} for row in rows], "level_constants": None},
        ),
    ]
    (export_root / "openvino").mkdir(parents=True, exist_ok=True)
    for source in list(written):
        # ov.save_model compresses weights to fp16 by default: keep f32, as anomalib does without FP16 compression
        target = export_root / "openvino" / f"{source.stem}.xml"
        ov.save_model(ov.convert_model(source), target, compress_to_fp16=False)
        written.append(target)
    generator = resad.model.anomaly_map_generator
    metadata = {
        "format_version": FORMAT_VERSION,
        **signature,
        "outputs": output_names,
        "scoring": generator.scoring,  # baked into the graph, as is the sensitivity
        "sensitivity": generator.sensitivity,
        "views": resad.model.bank_views(signature["image_size"]),
    }
    (export_root / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    written.append(export_root / METADATA_FILE)
    print("Wrote " + ", ".join(str(file) for path in written for file in written_files(path)))  # .onnx.data, .bin
    return export_root


def bake_references(model: ResAD | str | Path, references: str | Path) -> ResAD:
    """Return the model with a references file's calibrated bank stored in it (for ``anomalib``-style exports)."""
    resad = _load_model(model)
    bank, metadata = load_references(references, model_signature(resad))
    resad.model.set_references(bank)
    resad.references.stored = ReferenceSelection.from_dict(metadata["selection"])
    return resad


def make_references(
    model: str | Path | ResAD,
    images: str | Path,
    output: str | Path,
    k: int | None = None,
    class_name: str | None = None,
    device: str = "CPU",
) -> Path:
    """Turn a folder of k normal images of a class into a references file (bank + scoring record) for a trained ResAD.

    Args:
        model (str | Path | ResAD): An exported deployment folder (uses its OpenVINO reference encoder and
            calibrator: no torch checkpoint needed), a checkpoint, or a ResAD.
        images (str | Path): Folder of normal images of the class (its first ``k`` in sorted order are used).
        output (str | Path): The references file to write (``.npz``).
        k (int | None): Number of images (at least 2). Defaults to all images of the folder.
        class_name (str | None): Name of the class. Defaults to the folder's name (``<class>/train/good``: the class).
        device (str): OpenVINO device for an exported encoder. Defaults to ``"CPU"``.

    Returns:
        Path: ``output``.
    """
    folder = Path(images)
    class_name = class_name or folder_class_name(folder)
    selection = select_folder_references(images, k, class_name)
    model_dir = Path(model) if not isinstance(model, ResAD) else None
    if model_dir is not None and model_dir.is_dir():
        bank, signature = _openvino_reference_bank(model_dir, selection, device)
    else:
        resad = _load_model(model)
        signature = model_signature(resad)
        transform = resad.pre_processor.transform if resad.pre_processor is not None else None
        images = load_images(selection.paths, transform, references_for=resad.input_size)
        bank = resad.model.make_reference_bank(images)
    path = save_references(output, bank, signature, selection)
    print(f"Wrote {path} (class '{selection.class_name}', k={selection.k}, from {selection.source})")
    return path


def _openvino_reference_bank(
    model_dir: Path, selection: ReferenceSelection, device: str
) -> tuple[ReferenceBank, dict[str, Any]]:
    """Encode and calibrate reference images with the exported OpenVINO encoder and calibrator."""
    import openvino as ov

    metadata = _read_metadata(model_dir)
    signature = {key: metadata[key] for key in ("backbone", "layers", "image_size", "channels", "grids")}
    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": "f32"} if device == "CPU" else {}
    encoder = core.compile_model(core.read_model(model_dir / "openvino" / f"{ENCODER_FILE}.xml"), device, config)
    calibrator = core.compile_model(core.read_model(model_dir / "openvino" / f"{CALIBRATOR_FILE}.xml"), device, config)
    # images of any size: resize each like the exported pre-processing does (bilinear), then encode as a batch
    resize = Resize(signature["image_size"], antialias=False)
    images = load_images(selection.paths, transform=resize, references_for=signature["image_size"])
    pixels = images.numpy()
    # the bank holds each image's views (as eager PyTorch's: the same function), calibrated leave-one-out by image
    views = [int(count) for count in metadata["views"]]
    grids = [tuple(grid) for grid in signature["grids"]]
    encoded = [
        np.asarray(level) for level in encoder(reference_views(images, views_mode(images.shape[-2:])).numpy()).values()
    ]
    # (k * views_l, positions, channels): the levels without views keep each image's first view (as eager's)
    per_image = keep_views([level.reshape(len(pixels) * max(views), -1, level.shape[-1]) for level in encoded], views)
    levels = [np.ascontiguousarray(level.reshape(-1, level.shape[-1])) for level in per_image]

    def score(images: np.ndarray, index: int, constants: torch.Tensor) -> ScoreComponents:
        others = [
            np.ascontiguousarray(level[rows].reshape(-1, level.shape[-1]))
            for level, rows in zip(per_image, leave_one_out_rows(len(pixels), views, index), strict=True)
        ]
        inputs = {"image": images, "level_constants": constants.numpy().astype(np.float32)}
        inputs.update({f"reference_{level}": bank for level, bank in enumerate(others)})
        named = {port.get_any_name(): np.asarray(value) for port, value in calibrator(inputs).items()}
        return ScoreComponents(**{name: torch.from_numpy(named[name]) for name in ReferenceCalibrator.OUTPUTS})

    def score_reference(index: int, constants: torch.Tensor) -> ScoreComponents:
        return score(pixels[index : index + 1], index, constants)

    defects = synthetic_defects(torch.from_numpy(pixels)).numpy()  # eager's defects (in each image's value range)

    def score_defects(index: int, constants: torch.Tensor) -> ScoreComponents:
        return score(np.ascontiguousarray(defects[index]), index, constants)

    scoring = leave_one_out_scoring(score_reference, len(pixels), len(levels), score_defects)
    bank = ReferenceBank(
        levels=[torch.from_numpy(level) for level in levels], grids=grids, k=selection.k, views=views, scoring=scoring
    )
    return bank, signature


def _read_metadata(model_dir: Path) -> dict[str, Any]:
    path = model_dir / METADATA_FILE
    if not path.is_file():
        msg = f"'{model_dir}' is not a ResAD deployment folder (no {METADATA_FILE}). Make one with: resad export ..."
        raise ResADInputError(msg)
    metadata = json.loads(path.read_text())
    remake = (
        "Export it again with: resad export --checkpoint <model.ckpt> --export_root <folder>, then remake its "
        "references with resad references."
    )
    check_format(metadata, f"Deployment '{model_dir}'", remake)
    return metadata


class ReferenceConditionedInferencer(OpenVINOInferencer):
    """anomalib's ``OpenVINOInferencer`` for the reference-conditioned ResAD: one compiled model, many classes.

    Args:
        path (str | Path): Deployment folder written by :func:`export_deployment`.
        device (str): OpenVINO device. Defaults to ``"CPU"``.
        precision (str): Inference precision on CPU: ``"f32"`` (matches PyTorch) or ``"bf16"``/``"f16"`` where
            supported (faster, scores move by ~1e-2). Defaults to ``"f32"``.
        config (dict | None): Further OpenVINO compile options. Defaults to ``None``.
    """

    def __init__(
        self, path: str | Path, device: str = "CPU", precision: str = "f32", config: dict | None = None
    ) -> None:
        self.deployment = Path(path)
        self.metadata = _read_metadata(self.deployment)
        options = dict(config or {})
        if device == "CPU":
            options.setdefault("INFERENCE_PRECISION_HINT", precision)
        super().__init__(self.deployment / "openvino" / f"{MODEL_FILE}.xml", device=device, config=options)
        self.banks: dict[str, dict[str, np.ndarray]] = {}

    def add_class(self, class_name: str, references: str | Path) -> None:
        """Load the references file of a class (bank and scoring record, checked against the exported model)."""
        bank, _ = load_references(references, self.metadata)
        inputs = {f"reference_{level}": features.numpy() for level, features in enumerate(bank.levels)}
        inputs.update({name: value.numpy() for name, value in bank.scoring.tensors().items()})
        self.banks[class_name] = inputs

    def predict(
        self,
        image: str | Path | np.ndarray | PILImage | torch.Tensor,
        class_name: str | None = None,
    ) -> NumpyImageBatch:
        """Score an image (or an ``(N, H, W, 3)``/``(N, 3, H, W)`` batch) against the references of ``class_name``."""
        if class_name is None and len(self.banks) == 1:
            class_name = next(iter(self.banks))
        if class_name not in self.banks:
            msg = f"No references for class {class_name!r}; known classes: {sorted(self.banks)}. Call add_class first."
            raise ResADInputError(msg)
        if isinstance(image, str | Path):
            image = _read_query_image(image)
        elif isinstance(image, PILImage):
            image = np.array(image) / 255.0
        elif isinstance(image, torch.Tensor):
            image = image.cpu().numpy()
        image = self.pre_process(image)
        inputs = {"image": image, **self.banks[class_name]}
        predictions = self.post_process(self.model(inputs))
        return NumpyImageBatch(image=image, **predictions)


def _read_query_image(path: str | Path) -> np.ndarray:
    """Read an image to score, with a one-line error naming a missing or unreadable file."""
    if not Path(path).is_file():
        msg = f"Image '{path}' does not exist."
        raise ResADInputError(msg)
    try:
        return read_rgb(path, as_tensor=False)
    except (OSError, ValueError) as error:
        msg = f"Cannot read image '{path}' ({error}): it is corrupt or not an image."
        raise ResADInputError(msg) from error


def export_model(
    checkpoint: str,
    export_root: str,
    references: str | None = None,
    export_types: Sequence[str] = ("openvino",),
) -> Path:
    """``resad export``: the deployment folder (references as model inputs), or a baked export of another class.

    Args:
        checkpoint (str): A trained ResAD checkpoint.
        export_root (str): Output folder.
        references (str | None): A references file: export a model with *that* class's references baked in
            (anomalib's standard export, for ``OpenVINOInferencer``/``TorchInferencer``). Defaults to ``None``: export
            the reference-conditioned deployment (model + reference encoder + metadata).
        export_types (Sequence[str]): With ``references``: any of ``openvino``, ``onnx``, ``torch``.

    Returns:
        Path: ``export_root``.
    """
    if references is None:
        return export_deployment(checkpoint, export_root)
    resad = bake_references(checkpoint, references)
    for export_type in export_types:
        exporter = {"openvino": resad.to_openvino, "onnx": resad.to_onnx, "torch": resad.to_torch}.get(export_type)
        if exporter is None:
            msg = f"Unknown export type '{export_type}': use openvino, onnx or torch."
            raise ResADConfigurationError(msg)
        exporter(export_root)
    return Path(export_root)
