# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""ResAD as an anomalib model: training on source classes, k-shot inference on any class.

Training (``anomalib train --model ResAD ...`` or ``Engine().fit``) follows the reference code's recipe: for every
class present in a batch, ``train_reference_k`` normal images of that class are drawn afresh from the training split,
each query feature is turned into a residual against them, the Feature Constraintor is trained with the OCC loss and
the flows by maximum likelihood. The first ``first_stage_epochs`` epochs use normal images only; later epochs also use
the anomalous images (with masks) that the datamodule puts in the training split - the source classes' test anomalies
in the class-generalization protocol (:mod:`anomalib_resad.data`), or synthetic anomalies with
``synthetic_anomalies=True`` for a plain single-category datamodule whose training split is all normal.

Inference (validation, test, predict, export) scores each image against a fixed reference bank of its class:
``reference_k`` images drawn with ``reference_seed`` from the class's training split, or the images of
``reference_dir``. The bank is built once per class, stored in the checkpoint together with the list of reference
files, and rebuilt only when the evaluated class changes.

Why ``LearningType.ONE_CLASS``: anomalib's Engine skips ``fit`` for few-shot learning types (it only validates), so a
few-shot type would make ``anomalib train --model ResAD`` score with untrained flows. ResAD *is* trained; it is
few-shot only at inference, which the reference bank handles.

Example:
    >>> from anomalib.data import Folder  # doctest: +SKIP
    >>> from anomalib.engine import Engine  # doctest: +SKIP
    >>> from anomalib_resad import ResAD  # doctest: +SKIP
    >>> model = ResAD(backbone="wide_resnet50_2", reference_k=4)  # doctest: +SKIP
    >>> Engine(max_epochs=100).train(model, datamodule=Folder(...))  # doctest: +SKIP
"""

import logging
import random
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
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

from .errors import ResADConfigurationError, ResADInputError, install_cli_excepthook
from .feature_converter import ReferenceBank
from .feature_extractor import backbone_normalization
from .loss import ResADLoss
from .references import (
    ReferenceSelection,
    check_image_files,
    load_images,
    sample_references,
    select_folder_references,
)
from .torch_model import ResADModel

logger = logging.getLogger(__name__)

CATEGORY_COLUMN = "category"
# Hyper-parameters that define the network's structure: a checkpoint only fits a model built with the same ones.
_ARCHITECTURE_HPARAMS = ("backbone", "layers", "coupling_layers", "pos_embed_dim", "residual")


def datamodule_class_name(datamodule: object) -> str:
    """The class (category) a single-category anomalib datamodule holds: its ``category``, else its ``name``."""
    return str(getattr(datamodule, "category", "") or getattr(datamodule, "name", "") or "default")


class ReferenceFeatureCache:
    """Backbone features of training reference images by file, least recently used first out, bounded in bytes.

    Training draws new references for every class in every batch (as the reference code does); with this cache each
    image's features are computed once instead of once per draw.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, list[torch.Tensor]] = OrderedDict()
        self._bytes = 0

    def clear(self) -> None:
        """Drop everything (the backbone or the pre-processing changed)."""
        self._entries.clear()
        self._bytes = 0

    def get(self, path: str) -> list[torch.Tensor] | None:
        """Per-level features ``(C_l, H_l, W_l)`` of an image, or ``None``."""
        if path in self._entries:
            self._entries.move_to_end(path)
            return self._entries[path]
        return None

    def put(self, path: str, features: list[torch.Tensor]) -> None:
        """Store the per-level features of one image, evicting old entries beyond the budget."""
        size = sum(feature.numel() * feature.element_size() for feature in features)
        if size > self.max_bytes:
            return
        self._entries[path] = features
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= sum(feature.numel() * feature.element_size() for feature in evicted)


