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
also sets the class's threshold from those k images (leave-one-out). The bank of the evaluated class is stored in the
checkpoint together with the list of reference files.

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
import math
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
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn
from torch.nn import functional as F  # noqa: N812
from torch.optim.lr_scheduler import MultiStepLR
from torchvision.transforms.v2 import Compose, Normalize, Resize

from .checkpoint_settings import TRAINED_SETTINGS, normalize_value
from .class_references import ClassReferences
from .data.checks import check_folder_paths
from .errors import ResADConfigurationError, ResADInputError, check_choice
from .export_output import ONNX_OPSET_VERSION, announce_written, quiet_export
from .feature_converter import ReferenceBank
from .feature_extractor import backbone_normalization
from .loss import ResADLoss
from .post_processor import CalibratedPostProcessor
from .references import ReferenceSelection, check_image_files, check_k
from .torch_model import ResADModel

logger = logging.getLogger(__name__)
# The odd-frame check's margin before it gained the reverse statistic, and this release's (see on_load_checkpoint)
_SINGLE_CHECK_MARGIN = 1.5
_DISSIMILARITY_MARGIN = 2.0

CATEGORY_COLUMN = "category"
FLOW_STEPS = ("batch", "chunk")


def datamodule_class_name(datamodule: object) -> str:
    """The class (category) a single-category anomalib datamodule holds: its ``category``, else its ``name``."""
    return str(getattr(datamodule, "category", "") or getattr(datamodule, "name", "") or "default")


