# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""ResAD as an anomalib model: training on source classes, k-shot inference on any class.

Training (``anomalib train --model ResAD ...`` or ``Engine().fit``) follows the reference code's recipe: for every
class present in a batch, ``train_k`` normal images of that class are drawn afresh from the training split, each
query feature is turned into a residual against them, the Feature Constraintor is trained with the OCC loss and the
flows by maximum likelihood. The first ``first_stage_epochs`` epochs use normal images only; later epochs also use the
anomalous images (with masks) that the datamodule puts in the training split - the source classes' test anomalies in
the class-generalization protocol (:mod:`anomalib_resad.data`), or synthetic anomalies with
``synthetic_anomalies=True`` for a plain single-category datamodule whose training split is all normal.

Inference (validation, test, predict, export) scores each image against the calibrated reference bank of its class:
``k`` images drawn with ``reference_seed`` from the class's training split, or the first ``k`` images of
``reference_dir``. Every bank comes from one place, :class:`~anomalib_resad.class_references.ClassReferences`, which
also measures the class's scoring record from those k images (leave-one-out) and routes each class to its bank. The
bank of the evaluated class is stored in the checkpoint together with the list of reference files.

Why ``LearningType.ONE_CLASS``: anomalib's Engine skips ``fit`` for few-shot learning types (it only validates), so a
few-shot type would make ``anomalib train --model ResAD`` score with untrained flows. ResAD *is* trained; it is
few-shot only at inference, which the reference bank handles.

Example:
    >>> from anomalib.data import Folder  # doctest: +SKIP
    >>> from anomalib.engine import Engine  # doctest: +SKIP
    >>> from anomalib_resad import ResAD  # doctest: +SKIP
    >>> model = ResAD(backbone="wide_resnet50_2", k=4)  # doctest: +SKIP
    >>> Engine(max_epochs=100).train(model, datamodule=Folder(...))  # doctest: +SKIP