class ResAD(AnomalibModule):
    """ResAD: residual-feature anomaly detection that generalizes to unseen classes from k normal images.

    Args:
        backbone (str): timm backbone. Defaults to ``"wide_resnet50_2"`` (reference).
        layers (Sequence[str]): Feature levels. Defaults to ``("layer1", "layer2", "layer3")`` (reference).
        pre_trained (bool | str): ``True`` for timm's weights (downloaded), ``False``, or a local weights file.
            Defaults to ``True``.
        image_size (int | tuple[int, int]): Input size of the default pre-processor. Defaults to ``224`` (reference).
        reference_k (int): Number of reference images per class at inference. Defaults to ``4``.
        reference_seed (int): Seed for drawing them from a class's training split. Defaults to ``42``.
        reference_dir (str | None): Folder of reference images to use instead (the first ``reference_k`` in sorted
            order). Defaults to ``None``.
        train_reference_k (int): References drawn per class per training batch. Defaults to ``4`` (reference).
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
        flow_positions (int | None): Positions per level fed to the flows per step, sampled at random; ``None``
            uses all. Defaults to ``8192`` (the reference's flow chunk: bounds memory, e.g. 32 x 56 x 56 positions at
            layer 1 of a batch of 32).
        reference_cache_mb (float): Memory for cached training-reference features. Defaults to ``1024``.
        pre_processor (PreProcessor | bool): Defaults to resize to ``image_size`` + the backbone's normalisation.
        post_processor (PostProcessor | bool): Defaults to anomalib's ``PostProcessor``.
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
        reference_k: int = 4,
        reference_seed: int = 42,
        reference_dir: str | None = None,
        train_reference_k: int = 4,
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
        flow_positions: int | None = 8192,
        reference_cache_mb: float = 1024,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        install_cli_excepthook()  # `anomalib ...` command line: report bad input in one line (after rich's hook)
        if reference_k < 1 or train_reference_k < 1:
            msg = f"reference_k and train_reference_k must be >= 1, got {reference_k} and {train_reference_k}."
            raise ResADConfigurationError(msg)
        if pos_embed_dim % 4:
            msg = f"pos_embed_dim must be a multiple of 4 (sin/cos in two axes), got {pos_embed_dim}."
            raise ResADConfigurationError(msg)
        if pre_processor is True:
            pre_processor = self.configure_pre_processor(image_size=image_size, backbone=backbone)
        super().__init__(
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        self.model = ResADModel(
            backbone=backbone,
            layers=layers,
            pre_trained=pre_trained,
            residual=residual,
            coupling_layers=coupling_layers,
            clamp_alpha=clamp_alpha,
            pos_embed_dim=pos_embed_dim,
        )
        self.loss = ResADLoss(
            num_levels=self.model.num_levels,
            occ_loss=occ_loss,
            pos_beta=pos_beta,
            margin_tau=margin_tau,
            bgspp_lambda=bgspp_lambda,
        )
        self.reference_k = reference_k
        self.reference_seed = reference_seed
        self.reference_dir = reference_dir
        self.train_reference_k = train_reference_k
        self.first_stage_epochs = first_stage_epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.lr_milestones = list(lr_milestones)
        self.flow_positions = flow_positions
        self.anomaly_generator = PerlinAnomalyGenerator(probability=0.5) if synthetic_anomalies else None

        self.reference_selection: ReferenceSelection | None = None  # the stored bank's images
        self._pinned_references = False
        self._eval_banks: dict[str, list[torch.Tensor]] = {}  # banks of further classes of a multi-class eval set
        self._bank_cache: dict[tuple[str, ...], list[torch.Tensor]] = {}  # reference files -> bank
        self._train_pools: dict[str, list[str]] = {}
        self._class_of_path: dict[str, str] = {}
        self._default_class = "default"
        self._checked_paths: set[str] = set()
        self._train_rng = random.Random(reference_seed)
        self._reference_cache = ReferenceFeatureCache(int(reference_cache_mb * 2**20))

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
        """Anomalib's default post-processor (normalisation and adaptive thresholds from validation)."""
        return PostProcessor()

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
        union is the same update - and it lets a single backward pass per batch serve all modules.
        """
        parameters = [parameter for parameter in self.model.parameters() if parameter.requires_grad]
        optimizer = torch.optim.Adam(parameters, lr=self.lr, weight_decay=self.weight_decay)
        scheduler = MultiStepLR(optimizer, milestones=self.lr_milestones, gamma=0.1)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: str | Path, *args: Any, **kwargs: Any) -> "ResAD":
        """Load a trained ResAD; backbone weights come from the checkpoint, so nothing is downloaded."""
        kwargs.setdefault("pre_trained", False)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    # ------------------------------------------------------------------ data bookkeeping
    def setup(self, stage: str) -> None:
        """Check the datamodule's images once, and learn which class each image belongs to."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
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

    def class_of(self, path: str) -> str:
        """Class of an image file (its datamodule ``category`` column, else the datamodule's category)."""
        return self._class_of_path.get(str(path), self._default_class)

    def _reference_pool(self, class_name: str) -> list[str]:
        """Normal training images of a class in the attached datamodule (where references are drawn from)."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if hasattr(datamodule, "reference_pool"):  # MultiClassDataModule: also knows the target classes' pools
            return datamodule.reference_pool(class_name)
        train_data = getattr(datamodule, "train_data", None)
        if train_data is None:
            return []
        samples = train_data.samples
        normal = samples[samples.label_index == 0]
        if CATEGORY_COLUMN in normal:
            normal = normal[normal[CATEGORY_COLUMN].astype(str) == class_name]
        elif class_name != self._default_class:
            return []
        return sorted(normal.image_path.astype(str))

    def _normal_training_pools(self) -> dict[str, list[str]]:
        datamodule = self.trainer.datamodule
        samples: pd.DataFrame = datamodule.train_data.samples
        classes = samples[CATEGORY_COLUMN].astype(str).unique() if CATEGORY_COLUMN in samples else [self._default_class]
        pools = {name: self._reference_pool(name) for name in sorted(classes)}
        empty = sorted(name for name, pool in pools.items() if not pool)
        if empty:
            msg = (
                f"No normal training images of class(es) {empty} in {datamodule.name}: ResAD draws its training "
                "references from them. Use a datamodule whose training split holds normal images of every class."
            )
            raise ResADInputError(msg)
        return pools

    # ------------------------------------------------------------------ references
    def _reference_images(self, paths: Sequence[str]) -> torch.Tensor:
        transform = self.pre_processor.transform if self.pre_processor is not None else None
        return load_images(paths, transform).to(self.device)

    def set_references(self, selection: ReferenceSelection, pinned: bool = True) -> None:
        """Make ``selection`` the stored reference bank (the one used for inference and export).

        Args:
            selection (ReferenceSelection): The reference images of a class.
            pinned (bool): Keep these references for that class in later validation/test runs instead of drawing
                them from the datamodule. Defaults to ``True``.
        """
        self.model.feature_converter.set_bank(self._bank(selection))
        self.reference_selection = selection
        self._pinned_references = pinned
        logger.info("ResAD references of class '%s' (k=%d): %s", selection.class_name, selection.k, selection.paths)

    def select_references(self, class_name: str, k: int | None = None, seed: int | None = None) -> ReferenceSelection:
        """Choose the reference images of a class.

        ``reference_dir`` if set, else ``k`` images drawn with ``seed`` from the class's normal training images in
        the attached datamodule.

        Args:
            class_name (str): The class.
            k (int | None): Number of references. Defaults to ``reference_k``.
            seed (int | None): Draw seed. Defaults to ``reference_seed``.

        Returns:
            ReferenceSelection: The chosen images.
        """
        k = k or self.reference_k
        seed = self.reference_seed if seed is None else seed
        if self.reference_dir:
            return select_folder_references(self.reference_dir, k, class_name)
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        pool = self._reference_pool(class_name)
        if not pool:
            msg = (
                f"No reference images for class '{class_name}': give --model.reference_dir <folder of k normal "
                "images>, a datamodule with normal training images of the class, or a checkpoint with references."
            )
            raise ResADInputError(msg)
        where = f"the training split of class '{class_name}' ({datamodule.name})"
        paths = sample_references(pool, k, seed, where)
        source = f"{datamodule.name} train split"
        return ReferenceSelection(class_name=class_name, paths=paths, source=source, seed=seed)

    def _bank(self, selection: ReferenceSelection) -> ReferenceBank:
        key = tuple(selection.paths)
        if key not in self._bank_cache:
            self._bank_cache[key] = self.model.make_reference_bank(self._reference_images(selection.paths))
        return self._bank_cache[key]

    def _prepare_eval_references(self) -> None:
        """Before validation/test/predict: a reference bank for every class of the evaluated data, built once.

        References pinned with :meth:`set_references` are kept for their class; every other class gets
        :meth:`select_references` (deterministic), whose bank is cached by its files. One class's bank is the stored
        one (checkpoint, export); further classes of a multi-class set are scored with their own banks.
        """
        datamodule = getattr(self.trainer, "datamodule", None)
        subset_name = "val_data" if self.trainer.validating or self.trainer.sanity_checking else "test_data"
        subset = getattr(datamodule, subset_name, None) if datamodule is not None else None
        self._eval_banks = {}
        if subset is None:  # e.g. predict on a folder of images: use the stored bank
            if not self.model.feature_converter.has_references:
                msg = "This ResAD model holds no references: give --model.reference_dir or a trained checkpoint."
                raise ResADInputError(msg)
            return
        classes = sorted({self.class_of(path) for path in subset.samples.image_path.astype(str)})
        if len(classes) > 1 and self.reference_dir:
            msg = f"reference_dir holds references of one class, but the evaluated data has classes {classes}."
            raise ResADInputError(msg)
        stored = self.reference_selection
        keep_stored = self._pinned_references and stored is not None and stored.class_name in classes
        selections = {
            name: self.select_references(name)
            for name in classes
            if not (keep_stored and stored is not None and name == stored.class_name)
        }
        if not keep_stored:
            primary = stored.class_name if stored is not None and stored.class_name in classes else classes[0]
            selection = selections[primary]
            if stored is None or stored.paths != selection.paths or not self.model.feature_converter.has_references:
                self.set_references(selection, pinned=False)
        stored_class = self.reference_selection.class_name
        self._eval_banks = {name: self._bank(sel) for name, sel in selections.items() if name != stored_class}

    def on_validation_start(self) -> None:
        """Prepare the reference banks of the validation classes."""
        self._prepare_eval_references()

    def on_test_start(self) -> None:
        """Prepare the reference banks of the test classes."""
        self._prepare_eval_references()

    def on_predict_start(self) -> None:
        """Prepare the reference banks of the predicted classes."""
        self._prepare_eval_references()

    def _training_bank(self, class_name: str) -> list[torch.Tensor]:
        """Fresh training references of a class (``train_reference_k`` draws), as per-level banks."""
        pool = self._train_pools.get(class_name)
        if not pool:
            msg = f"No normal training images of class '{class_name}' to draw training references from."
            raise ResADInputError(msg)
        k = self.train_reference_k
        paths = self._train_rng.sample(pool, k) if len(pool) >= k else self._train_rng.choices(pool, k=k)
        missing = [path for path in dict.fromkeys(paths) if self._reference_cache.get(path) is None]
        if missing:
            features = self.model.reference_features(self._reference_images(missing))
            for index, path in enumerate(missing):
                self._reference_cache.put(path, [feature[index] for feature in features])
        per_image = [self._reference_cache.get(path) for path in paths]
        if any(entry is None for entry in per_image):  # cache too small for one image: compute directly
            return self.model.make_reference_bank(self._reference_images(paths)).levels
        return ReferenceBank.from_features([torch.stack(level) for level in zip(*per_image, strict=True)]).levels

    # ------------------------------------------------------------------ training
    def on_fit_start(self) -> None:
        """Collect the normal training images of every class (the pools training references are drawn from)."""
        self._train_pools = self._normal_training_pools()
        self._reference_cache.clear()
        self._bank_cache.clear()
        rank = self.trainer.global_rank if self._trainer is not None else 0
        self._train_rng = random.Random(self.reference_seed + 7919 * rank)
        logger.info(
            "ResAD training on %d class(es) %s; first %d epoch(s) on normal images only; synthetic anomalies: %s.",
            len(self._train_pools),
            sorted(self._train_pools),
            self.first_stage_epochs,
            "on" if self.anomaly_generator is not None else "off",
        )

    def training_step(self, batch: Batch, *args: Any, **kwargs: Any) -> STEP_OUTPUT:
        """One step of the reference recipe; a single backward pass trains the constraintor and the flows."""
        del args, kwargs  # These variables are not used.
        images = batch.image
        masks = batch.gt_mask if batch.gt_mask is not None else torch.zeros_like(images[:, 0])
        labels = batch.gt_label if batch.gt_label is not None else torch.zeros(len(images), device=images.device)
        paths = [str(path) for path in batch.image_path]
        masks = masks.reshape(len(images), *images.shape[-2:]).float()
        if self.current_epoch < self.first_stage_epochs:  # stage 1: normal images only
            keep = labels == 0
            if not bool(keep.any()):  # a zero loss that touches every parameter keeps DDP ranks in step
                return {
                    "loss": sum(parameter.sum() for parameter in self.model.parameters() if parameter.requires_grad)
                    * 0.0
                }
            images, masks = images[keep], masks[keep]
            paths = [path for path, kept in zip(paths, keep.tolist(), strict=True) if kept]
        elif self.anomaly_generator is not None:
            images, synthetic = self.anomaly_generator(images)
            masks = torch.maximum(masks, synthetic.reshape_as(masks).to(masks.dtype))

        features = self.model.feature_extractor(images)
        residuals = [torch.empty_like(feature) for feature in features]
        classes = [self.class_of(path) for path in paths]
        for class_name in sorted(set(classes)):
            index = torch.tensor([i for i, name in enumerate(classes) if name == class_name], device=images.device)
            class_residuals = self.model.feature_converter(
                [feature[index] for feature in features],
                self._training_bank(class_name),
            )
            for level, residual in enumerate(class_residuals):
                residuals[level][index] = residual

        level_masks = [F.interpolate(masks.unsqueeze(1), size=r.shape[-2:], mode="nearest")[:, 0] for r in residuals]
        constrained = self.model.feature_constraintor(residuals)
        occ_loss = self.loss.occ_loss(constrained, residuals, level_masks)
        flow_loss = self._flow_loss([feature.detach() for feature in constrained], level_masks)
        loss = occ_loss + flow_loss
        self.log("train_occ_loss", occ_loss.detach(), on_epoch=True, on_step=False, batch_size=len(images))
        self.log("train_flow_loss", flow_loss.detach(), on_epoch=True, on_step=False, batch_size=len(images))
        self.log("train_loss", loss.detach(), on_epoch=True, on_step=False, prog_bar=True, batch_size=len(images))
        return {"loss": loss}

    def _flow_loss(self, constrained: list[torch.Tensor], level_masks: list[torch.Tensor]) -> torch.Tensor:
        flow = self.model.residual_flow
        reference = self.model.anomaly_map_generator.log_likelihood_reference
        total = constrained[0].new_zeros(())
        for level, (feature, level_mask) in enumerate(zip(constrained, level_masks, strict=True)):
            batch, channels, height, width = feature.shape
            vectors = feature.permute(0, 2, 3, 1).reshape(-1, channels)
            conditions = flow.positional_encoding(height, width, feature.device).repeat(batch, 1)
            mask = level_mask.reshape(-1)
            if self.flow_positions is not None and vectors.shape[0] > self.flow_positions:
                chosen = torch.randperm(vectors.shape[0], device=vectors.device)[: self.flow_positions]
                vectors, conditions, mask = vectors[chosen], conditions[chosen], mask[chosen]
            log_normal, log_abnormal = flow.vector_log_likelihoods(level, vectors, conditions)
            total = total + self.loss.flow_loss(level, log_normal, log_abnormal, mask)
            normal_log_likelihoods = log_normal.detach()[mask < 0.5]
            if normal_log_likelihoods.numel():  # EMA of the largest normal log-likelihood: the map's constant c_l
                momentum = self.loss.boundary_momentum
                reference[level] = momentum * reference[level] + (1 - momentum) * normal_log_likelihoods.max()
        return total

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
            output = self.model(batch.image[index], bank.levels if bank is not None else None)
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
        """Store the reference files next to the bank (the bank itself is in the state dict)."""
        super().on_save_checkpoint(checkpoint)
        if self.reference_selection is not None:
            checkpoint["resad_references"] = self.reference_selection.to_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse, with a clear message, a checkpoint of a differently built ResAD; restore the reference list."""
        saved = checkpoint.get("hyper_parameters", {})
        mismatched = {
            name: (saved[name], self.hparams.get(name))
            for name in _ARCHITECTURE_HPARAMS
            if name in saved and _normalize(saved[name]) != _normalize(self.hparams.get(name))
        }
        if mismatched:
            details = ", ".join(f"{key}: checkpoint {old!r} vs model {new!r}" for key, (old, new) in mismatched.items())
            msg = (
                f"This checkpoint was trained with a different ResAD ({details}). Build the model with the "
                "checkpoint's settings (e.g. --model.backbone ...) or use a checkpoint of this configuration."
            )
            raise ResADConfigurationError(msg)
        super().on_load_checkpoint(checkpoint)
        if "resad_references" in checkpoint:
            self.reference_selection = ReferenceSelection.from_dict(checkpoint["resad_references"])


def _normalize(value: object) -> object:
    return [str(item) for item in value] if isinstance(value, list | tuple) else value