class ResAD(AnomalibModule):
    """ResAD: residual-feature anomaly detection that generalizes to unseen classes from k normal images.

    Args:
        backbone (str): timm backbone. Defaults to ``"wide_resnet50_2"`` (reference).
        layers (Sequence[str]): Feature levels. Defaults to ``("layer1", "layer2", "layer3")`` (reference).
        pre_trained (bool | str): ``True`` for timm's weights (downloaded), ``False``, or a local weights file.
            Defaults to ``True``.
        image_size (int | tuple[int, int]): Input size of the default pre-processor. Defaults to ``224`` (reference).
        k (int): Number of reference images per class at inference (at least 2: the class's threshold is set from
            them by leave-one-out). Defaults to ``4``.
        reference_seed (int): Seed for drawing them from a class's training split. Defaults to ``42``.
        reference_dir (str | None): Folder of reference images to use instead (the first ``k`` in sorted order).
            Defaults to ``None``.
        train_k (int): References drawn per class per training batch. Defaults to ``4`` (reference).
        residual (str): ``"squared"`` (reference code) or ``"difference"`` (paper). Defaults to ``"squared"``.
        occ_loss (str): ``"log_barrier"`` (reference code) or ``"paper"`` (NeurIPS Eq. 2). Defaults to
            ``"log_barrier"``.
        coupling_layers (int): Coupling blocks per flow. Defaults to ``10`` (reference code).
        clamp_alpha (float): Affine clamping of the flows. Defaults to ``1.9``.
        pos_embed_dim (int): Positional-encoding dimension. Defaults to ``256``.
        pos_beta (float): Quantile defining the normal boundary. Defaults to ``0.05``.
        margin_tau (float): Boundary margin. Defaults to ``0.1``.
        bgspp_lambda (float): Weight of the boundary loss. Defaults to ``1``.
        first_stage_epochs (int): Epochs trained on normal images only. Defaults to ``10`` (reference).
        synthetic_anomalies (bool): After the first stage, add anomalib's Perlin-noise anomalies to normal training
            images (for datamodules without real training anomalies). Defaults to ``False``.
        lr (float): Adam learning rate. Defaults to ``1e-5`` (reference).
        weight_decay (float): Adam weight decay. Defaults to ``5e-4`` (reference).
        lr_milestones (Sequence[int]): Epochs at which the learning rate drops tenfold. Defaults to ``(70, 90)``.
        flow_steps (str): ``"batch"``: one optimizer step per batch for all modules, the flows on ``flow_positions``
            random positions per level; ``"chunk"`` (reference code): a constraintor step, then one flow step per
            chunk of ``flow_positions`` positions, covering every position of every level. Defaults to ``"batch"``.
        flow_positions (int | None): Positions per level (``"batch"``) or per chunk (``"chunk"``); ``None`` uses all
            positions at once. Defaults to ``8192`` (the reference's flow chunk).
        image_score (str): ``"max"`` of the anomaly map (reference) or ``"top_mean"`` (mean of its top 1 %).
            Defaults to ``"max"``.
        level_constants (str): ``"per_class"`` (from the references by leave-one-out) or ``"global"`` (learned in
            training). Defaults to ``"per_class"``.
        dissimilarity_check (bool): Flag frames unlike the references (blank, noise, another product) by the
            dissimilarity and the reverse dissimilarity of the reference matching. Defaults to ``True``.
        nearest_score (bool): Anomaly map = mean of the flows' map and the nearest-neighbour map (``1 - cos`` to the
            nearest reference feature on the two deepest levels: PatchCore's score on ResAD's own matching, at no
            extra cost), each over its leave-one-out threshold; image score = that map's maximum (or top-pixel mean,
            ``image_score``). Not in the reference. Defaults to ``True``: +8.9 I-AUROC on the source classes'
            validation images, +4.2 on the unseen DeepPCB groups when introduced (docs/benchmark.md). Checkpoints
            saved before the option score without it.
        threshold_margin (float): Each scoring term's threshold = this x its largest leave-one-out value over the
            class's references. Defaults to ``1.25``.
        dissimilarity_margin (float): The same for the odd-frame check's dissimilarity. Defaults to ``2.0``.
        reverse_dissimilarity_margin (float): The same for its reverse dissimilarity. Defaults to ``1.5``. The two
            odd-frame margins were chosen on the source classes' validation images of the three shared settings
            (k = 2 and 4, 3 draws, ``threshold_margin`` 1.25): among the swept pairs whose false-positive rate there
            is <= 10 % at both k (here 8.8 % / 0.0 %), the one that flags the most odd frames on the 13 classes
            (black 97-100 %, white 95-97 %, grey, saturated red and noise 100 % of class x draw pairs;
            docs/benchmark.md). Checkpoints of before the reverse statistic that kept that release's 1.5 get 2.0.
        nearest_averaging (str): PatchCore's matching (3 x 3 neighbourhood averaging, Euclidean distance) in the
            nearest-neighbour score and map, per class: ``"auto"`` (default) - each class's k references choose it:
            synthetic defects pasted into them are scored leave-one-out with both matchings
            (:mod:`~anomalib_resad.anomaly_map`) - or ``"on"`` / ``"off"``. Measured end to end (docs/benchmark.md,
            "Which nearest-neighbour map"): the textures take it (pixel AUROC over precise matching's fused map at
            k = 2 / 4: magnetic tile +3.1 / +2.3, CrackForest +1.3 / +1.2), the circuit boards keep precise
            matching. Setting a class's references then also scores 12 defective copies of each reference by
            matching alone (Lite0, k = 4: about 4x the time of ``"off"``). Checkpoints saved before the option keep
            ``"off"``.
        reference_views (str | None): The reference bank also holds each reference image's 8 symmetries of the
            square (``"dihedral"``: flips and quarter turns; needs a square ``image_size``), its 4 flips
            (``"flips"``), or the images alone (``"none"``, the reference; :mod:`~anomalib_resad.reference_views`).
            Defaults to ``None``: ``"dihedral"`` for a square ``image_size``, ``"flips"`` otherwise (a quarter turn
            would change the image's size).
            Only evaluation banks: training and the query images are untouched, and a class's calibration stays
            leave-one-out by image. Measured end to end on the three ``../shared/data`` settings (docs/benchmark.md,
            "Flipped and rotated views of the references"): image AUROC at k = 2 / 4 on the 11 unseen DeepPCB groups
            62.4 / 70.1 -> 67.2 / 74.4, magnetic tile 77.0 / 78.3 -> 78.4 / 80.0, CrackForest 89.1 / 88.7 ->
            88.8 / 88.8, and higher on the source classes' validation images. Checkpoints saved before the option
            keep ``"none"``.
        reference_view_levels (int | None): The views go into the banks of this many deepest levels (``None``: all).
            Defaults to ``2``: the levels the nearest-neighbour score reads; the shallowest level's matching, the
            costliest (stride 4), stays on the images alone.
        distribution_matching (bool): ResAD++ (the reference code): a codebook of normal residuals trained beside
            the flows, and test-time EFDM of the residuals toward it (:mod:`~anomalib_resad.residual_codebook`).
            Defaults to ``False`` (the NeurIPS ResAD).
        codebook_size (int): Codes per level. Defaults to ``1536`` (reference).
        efdm_alpha (float): EFDM's share of the residual kept (``fdm_alpha``). Defaults to ``0.4`` (reference).
        codebook_lr (float): Adam learning rate of the codebook. Defaults to ``1e-5`` (reference).
        reference_cache_mb (float): Memory for cached reference features. Defaults to ``1024``.
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
        reference_seed: int = 42,
        reference_dir: str | None = None,
        train_k: int = 4,
        residual: str = "squared",
        occ_loss: str = "log_barrier",
        coupling_layers: int = 10,
        clamp_alpha: float = 1.9,
        pos_embed_dim: int = 256,
        pos_beta: float = 0.05,
        margin_tau: float = 0.1,
        bgspp_lambda: float = 1.0,
        first_stage_epochs: int = 10,
        synthetic_anomalies: bool = False,
        lr: float = 1e-5,
        weight_decay: float = 5e-4,
        lr_milestones: Sequence[int] = (70, 90),
        flow_steps: str = "batch",
        flow_positions: int | None = 8192,
        image_score: str = "max",
        level_constants: str = "per_class",
        dissimilarity_check: bool = True,
        nearest_score: bool = True,
        threshold_margin: float = 1.25,
        dissimilarity_margin: float = 2.0,
        reverse_dissimilarity_margin: float = 1.5,
        nearest_averaging: str = "auto",
        reference_views: str | None = None,
        reference_view_levels: int | None = 2,
        distribution_matching: bool = False,
        codebook_size: int = 1536,
        efdm_alpha: float = 0.4,
        codebook_lr: float = 1e-5,
        reference_cache_mb: float = 1024,
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
        check_choice("flow_steps", flow_steps, FLOW_STEPS)
        _views_mode(reference_views, image_size)  # checks the pair now
        if flow_steps == "chunk" and flow_positions is None:
            msg = "flow_steps='chunk' needs a chunk size: set flow_positions (the reference uses 8192)."
            raise ResADConfigurationError(msg)
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
        self.codebook_lr = codebook_lr
        self.weight_decay = weight_decay
        self.lr_milestones = list(lr_milestones)
        self.flow_steps = flow_steps
        self.flow_positions = flow_positions
        self.anomaly_generator = PerlinAnomalyGenerator(probability=0.5) if synthetic_anomalies else None
        # Manual optimisation for the reference's per-chunk flow steps (several optimizer steps per batch).
        self.automatic_optimization = flow_steps == "batch"

        self.references = self._build_references()
        self.reference_selection: ReferenceSelection | None = None  # the stored bank's images
        self._pinned_references = False
        self._eval_banks: dict[str, ReferenceBank] = {}  # banks of further classes of a multi-class eval set
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

    def _build_model(self, pre_trained: bool | str) -> ResADModel:
        """The network these hyper-parameters describe (``pre_trained=False`` where a checkpoint fills it)."""
        hparams = self.hparams
        return ResADModel(
            backbone=hparams["backbone"],
            layers=hparams["layers"],
            pre_trained=pre_trained,
            residual=hparams["residual"],
            coupling_layers=hparams["coupling_layers"],
            clamp_alpha=hparams["clamp_alpha"],
            pos_embed_dim=hparams["pos_embed_dim"],
            image_score=hparams["image_score"],
            level_constants=hparams["level_constants"],
            dissimilarity_check=hparams["dissimilarity_check"],
            nearest_score=hparams["nearest_score"],
            threshold_margin=hparams["threshold_margin"],
            dissimilarity_margin=hparams["dissimilarity_margin"],
            reverse_dissimilarity_margin=hparams["reverse_dissimilarity_margin"],
            nearest_averaging=hparams["nearest_averaging"],
            reference_views=_views_mode(hparams["reference_views"], hparams["image_size"]),
            reference_view_levels=hparams["reference_view_levels"],
            distribution_matching=hparams["distribution_matching"],
            codebook_size=hparams["codebook_size"],
            efdm_alpha=hparams["efdm_alpha"],
        )

    def _build_loss(self) -> ResADLoss:
        hparams = self.hparams
        return ResADLoss(
            num_levels=self.model.num_levels,
            occ_loss=hparams["occ_loss"],
            pos_beta=hparams["pos_beta"],
            margin_tau=hparams["margin_tau"],
            bgspp_lambda=hparams["bgspp_lambda"],
        )

    def _build_references(self, pools: dict[str, list[str]] | None = None) -> ClassReferences:
        """The references room of :attr:`model`, its images pre-processed as the model's pre-processor does."""
        transform = self.pre_processor.transform if isinstance(self.pre_processor, PreProcessor) else None
        references = ClassReferences.for_model(self.model, transform, int(self.hparams["reference_cache_mb"] * 2**20))
        references.set_pools(pools or {})
        return references

    @staticmethod
    def configure_post_processor() -> PostProcessor:
        """Thresholds from each class's own references (:class:`CalibratedPostProcessor`), not from validation."""
        return CalibratedPostProcessor()

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

        The reference uses three Adams with identical settings; Adam is per-parameter, so one optimizer over their
        union is the same update - a step only moves the parameters that received a gradient, which is what the
        per-chunk flow steps (``flow_steps="chunk"``) rely on.
        """
        codebook = set(self.model.codebook.parameters()) if self.model.codebook is not None else set()
        parameters = [p for p in self.model.parameters() if p.requires_grad and p not in codebook]
        groups = [{"params": parameters}]
        if codebook:  # the reference's VQ Adam: lr 1e-5, same weight decay
            groups.append({"params": list(codebook), "lr": self.codebook_lr})
        optimizer = torch.optim.Adam(groups, lr=self.lr, weight_decay=self.weight_decay)
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
    def set_references(self, selection: ReferenceSelection, pinned: bool = True) -> None:
        """Make ``selection`` the stored, calibrated reference bank (the one used for inference and export).

        Args:
            selection (ReferenceSelection): The reference images of a class (k >= 2).
            pinned (bool): Keep these references for that class in later validation/test runs instead of drawing
                them from the datamodule. Defaults to ``True``.
        """
        self.model.set_references(self.references.bank(selection))
        self.reference_selection = selection
        self._pinned_references = pinned

    def select_references(self, class_name: str) -> ReferenceSelection:
        """The reference images of a class: the first ``k`` of ``reference_dir``, else a seeded draw from its pool."""
        return self.references.select(class_name, self.k, self.reference_seed, folder=self.reference_dir)

    def _prepare_eval_references(self, subset_name: str | None) -> None:
        """Before validation/test/predict: a calibrated bank for every class of the evaluated data, built once.

        ``reference_dir`` (one class) always wins - also for ``anomalib predict`` on a folder of images. References
        pinned with :meth:`set_references` are kept for their class; every other class gets
        :meth:`select_references`. One class's bank is the stored one (checkpoint, export); further classes of a
        multi-class set are scored with their own banks.
        """
        datamodule = self._datamodule()
        subset = getattr(datamodule, subset_name, None) if datamodule is not None and subset_name else None
        self._eval_banks = {}
        if subset is None:  # e.g. predict on a folder of images: the stored bank, or reference_dir's
            if self.reference_dir:
                name = self.reference_selection.class_name if self.reference_selection else self._default_class
                self.set_references(self.select_references(name), pinned=False)
            elif not self.model.feature_converter.has_references:
                msg = "This ResAD model holds no references: give --model.reference_dir or a trained checkpoint."
                raise ResADInputError(msg)
            return
        classes = sorted({self.class_of(path) for path in subset.samples.image_path.astype(str)})
        if len(classes) > 1 and self.reference_dir:
            msg = f"reference_dir holds references of one class, but the evaluated data has classes {classes}."
            raise ResADInputError(msg)
        stored = self.reference_selection
        converter = self.model.feature_converter
        # a stored bank made with other reference views (an option set after loading) is made again
        stored_current = converter.has_references and converter.bank.views == self.model.bank_views
        keep_stored = (
            not self.reference_dir
            and self._pinned_references
            and stored is not None
            and stored.class_name in classes
            and stored_current
        )
        selections = {
            name: self.select_references(name)
            for name in classes
            if not (keep_stored and stored is not None and name == stored.class_name)
        }
        if not keep_stored:
            primary = stored.class_name if stored is not None and stored.class_name in classes else classes[0]
            selection = selections[primary]
            if stored is None or stored.paths != selection.paths or not stored_current:
                self.set_references(selection, pinned=False)
        stored_class = self.reference_selection.class_name
        self._eval_banks = {
            name: self.references.bank(selection) for name, selection in selections.items() if name != stored_class
        }

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
            "ResAD training on %d class(es) %s; first %d epoch(s) on normal images only; synthetic anomalies: %s; "
            "flow steps per %s.",
            len(self.references.pools),
            sorted(self.references.pools),
            self.first_stage_epochs,
            "on" if self.anomaly_generator is not None else "off",
            self.flow_steps,
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
            class_residuals = self.model.feature_converter(class_features, bank.levels).residuals
            for level, residual in enumerate(class_residuals):
                residuals[level][index] = residual
        level_masks = [F.interpolate(masks.unsqueeze(1), size=r.shape[-2:], mode="nearest")[:, 0] for r in residuals]
        return residuals, self.model.feature_constraintor(residuals), level_masks

    def _level_flow_loss(
        self, level: int, vectors: torch.Tensor, conditions: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Flow loss of one level on some positions; feeds the anomaly map's global constant as it goes."""
        log_normal, log_abnormal = self.model.residual_flow.vector_log_likelihoods(level, vectors, conditions)
        self.model.anomaly_map_generator.update_global_constant(
            level, log_normal.detach()[mask < 0.5], self.loss.boundary_momentum
        )
        return self.loss.flow_loss(level, log_normal, log_abnormal, mask)

    def _codebook_loss(
        self, residuals: list[torch.Tensor], level_masks: list[torch.Tensor], batch_size: int
    ) -> torch.Tensor:
        """ResAD++'s codebook loss on the raw residuals' normal positions, logged on its own (zero without it)."""
        if self.model.codebook is None:
            return residuals[0].new_zeros(())
        loss = self.model.codebook.loss(residuals, level_masks)
        self.log("train_codebook_loss", loss.detach(), on_epoch=True, on_step=False, batch_size=batch_size)
        return loss

    def _zero_loss(self) -> torch.Tensor:
        """A zero loss that touches every parameter: keeps DDP ranks in step on a batch with nothing to learn."""
        return sum(parameter.sum() for parameter in self.model.parameters() if parameter.requires_grad) * 0.0

    def training_step(self, batch: Batch, *args: Any, **kwargs: Any) -> STEP_OUTPUT:
        """One step of the reference recipe (one backward pass, or the reference's per-chunk flow steps)."""
        del args, kwargs  # These variables are not used.
        residuals, constrained, level_masks = self._training_inputs(batch)
        batch_size = len(batch.image)
        if not self.automatic_optimization:
            return self._chunked_training_step(residuals, constrained, level_masks, batch_size)
        if not residuals:
            return {"loss": self._zero_loss()}
        occ_loss = self.loss.occ_loss(constrained, residuals, level_masks)
        codebook_loss = self._codebook_loss(residuals, level_masks, batch_size)
        flow = self.model.residual_flow
        flow_loss = constrained[0].new_zeros(())
        for level, (feature, mask) in enumerate(zip(constrained, level_masks, strict=True)):
            vectors, conditions, position_mask = flow.sample_positions(feature.detach(), mask, self.flow_positions)
            flow_loss = flow_loss + self._level_flow_loss(level, vectors, conditions, position_mask)
        self._log_losses(occ_loss, flow_loss, batch_size)
        return {"loss": occ_loss + codebook_loss + flow_loss}

    def _chunked_training_step(
        self,
        residuals: list[torch.Tensor],
        constrained: list[torch.Tensor],
        level_masks: list[torch.Tensor],
        batch_size: int,
    ) -> None:
        """The reference's schedule: one constraintor step, then one flow step per chunk of positions.

        The number of chunks per level is set by the *full* batch size (``ceil(B * H_l * W_l / flow_positions)``),
        not by how many images survive the first stage's normal-only filter, so every DDP rank takes the same
        number of optimizer steps; chunks of a filtered batch are just smaller.
        """
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        optimizer.zero_grad()
        occ_loss = self.loss.occ_loss(constrained, residuals, level_masks) if residuals else self._zero_loss()
        codebook_loss = self._codebook_loss(residuals, level_masks, batch_size) if residuals else 0.0
        self.manual_backward(occ_loss + codebook_loss)
        optimizer.step()
        flow = self.model.residual_flow
        total_flow_loss, steps = 0.0, 0
        grids = [tuple(feature.shape[-2:]) for feature in constrained] or self._level_grids()
        for level, (height, width) in enumerate(grids):
            num_chunks = max(1, math.ceil(batch_size * height * width / self.flow_positions))
            chunks = (
                flow.position_chunks(constrained[level].detach(), level_masks[level], num_chunks)
                if residuals
                else [None] * num_chunks
            )
            for chunk in chunks:
                optimizer.zero_grad()
                loss = self._level_flow_loss(level, *chunk) if chunk is not None else self._zero_loss()
                self.manual_backward(loss)
                optimizer.step()
                total_flow_loss += float(loss.detach())
                steps += 1
        if self.trainer.is_last_batch and scheduler is not None:
            scheduler.step()
        flow_loss = torch.tensor(total_flow_loss / max(steps, 1))
        self._log_losses(occ_loss.detach(), flow_loss, batch_size)

    def _level_grids(self) -> list[tuple[int, int]]:
        height, width = (int(value) for value in (self.input_size or (224, 224)))
        with torch.no_grad():
            features = self.model.feature_extractor(torch.zeros(1, 3, height, width, device=self.device))
        return [tuple(feature.shape[-2:]) for feature in features]

    def _log_losses(self, occ_loss: torch.Tensor, flow_loss: torch.Tensor, batch_size: int) -> None:
        self.log("train_occ_loss", occ_loss.detach(), on_epoch=True, on_step=False, batch_size=batch_size)
        self.log("train_flow_loss", flow_loss.detach(), on_epoch=True, on_step=False, batch_size=batch_size)
        total = (occ_loss + flow_loss).detach()
        self.log("train_loss", total, on_epoch=True, on_step=False, prog_bar=True, batch_size=batch_size)

    # ------------------------------------------------------------------ evaluation
    def _predict(self, batch: Batch) -> InferenceBatch:
        paths = [str(path) for path in batch.image_path] if batch.image_path is not None else []
        classes = [self.class_of(path) for path in paths]
        stored = self.reference_selection.class_name if self.reference_selection is not None else None
        other = sorted({name for name in classes if name != stored and name in self._eval_banks})
        if not other:
            return self.model(batch.image)
        scores = torch.empty(len(classes), device=batch.image.device)
        maps = torch.empty(len(classes), 1, *batch.image.shape[-2:], device=batch.image.device)
        for class_name in sorted(set(classes)):
            index = torch.tensor([i for i, name in enumerate(classes) if name == class_name], device=scores.device)
            bank = self._eval_banks.get(class_name)
            output = (
                self.model(batch.image[index], bank.levels, bank.calibration.to(scores.device))
                if bank is not None
                else self.model(batch.image[index])
            )
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
        """Store the reference files next to the bank (the bank and its calibration are in the state dict)."""
        super().on_save_checkpoint(checkpoint)
        if self.reference_selection is not None:
            checkpoint["resad_references"] = self.reference_selection.to_dict()

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
        # saved before the reverse statistic, with that release's default margin: 1.5 for the forward statistic next
        # to the reverse one flags too many normal images (docs/benchmark.md); references set from now on use this
        # release's pair (the stored calibration is read as it was)
        if (
            "reverse_dissimilarity_margin" not in saved
            and saved.get("dissimilarity_margin") == _SINGLE_CHECK_MARGIN
            and self.model.dissimilarity_margin == _SINGLE_CHECK_MARGIN
        ):
            self.model.dissimilarity_margin = _DISSIMILARITY_MARGIN
            self.hparams["dissimilarity_margin"] = _DISSIMILARITY_MARGIN
        generator = self.model.anomaly_map_generator
        if "nearest_averaging" not in saved and self.model.nearest_averaging == "auto":
            # saved before the option: references set on it are calibrated as that release did (precise matching);
            # an explicit "on" is kept (an explicit "auto" cannot be told from the default: resad evaluate sets its
            # scoring options after loading)
            self.model.nearest_averaging = "off"
            self.hparams["nearest_averaging"] = "off"
        if "reference_views" not in saved and self.hparams.get("reference_views") is None:
            # saved before the option and left at the default: references set on it are made as that release did
            # (the images alone); an explicit value is kept (resad evaluate sets scoring options after loading)
            self.model.reference_views = "none"
            self.hparams["reference_views"] = "none"
        if "nearest_score" not in saved and generator.nearest_score:
            # saved before the option: its calibration has no nearest-neighbour threshold; score as it was scored
            generator.nearest_score = False
            logger.info("Checkpoint of before nearest_score: its images are scored by the flows alone, as before.")
        super().on_load_checkpoint(checkpoint)  # anomalib restores the pre-processing the references must share
        if "resad_references" in checkpoint:
            self.reference_selection = ReferenceSelection.from_dict(checkpoint["resad_references"])
            self._pinned_references = True
        self.references = self._build_references(self.references.pools)


def _views_mode(reference_views: str | None, image_size: int | Sequence[int] | None) -> str:
    """The reference views to use: the given mode, else dihedral for a square input and flips otherwise.

    The default (``None``) is kept as such in the hyper-parameters: checkpoints of before the option are told apart
    by it. Quarter turns are used only where they keep the image's size.
    """
    size = (224, 224) if image_size is None else (image_size,) * 2 if isinstance(image_size, int) else image_size
    square = int(size[0]) == int(size[-1])
    mode = reference_views or ("dihedral" if square else "flips")
    if mode == "dihedral" and not square:
        msg = (
            f"reference_views='dihedral' turns the reference images by quarter turns, which needs a square "
            f"image_size; got {size[0]}x{size[-1]}. Use a square size or --model.reference_views flips (mirror "
            "images only), or leave the option out (flips for non-square sizes)."
        )
        raise ResADConfigurationError(msg)
    return mode