"""

import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from anomalib import LearningType
from anomalib.data import Batch, InferenceBatch
from anomalib.data.utils.generators.perlin import PerlinAnomalyGenerator
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch import Callback
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn
from torch.nn import functional as F  # noqa: N812
from torch.optim.lr_scheduler import MultiStepLR
from torchvision.transforms.v2 import Compose, Normalize, Resize

from .anomaly_map import SCORINGS
from .calibration import SENSITIVITY, Scoring
from .checkpoint_settings import TRAINED_SETTINGS, normalize_value
from .class_references import ClassReferences
from .data.checks import check_folder_paths
from .errors import ResADConfigurationError, ResADInputError, check_choice
from .export_output import ONNX_OPSET_VERSION, announce_written, quiet_export
from .feature_extractor import backbone_normalization
from .images import is_high_bit_depth
from .loss import ResADLoss
from .post_processor import CalibratedPostProcessor
from .predictions import PredictionsCsv, VerdictVisualizer
from .references import ReferenceSelection, check_image_files, check_k, folder_class_name
from .torch_model import ResADModel

logger = logging.getLogger(__name__)

CATEGORY_COLUMN = "category"


def datamodule_class_name(datamodule: object) -> str:
    """The class (category) a single-category anomalib datamodule holds: its ``category``, else its ``name``."""
    return str(getattr(datamodule, "category", "") or getattr(datamodule, "name", "") or "default")


class ResAD(AnomalibModule):
    """ResAD: residual-feature anomaly detection that generalizes to unseen classes from k normal images.

    Args:
        backbone (str): timm backbone. Defaults to ``"wide_resnet50_2"`` (reference).
        layers (Sequence[str]): Feature levels, shallow to deep. Defaults to ``("layer1", "layer2", "layer3")``.
        pre_trained (bool | str): ``True`` for timm's weights (downloaded), ``False``, or a local weights file.
            Defaults to ``True``.
        image_size (int | tuple[int, int]): Input size of the default pre-processor. Defaults to ``224`` (reference).
        k (int): Reference images per class at inference (at least 2: the class's threshold is set from them by
            leave-one-out). Defaults to ``4``.
        reference_dir (str | None): Folder of reference images (the first ``k`` in sorted order) instead of a draw
            from the class's training split. Defaults to ``None``.
        reference_seed (int): Seed of that draw. Defaults to ``42``.
        scoring (str): ``"fused"`` (the flows' map and the nearest-neighbour map averaged), ``"nearest"`` (matching
            alone: no trained part) or ``"paper"`` (the flows' map alone, the reference's scoring); see
            :mod:`~anomalib_resad.anomaly_map`. Defaults to ``"fused"``.
        sensitivity (float): Where a class's boundary sits between its references' largest leave-one-out score (1:
            most defects caught, most false alarms; never below 1.04 x that score) and the median of their synthetic
            defects (0). Defaults to ``0.35`` (chosen on source-validation images;
            :func:`~anomalib_resad.calibration.boundary`).
        train_k (int): References drawn per class per training batch. Defaults to ``4`` (reference).
        residual (str): ``"squared"`` (reference code) or ``"difference"`` (paper). Defaults to ``"squared"``.
        occ_loss (str): ``"log_barrier"`` (reference code) or ``"paper"`` (NeurIPS Eq. 2). Defaults to
            ``"log_barrier"``.
        coupling_layers (int): Coupling blocks per flow. Defaults to ``10`` (reference code).
        pos_embed_dim (int): Positional-encoding dimension of the flows' condition. Defaults to ``256``.
        first_stage_epochs (int): Epochs trained on normal images only. Defaults to ``10`` (reference).
        synthetic_anomalies (bool): After the first stage, add anomalib's Perlin-noise anomalies to normal training
            images (for datamodules without real training anomalies). Defaults to ``False``.
        lr (float): Adam learning rate. Defaults to ``1e-5`` (reference).
        weight_decay (float): Adam weight decay. Defaults to ``5e-4`` (reference).
        lr_milestones (Sequence[int]): Epochs at which the learning rate drops tenfold. Defaults to ``(70, 90)``.
        flow_positions (int | None): Random positions per level each flow learns from per step; ``None``: all.
            Defaults to ``8192`` (the reference's flow chunk).
        pre_processor (PreProcessor | bool): Defaults to resize to ``image_size`` + the backbone's normalisation.
        post_processor (PostProcessor | bool): Defaults to :class:`CalibratedPostProcessor` (per-class thresholds).
        evaluator (Evaluator | bool): Defaults to anomalib's image/pixel AUROC and F1.
        visualizer (Visualizer | bool): Defaults to anomalib's ``ImageVisualizer``.

    Example:
        >>> model = ResAD(backbone="tf_efficientnet_lite0", layers=["blocks.1", "blocks.2", "blocks.4"],
        ...               pre_trained=False, coupling_layers=2, pos_embed_dim=32)
        >>> model.learning_type.value
        'one_class'
    """

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        layers: Sequence[str] = ("layer1", "layer2", "layer3"),
        pre_trained: bool | str = True,
        image_size: int | tuple[int, int] = 224,
        k: int = 4,
        reference_dir: str | None = None,
        reference_seed: int = 42,
        scoring: str = "fused",
        sensitivity: float = SENSITIVITY,
        train_k: int = 4,
        residual: str = "squared",
        occ_loss: str = "log_barrier",
        coupling_layers: int = 10,
        pos_embed_dim: int = 256,
        first_stage_epochs: int = 10,
        synthetic_anomalies: bool = False,
        lr: float = 1e-5,
        weight_decay: float = 5e-4,
        lr_milestones: Sequence[int] = (70, 90),
        flow_positions: int | None = 8192,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        if k < 2:
            msg = (
                f"k={k}: ResAD needs at least 2 reference images per class at inference - it sets the class's "
                "threshold by scoring each reference against the others. Use k >= 2 (the reference uses 2, 4, 8)."
            )
            raise ResADConfigurationError(msg)
        if train_k < 1:
            msg = f"train_k must be >= 1, got {train_k}."
            raise ResADConfigurationError(msg)
        if pos_embed_dim % 4:
            msg = f"pos_embed_dim must be a multiple of 4 (sin/cos in two axes), got {pos_embed_dim}."
            raise ResADConfigurationError(msg)
        check_choice("scoring", scoring, SCORINGS)
        if pre_processor is True:
            pre_processor = self.configure_pre_processor(image_size=image_size, backbone=backbone)
        super().__init__(
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        self.model = self._build_model(pre_trained)
        self.loss = self._build_loss()
        self.k = k
        self.reference_seed = reference_seed
        self.reference_dir = reference_dir
        self.train_k = train_k
        self.first_stage_epochs = first_stage_epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.lr_milestones = list(lr_milestones)
        self.flow_positions = flow_positions
        self.anomaly_generator = PerlinAnomalyGenerator(probability=0.5) if synthetic_anomalies else None
        self.references = self._build_references()
        self._class_of_path: dict[str, str] = {}
        self._default_class = "default"
        self._checked_paths: set[str] = set()
        self._train_rng = random.Random(reference_seed)

    # ------------------------------------------------------------------ anomalib configuration
    @classmethod
    def configure_pre_processor(
        cls,
        image_size: int | tuple[int, int] | None = None,
        backbone: str = "wide_resnet50_2",
    ) -> PreProcessor:
        """Resize to ``image_size`` (default 224) and normalise with the statistics the backbone was trained with.

        Args:
            image_size (int | tuple[int, int] | None): Input size. Defaults to ``224``.
            backbone (str): timm backbone name (selects mean/std). Defaults to ``"wide_resnet50_2"``.

        Returns:
            PreProcessor: The pre-processor.
        """
        size = image_size or 224
        size = (size, size) if isinstance(size, int) else tuple(size)
        mean, std = backbone_normalization(backbone)
        # antialias=False: the exported graph resizes without antialiasing (anomalib turns it off for export), and
        # references are data: they must be made from exactly the pixels queries are made from, in every runtime.
        return PreProcessor(transform=Compose([Resize(size, antialias=False), Normalize(mean=mean, std=std)]))

    @staticmethod
    def configure_post_processor() -> PostProcessor:
        """Thresholds from each class's own references (:class:`CalibratedPostProcessor`), not from validation."""
        return CalibratedPostProcessor()

    @classmethod
    def configure_visualizer(cls) -> VerdictVisualizer:
        """Anomalib's image visualizer, each picture captioned with its score, verdict and class."""
        return VerdictVisualizer()

    def configure_callbacks(self) -> list[Callback]:
        """Anomalib's components, then ``predictions.csv`` of predict and test runs (after the verdicts are set)."""
        callbacks = super().configure_callbacks()
        return [*(callbacks if isinstance(callbacks, list | tuple) else [callbacks]), PredictionsCsv()]

    def _build_model(self, pre_trained: bool | str) -> ResADModel:
        """The network these hyper-parameters describe (``pre_trained=False`` where a checkpoint fills it)."""
        hparams = self.hparams
        return ResADModel(
            backbone=hparams["backbone"],
            layers=hparams["layers"],
            pre_trained=pre_trained,
            residual=hparams["residual"],
            coupling_layers=hparams["coupling_layers"],
            pos_embed_dim=hparams["pos_embed_dim"],
            scoring=hparams["scoring"],
            sensitivity=hparams["sensitivity"],
        )

    def _build_loss(self) -> ResADLoss:
        return ResADLoss(num_levels=self.model.num_levels, occ_loss=self.hparams["occ_loss"])

    def _build_references(self, pools: dict[str, list[str]] | None = None) -> ClassReferences:
        """The references room of :attr:`model`, its images pre-processed as the model's pre-processor does."""
        transform = self.pre_processor.transform if isinstance(self.pre_processor, PreProcessor) else None
        references = ClassReferences.for_model(self.model, transform)
        references.set_pools(pools or {})
        return references

    @property
    def learning_type(self) -> LearningType:
        """``ONE_CLASS``: anomalib must run ``fit`` (few-shot types skip it), see the module docstring."""
        return LearningType.ONE_CLASS

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """No sanity validation: references are prepared at the real validation start."""
        return {"num_sanity_val_steps": 0}

    def configure_optimizers(self) -> dict[str, Any]:
        """One Adam over the Feature Constraintor and the flows, with the reference's step schedule.

        The reference uses three Adams with identical settings; Adam is per parameter, so one optimizer over their
        union is the same update.
        """
        parameters = [parameter for parameter in self.model.parameters() if parameter.requires_grad]
        optimizer = torch.optim.Adam(parameters, lr=self.lr, weight_decay=self.weight_decay)
        scheduler = MultiStepLR(optimizer, milestones=self.lr_milestones, gamma=0.1)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: str | Path, *args: Any, **kwargs: Any) -> "ResAD":
        """Load a trained ResAD: tensors and plain data only (``weights_only=True``: no code in the file runs).

        Backbone weights come from the checkpoint, so nothing is downloaded.
        """
        kwargs.setdefault("pre_trained", False)
        kwargs["weights_only"] = True
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    # ------------------------------------------------------------------ export
    def _announce_exported_class(self) -> None:
        """Calibrate a stale stored bank again; say which class's references an anomalib export bakes in."""
        self._refresh_stored_scoring()  # e.g. exported in memory right after a fit with no evaluation since
        stored = self.references.stored
        if stored is not None:
            print(f"Exporting ResAD with the references of class '{stored.class_name}' baked in (k={stored.k}).")
        elif self.model.feature_converter.has_references:
            print("Exporting ResAD with the references stored in the model baked in (their class is not recorded).")

    def to_onnx(
        self,
        export_root: Path | str,
        model_file_name: str = "model",
        input_size: tuple[int, int] | None = None,
        **kwargs: Any,
    ) -> Path:
        """Export to ONNX as anomalib does, quietly (:mod:`~anomalib_resad.export_output`), at opset 18 by default.

        Args:
            export_root (Path | str): Output folder (the file goes to ``weights/onnx/``).
            model_file_name (str): File name without suffix. Defaults to ``"model"``.
            input_size (tuple[int, int] | None): Fixed input size; dynamic when ``None``. Defaults to ``None``.
            **kwargs (Any): Passed to ``torch.onnx.export`` (``opset_version`` defaults to 18, ``verbose`` to
                ``False``).

        Returns:
            Path: The ONNX file.
        """
        kwargs.setdefault("opset_version", ONNX_OPSET_VERSION)
        kwargs.setdefault("verbose", False)
        with quiet_export() as outermost:
            if outermost:
                self._announce_exported_class()
            path = super().to_onnx(export_root, model_file_name, input_size, **kwargs)
        if outermost:
            announce_written("ONNX", path)
        return path

    def to_openvino(self, export_root: Path | str, *args: Any, **kwargs: Any) -> Path:
        """Export to OpenVINO as anomalib does (through the quiet :meth:`to_onnx`); print the files written.

        Args:
            export_root (Path | str): Output folder (the files go to ``weights/openvino/``).
            *args (Any): anomalib's ``to_openvino`` arguments.
            **kwargs (Any): anomalib's ``to_openvino`` keyword arguments.

        Returns:
            Path: The OpenVINO ``.xml`` file.
        """
        with quiet_export() as outermost:
            if outermost:
                self._announce_exported_class()
            path = super().to_openvino(export_root, *args, **kwargs)
        if outermost:
            announce_written("OpenVINO", path)
        return path

    def to_torch(self, export_root: Path | str, *args: Any, **kwargs: Any) -> Path:
        """Export to Torch as anomalib does; print the file written.

        Args:
            export_root (Path | str): Output folder (the file goes to ``weights/torch/``).
            *args (Any): anomalib's ``to_torch`` arguments.
            **kwargs (Any): anomalib's ``to_torch`` keyword arguments.

        Returns:
            Path: The ``.pt`` file.
        """
        self._announce_exported_class()
        path = super().to_torch(export_root, *args, **kwargs)
        announce_written("Torch", path)
        return path

    # ------------------------------------------------------------------ data bookkeeping
    def prepare_data(self) -> None:
        """Name a missing ``Folder`` path in one line before the datamodule's ``setup`` trips over it."""
        check_folder_paths(self._datamodule())

    def setup(self, stage: str) -> None:
        """Check the datamodule's images once, and learn which class each image belongs to."""
        datamodule = self._datamodule()
        if datamodule is None:
            return
        self._default_class = datamodule_class_name(datamodule)
        subsets = {"fit": ("train_data", "val_data"), "validate": ("val_data",), "test": ("test_data",)}
        paths: list[str] = []
        for subset_name in ("train_data", "val_data", "test_data"):
            subset = getattr(datamodule, subset_name, None)
            if subset is None:
                continue
            samples = subset.samples
            classes = samples[CATEGORY_COLUMN] if CATEGORY_COLUMN in samples else [self._default_class] * len(samples)
            self._class_of_path.update(zip(samples.image_path.astype(str), map(str, classes), strict=True))
            if subset_name in subsets.get(stage, ()):
                paths.extend(samples.image_path.astype(str))
        unchecked = [path for path in paths if path not in self._checked_paths]
        check_image_files(unchecked)
        deep = [path for path in unchecked if is_high_bit_depth(path)]
        if deep:  # anomalib's datasets read them with PIL's convert("RGB"): clipped to 8 bits
            logger.warning(
                "%d image(s) hold more than 8 bits per pixel (e.g. %s): anomalib's datamodules read them clipped to "
                "8 bits (mostly white). ResAD's own readers scale them (references, resad references / serve); for "
                "training and testing through a datamodule, convert them to 8-bit images first.",
                len(deep),
                deep[0],
            )
        self._checked_paths.update(unchecked)
        pools = self._normal_pools(datamodule)
        self.references.set_pools(pools)
        if not self.reference_dir:  # every class's k references must exist: say so now, not after an epoch
            for name, pool in pools.items():
                if pool:
                    check_k(self.k, len(pool), f"the training split of class '{name}'")

    def _datamodule(self) -> Any:
        return getattr(self.trainer, "datamodule", None) if self._trainer is not None else None

    def class_of(self, path: str) -> str:
        """Class of an image file (its datamodule ``category`` column, else the datamodule's category)."""
        return self._class_of_path.get(str(path), self._default_class)

    def _normal_pools(self, datamodule: Any) -> dict[str, list[str]]:
        """Normal training images of every class the datamodule knows (where references are drawn from)."""
        train_data = getattr(datamodule, "train_data", None)
        if train_data is None:
            return {}
        samples = train_data.samples
        classes = set(samples[CATEGORY_COLUMN].astype(str)) if CATEGORY_COLUMN in samples else {self._default_class}
        classes |= set(getattr(datamodule, "target_categories", []))
        pools = {}
        for name in sorted(classes):
            if hasattr(datamodule, "reference_pool"):  # MultiClassDataModule: also knows the target classes' pools
                pools[name] = datamodule.reference_pool(name)
            else:
                normal = samples[samples.label_index == 0]
                pools[name] = sorted(normal.image_path.astype(str))
        return pools

    # ------------------------------------------------------------------ references
    @property
    def reference_selection(self) -> ReferenceSelection | None:
        """The reference images of the stored bank (saved in checkpoints, baked into exports)."""
        return self.references.stored

    def set_references(self, selection: ReferenceSelection, pinned: bool = True) -> None:
        """Make ``selection`` the stored, calibrated reference bank (the one used for inference and export).

        Args:
            selection (ReferenceSelection): The reference images of a class (k >= 2).
            pinned (bool): Keep these references for that class in later validation/test runs instead of drawing
                them from the datamodule. Defaults to ``True``.
        """
        self.model.set_references(self.references.bank(selection))
        self.references.store(selection, pinned)

    def _refresh_stored_scoring(self) -> bool:
        """Calibrate the stored bank again where training changed the flows since it was calibrated (``True``: done)."""
        if not self.references.needs_recalibration():
            return False
        self.set_references(self.references.stored, pinned=self.references.pinned)
        return True

    def select_references(self, class_name: str) -> ReferenceSelection:
        """The reference images of a class: the first ``k`` of ``reference_dir``, else a seeded draw from its pool."""
        return self.references.select(class_name, self.k, self.reference_seed, folder=self.reference_dir)

    def _prepare_eval_references(self, subset_name: str | None) -> None:
        """Before validation/test/predict: a calibrated bank for every class of the evaluated data, built once.

        ``reference_dir`` (one class) always wins - also for ``anomalib predict`` on a folder of images. References
        pinned with :meth:`set_references` are kept for their class; every other class gets
        :meth:`select_references` (:meth:`ClassReferences.prepare_evaluation`).
        """
        datamodule = self._datamodule()
        subset = getattr(datamodule, subset_name, None) if datamodule is not None and subset_name else None
        if subset is None:  # e.g. predict on a folder of images: the stored bank, or reference_dir's
            stored = self.references.stored
            if self.reference_dir:
                self.set_references(self.select_references(folder_class_name(self.reference_dir)), pinned=False)
            elif not self.model.feature_converter.has_references:
                msg = "This ResAD model holds no references: give --model.reference_dir or a trained checkpoint."
                raise ResADInputError(msg)
            else:
                self._refresh_stored_scoring()
                logger.warning(
                    "ResAD: no --model.reference_dir given: the images are scored as class '%s', against the "
                    "references stored in the model (%s). For another product, give --model.reference_dir <folder of "
                    "k normal images of it>.",
                    stored.class_name if stored is not None else "unknown",
                    stored.source if stored is not None and stored.source else "the checkpoint",
                )
            self._default_class = self.references.stored.class_name if self.references.stored else self._default_class
            return
        classes = [self.class_of(path) for path in subset.samples.image_path.astype(str)]
        to_store = self.references.prepare_evaluation(classes, self.select_references, bool(self.reference_dir))
        if to_store is not None:  # a new selection, or the pinned one calibrated again after training
            self.set_references(to_store, pinned=self.references.pinned and to_store is self.references.stored)

    def on_validation_start(self) -> None:
        """Prepare the calibrated reference banks of the validation classes."""
        self._prepare_eval_references("val_data")

    def on_test_start(self) -> None:
        """Prepare the calibrated reference banks of the test classes."""
        self._prepare_eval_references("test_data")

    def on_predict_start(self) -> None:
        """Prepare the reference bank for prediction (``reference_dir`` if given, else the stored one)."""
        self._prepare_eval_references(None)

    # ------------------------------------------------------------------ training
    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        """The flows changed: every class's scoring record is measured again where next needed (also mid-epoch)."""
        del args, kwargs
        self.references.forget_scoring()

    def on_fit_start(self) -> None:
        """Start with fresh reference features (the datamodule's pools are known from :meth:`setup`)."""
        self.references.clear()
        if self._datamodule() is None:
            msg = (
                "ResAD trains from a datamodule: add --data <datamodule>, e.g. --data MVTecAD --data.root "
                "./datasets/MVTecAD --data.category bottle, or --data anomalib_resad.data.MultiClassDataModule "
                "(see configs/settings/*.yaml)."
            )
            raise ResADInputError(msg)
        empty = sorted(name for name, pool in self.references.pools.items() if not pool)
        if not self.references.pools or empty:
            msg = (
                f"No normal training images of class(es) {empty or 'any'}: ResAD draws its training references from "
                "them. Use a datamodule whose training split holds normal images of every class."
            )
            raise ResADInputError(msg)
        rank = self.trainer.global_rank if self._trainer is not None else 0
        self._train_rng = random.Random(self.reference_seed + 7919 * rank)
        logger.info(
            "ResAD training on %d class(es) %s; first %d epoch(s) on normal images only; synthetic anomalies: %s.",
            len(self.references.pools),
            sorted(self.references.pools),
            self.first_stage_epochs,
            "on" if self.anomaly_generator is not None else "off",
        )

    def _training_inputs(self, batch: Batch) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Residuals (against fresh references of each image's class), their constrained form and per-level masks."""
        images = batch.image
        masks = batch.gt_mask if batch.gt_mask is not None else torch.zeros_like(images[:, 0])
        labels = batch.gt_label if batch.gt_label is not None else torch.zeros(len(images), device=images.device)
        paths = [str(path) for path in batch.image_path]
        masks = masks.reshape(len(images), *images.shape[-2:]).float()
        if self.current_epoch < self.first_stage_epochs:  # stage 1: normal images only
            keep = labels == 0
            images, masks = images[keep], masks[keep]
            paths = [path for path, kept in zip(paths, keep.tolist(), strict=True) if kept]
        elif self.anomaly_generator is not None:
            images, synthetic = self.anomaly_generator(images)
            masks = torch.maximum(masks, synthetic.reshape_as(masks).to(masks.dtype))
        if not len(images):
            return [], [], []
        features = self.model.feature_extractor(images)
        residuals = [torch.empty_like(feature) for feature in features]
        classes = [self.class_of(path) for path in paths]
        for class_name in sorted(set(classes)):
            index = torch.tensor([i for i, name in enumerate(classes) if name == class_name], device=images.device)
            bank = self.references.training_bank(class_name, self.train_k, self._train_rng)
            class_features = [feature[index] for feature in features]
            class_residuals = self.model.feature_converter(class_features, bank.levels, coverage=False).residuals
            for level, residual in enumerate(class_residuals):
                residuals[level][index] = residual
        level_masks = [F.interpolate(masks.unsqueeze(1), size=r.shape[-2:], mode="nearest")[:, 0] for r in residuals]
        return residuals, self.model.feature_constraintor(residuals), level_masks

    def training_step(self, batch: Batch, *args: Any, **kwargs: Any) -> STEP_OUTPUT:
        """One step of the reference recipe: the OCC loss and the flows' loss, one backward pass."""
        del args, kwargs  # These variables are not used.
        residuals, constrained, level_masks = self._training_inputs(batch)
        batch_size = len(batch.image)
        if not residuals:  # a first-stage batch without normal images: a zero loss that keeps DDP ranks in step
            zero = sum(parameter.sum() for parameter in self.model.parameters() if parameter.requires_grad) * 0.0
            return {"loss": zero}
        occ_loss = self.loss.occ_loss(constrained, residuals, level_masks)
        flow = self.model.residual_flow
        flow_loss = constrained[0].new_zeros(())
        for level, (feature, mask) in enumerate(zip(constrained, level_masks, strict=True)):
            vectors, conditions, position_mask = flow.sample_positions(feature.detach(), mask, self.flow_positions)
            log_normal, log_abnormal = flow.vector_log_likelihoods(level, vectors, conditions)
            flow_loss = flow_loss + self.loss.flow_loss(level, log_normal, log_abnormal, position_mask)
        self.log("train_occ_loss", occ_loss.detach(), on_epoch=True, on_step=False, batch_size=batch_size)
        self.log("train_flow_loss", flow_loss.detach(), on_epoch=True, on_step=False, batch_size=batch_size)
        total = occ_loss + flow_loss
        self.log("train_loss", total.detach(), on_epoch=True, on_step=False, prog_bar=True, batch_size=batch_size)
        return {"loss": total}

    # ------------------------------------------------------------------ evaluation
    def _predict(self, batch: Batch) -> InferenceBatch:
        """Score each image against its class's bank (the stored one, or a further class's of the evaluated data)."""
        paths = [str(path) for path in batch.image_path] if batch.image_path is not None else []
        classes = [self.class_of(path) for path in paths]
        banks = {name: self.references.bank_of(name) for name in set(classes)}
        if all(bank is None for bank in banks.values()):
            return self.model(batch.image)
        scores = torch.empty(len(classes), device=batch.image.device)
        maps = torch.empty(len(classes), 1, *batch.image.shape[-2:], device=batch.image.device)
        for class_name, bank in sorted(banks.items()):
            index = torch.tensor([i for i, name in enumerate(classes) if name == class_name], device=scores.device)
            if bank is None:
                output = self.model(batch.image[index])
            else:
                output = self.model(batch.image[index], bank.levels, bank.scoring.to(scores.device))
            scores[index], maps[index] = output.pred_score, output.anomaly_map
        return InferenceBatch(pred_score=scores, anomaly_map=maps)

    def validation_step(self, batch: Batch, *args: Any, **kwargs: Any) -> STEP_OUTPUT:
        """Score the batch against the reference bank of each image's class."""
        del args, kwargs  # These variables are not used.
        return batch.update(**self._predict(batch)._asdict())

    def test_step(self, batch: Batch, *args: Any, **kwargs: Any) -> STEP_OUTPUT:
        """Score the batch against the reference bank of each image's class."""
        del args, kwargs  # These variables are not used.
        return batch.update(**self._predict(batch)._asdict())

    def predict_step(self, batch: Batch, *args: Any, **kwargs: Any) -> STEP_OUTPUT:
        """Score the batch against the reference bank of each image's class."""
        del args, kwargs  # These variables are not used.
        return batch.update(**self._predict(batch)._asdict())

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the reference files next to the bank (the bank and its scoring record are in the state dict).

        A checkpoint saved right after training epochs with no evaluation since (no validation data) would hold a
        scoring record measured before them: the stored class is calibrated again with the weights being saved, and
        its buffers replace those Lightning already put in the state dict.
        """
        super().on_save_checkpoint(checkpoint)
        if "state_dict" in checkpoint and self._refresh_stored_scoring():
            fresh = self.state_dict()
            checkpoint["state_dict"].update({name: fresh[name] for name in checkpoint["state_dict"] if name in fresh})
        if self.references.stored is not None:
            checkpoint["resad_references"] = self.references.stored.to_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Rebuild the network the checkpoint holds where this model was built otherwise; restore the references.

        ``anomalib predict/test/export --model ResAD --ckpt_path X`` builds the model from the command line before
        Lightning restores X (loaded with ``weights_only=True``), so a checkpoint of another backbone, set of levels or
        input size would not fit. Its :data:`~anomalib_resad.checkpoint_settings.TRAINED_SETTINGS` replace this
        model's, with a warning naming them, before the state dict is loaded; the scoring options stay as built.
        """
        saved = checkpoint.get("hyper_parameters", {})
        differing = {
            name: saved[name]
            for name in TRAINED_SETTINGS
            if name in saved and normalize_value(saved[name]) != normalize_value(self.hparams.get(name))
        }
        if differing:
            logger.warning(
                "ResAD: the checkpoint holds a model trained with %s; building that one (this one was built with %s).",
                ", ".join(f"{name}={value!r}" for name, value in differing.items()),
                ", ".join(f"{name}={self.hparams.get(name)!r}" for name in differing),
            )
            self.hparams.update(differing)
            self.model = self._build_model(pre_trained=False)  # the state dict fills every weight
            self.loss = self._build_loss()
        super().on_load_checkpoint(checkpoint)  # anomalib restores the pre-processing the references must share
        pools = self.references.pools
        self.references = self._build_references(pools)
        if "resad_references" in checkpoint:
            self.references.stored = ReferenceSelection.from_dict(checkpoint["resad_references"])
            self.references.pinned = True
        if self._fill_scoring_fields(checkpoint.get("state_dict", {})):
            self.references.forget_scoring()  # measured again from its reference files where they are needed

    @staticmethod
    def _fill_scoring_fields(state_dict: dict[str, torch.Tensor]) -> bool:
        """Fill the scoring-record fields a checkpoint of an earlier release lacks (``True``: some were missing).

        Its stored class is then calibrated again from its reference files before it scores; where those are not on
        this machine, its boundaries stay at their floor over its references' largest scores
        (:func:`~anomalib_resad.calibration.boundary` of an unmeasured record), with a warning.
        """
        prefix = "model.anomaly_map_generator.stored."
        if not any(key.startswith(prefix) for key in state_dict):
            return False
        missing = [name for name in Scoring.names() if prefix + name not in state_dict]
        for name in missing:
            state_dict[prefix + name] = torch.zeros(())
        if missing:
            logger.warning(
                "ResAD: the checkpoint was made by an earlier anomalib-resad (its class record lacks %s): its class is "
                "calibrated again from its reference images before it scores.",
                ", ".join(missing),
            )
        return bool(missing)
