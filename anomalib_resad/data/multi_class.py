# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""Many categories of one or several anomalib datasets as one datamodule: train on source classes, test on others.

anomalib's datamodules hold one category each. :class:`MultiClassDataModule` composes them - it builds anomalib's own
datamodule for every category (``MVTecAD``, ``Visa``, ``BTech``, ``MPDD``, ``MVTec3D`` (RGB only), ``Folder``, or any
dotted class path), lets it find (and, where anomalib can, download) its files, and merges their sample tables with a
``category`` column. No loader is re-implemented: images and masks are read by anomalib's dataset code.

Splits, following the reference code's cross-class training (``datasets/mvtec.py: MVTECANO``):

* **train**: every source category's normal training images, plus - with ``include_test=True`` - its test images,
  normal and anomalous with masks ("as we will not test on the training classes, using abnormal samples in test set
  is actually reasonable"); anomalous images without a mask are not trained on. ResAD uses only the normal images in
  its first stage;
* **val**: ``val_split_ratio`` of every source category's test images (label-aware, seeded), held out of training -
  validation (thresholds, normalisation) never looks at a target class;
* **test**: the test images of the ``targets`` categories - classes never seen in training - or the validation images
  when no targets are given. Target classes' normal training images are not trained on; they are the pool their
  k reference images are drawn from (:meth:`MultiClassDataModule.reference_pool`).

A target category that is also a source category is refused (that is not class generalization) unless
``allow_overlap=True``.

Each source/target entry is a dict: ``datamodule`` (anomalib class name or dotted path), ``categories`` (list, or
``"all"`` for the dataset's full category list), optionally ``domain`` (results are also averaged per domain), and any
further keys as that datamodule's arguments. String arguments
may contain ``{category}`` (e.g. a ``Folder`` ``root``).

Example:
    >>> datamodule = MultiClassDataModule(  # doctest: +SKIP
    ...     sources=[{"datamodule": "MVTecAD", "root": "./datasets/MVTecAD", "categories": "all"}],
    ...     targets=[{"datamodule": "Visa", "root": "./datasets/visa", "categories": ["candle", "pcb1"]}],
    ... )
"""

import importlib
import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import anomalib.data
import pandas as pd
from anomalib.data import AnomalibDataModule
from anomalib.data.datasets.base.image import AnomalibDataset
from anomalib.data.utils import TestSplitMode, ValSplitMode
from torchvision.transforms.v2 import Transform

from anomalib_resad.errors import ResADConfigurationError, ResADInputError

logger = logging.getLogger(__name__)

CATEGORY_COLUMN = "category"


@dataclass
class CategorySource:
    """Where the images of some categories come from.

    Attributes:
        datamodule (str): anomalib datamodule class name (``"MVTecAD"``) or dotted path.
        categories (list[str]): Category names.
        arguments (dict[str, Any]): Further datamodule arguments (``root`` ...); ``{category}`` is substituted.
        domain (str | None): The domain the categories belong to (``"boards"``): results are also averaged per
            domain, and a domain is held out whole. Defaults to ``None`` (each category is its own domain).
    """

    datamodule: str
    categories: list[str]
    arguments: dict[str, Any] = field(default_factory=dict)
    domain: str | None = None

    @classmethod
    def parse(cls, spec: "CategorySource | dict[str, Any]") -> "CategorySource":
        """Build from a config dict ``{"datamodule": ..., "categories": ..., **arguments}``."""
        if isinstance(spec, CategorySource):
            return spec
        spec = dict(spec)
        if "datamodule" not in spec:
            msg = f"A data source needs a 'datamodule' key (e.g. 'MVTecAD' or 'Folder'), got keys {sorted(spec)}."
            raise ResADConfigurationError(msg)
        datamodule = str(spec.pop("datamodule"))
        arguments = dict(spec.pop("init_args", {}))
        arguments.update(spec)
        categories = arguments.pop("categories", arguments.pop("category", None))
        domain = arguments.pop("domain", None)
        resolve_datamodule_class(datamodule)  # fail now, not at setup, on a misspelt name
        if categories is None or categories == "all":
            categories = list(known_categories(datamodule))
        elif isinstance(categories, str):
            categories = [categories]
        return cls(
            datamodule=datamodule,
            categories=[str(name) for name in categories],
            arguments=arguments,
            domain=None if domain is None else str(domain),
        )

    def datamodule_class(self) -> type[AnomalibDataModule]:
        """The anomalib datamodule class."""
        return resolve_datamodule_class(self.datamodule)

    def build(self, category: str) -> AnomalibDataModule:
        """Anomalib's datamodule of one category (whole test split, no validation split of its own)."""
        datamodule_class = self.datamodule_class()
        parameters = inspect.signature(datamodule_class.__init__).parameters
        arguments = {
            key: value.format(category=category) if isinstance(value, str) else value
            for key, value in self.arguments.items()
        }
        if "category" in parameters:
            arguments.setdefault("category", category)
        elif "name" in parameters:
            arguments.setdefault("name", category)
        if "val_split_mode" in parameters:
            arguments["val_split_mode"] = ValSplitMode.NONE
        if "test_split_mode" in parameters:
            arguments.setdefault("test_split_mode", TestSplitMode.FROM_DIR)
        arguments.setdefault("num_workers", 0)
        try:
            return datamodule_class(**arguments)
        except TypeError as error:
            msg = f"Cannot build {datamodule_class.__name__} for category '{category}': {error}."
            raise ResADConfigurationError(msg) from error


def resolve_datamodule_class(name: str) -> type[AnomalibDataModule]:
    """An anomalib datamodule class from its name in ``anomalib.data`` or a dotted path."""
    if "." in name:
        module_name, _, class_name = name.rpartition(".")
        try:
            datamodule_class = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as error:
            msg = f"Cannot import datamodule '{name}': {error}."
            raise ResADConfigurationError(msg) from error
    else:
        datamodule_class = getattr(anomalib.data, name, None)
    if not (inspect.isclass(datamodule_class) and issubclass(datamodule_class, AnomalibDataModule)):
        msg = f"'{name}' is not an anomalib datamodule. Use e.g. 'MVTecAD', 'Visa', 'BTech', 'MPDD', 'Folder'."
        raise ResADConfigurationError(msg)
    return datamodule_class


def known_categories(datamodule: str) -> tuple[str, ...]:
    """All categories of a benchmark dataset (its dataset module's ``CATEGORIES``)."""
    datamodule_class = resolve_datamodule_class(datamodule)
    dataset_module = datamodule_class.__module__.replace(".datamodules.", ".datasets.")
    try:
        categories = importlib.import_module(dataset_module).CATEGORIES
    except (ImportError, AttributeError):
        msg = f"{datamodule_class.__name__} has no fixed category list: give 'categories' explicitly."
        raise ResADConfigurationError(msg) from None
    return tuple(categories)


class MultiClassDataset(AnomalibDataset):
    """An anomalib dataset over a merged sample table (with a ``category`` column); items are read by anomalib.

    Args:
        samples (pd.DataFrame): anomalib sample table.
        task (str): ``"segmentation"`` or ``"classification"``.
        augmentations (Transform | None): Augmentations. Defaults to ``None``.
    """

    def __init__(self, samples: pd.DataFrame, task: str, augmentations: Transform | None = None) -> None:
        super().__init__(augmentations=augmentations)
        samples = samples.reset_index(drop=True)
        samples.attrs["task"] = task
        self.samples = samples
        self.samples.attrs["task"] = task


class MultiClassDataModule(AnomalibDataModule):
    """Source categories to train on and (optionally) target categories to test on, from any anomalib datasets.

    Args:
        sources (Sequence[dict]): Training categories (see the module docstring for the entry format).
        targets (Sequence[dict] | None): Unseen test categories. Defaults to ``None`` (test on held-out sources).
        include_test (bool): Also train on the source categories' test images (anomalies with masks), as the
            reference does. Defaults to ``True``.
        val_split_ratio (float): Share of every source category's test images held out for validation.
            Defaults to ``0.1``.
        allow_overlap (bool): Allow target categories that are also source categories. Defaults to ``False``.
        name (str): Name of the datamodule (results folder). Defaults to ``"multi_class"``.
        train_batch_size (int): Defaults to ``32``.
        eval_batch_size (int): Defaults to ``32``.
        num_workers (int): Defaults to ``2``.
        train_augmentations (Transform | None): Defaults to ``None``.
        val_augmentations (Transform | None): Defaults to ``None``.
        test_augmentations (Transform | None): Defaults to ``None``.
        augmentations (Transform | None): Defaults to ``None``.
        seed (int): Seed of the validation split. Defaults to ``0``.
    """

    def __init__(
        self,
        sources: Sequence[dict[str, Any]],
        targets: Sequence[dict[str, Any]] | None = None,
        include_test: bool = True,
        val_split_ratio: float = 0.1,
        allow_overlap: bool = False,
        name: str = "multi_class",
        train_batch_size: int = 32,
        eval_batch_size: int = 32,
        num_workers: int = 2,
        train_augmentations: Transform | None = None,
        val_augmentations: Transform | None = None,
        test_augmentations: Transform | None = None,
        augmentations: Transform | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(
            train_batch_size=train_batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            train_augmentations=train_augmentations,
            val_augmentations=val_augmentations,
            test_augmentations=test_augmentations,
            augmentations=augmentations,
            val_split_mode=ValSplitMode.NONE,  # the split below is per category
            seed=seed,
        )
        if not 0.0 <= val_split_ratio < 1.0:
            msg = f"val_split_ratio must be in [0, 1), got {val_split_ratio}."
            raise ResADConfigurationError(msg)
        self.sources = [CategorySource.parse(spec) for spec in sources]
        self.targets = [CategorySource.parse(spec) for spec in targets or []]
        self.include_test = include_test
        self.val_split_ratio = val_split_ratio
        self.allow_overlap = allow_overlap
        self._name = name
        self.source_categories = [name for source in self.sources for name in source.categories]
        self.target_categories = [name for target in self.targets for name in target.categories]
        check_categories(self.source_categories, self.target_categories, allow_overlap)
        self.category = "+".join(self.target_categories or self.source_categories)
        self.reference_samples = pd.DataFrame()

    @property
    def name(self) -> str:
        """Name of the datamodule."""
        return self._name

    def prepare_data(self) -> None:
        """Let every category's anomalib datamodule find (or download, where anomalib can) its files."""
        for source in [*self.sources, *self.targets]:
            for category in source.categories:
                source.build(category).prepare_data()

    def _setup(self, _stage: str | None = None) -> None:
        train, val, test, reference = [], [], [], []
        for source in self.sources:
            for category in source.categories:
                category_train, category_test = _category_samples(source, category)
                held_out = _label_aware_sample(category_test, self.val_split_ratio, self.seed)
                val.append(category_test.loc[held_out])
                train.append(category_train)
                if self.include_test:
                    train.append(_without_unmasked_anomalies(category_test.drop(index=held_out), category))
        for target in self.targets:
            for category in target.categories:
                category_train, category_test = _category_samples(target, category)
                test.append(category_test)
                reference.append(category_train[category_train.label_index == 0])
        task = (
            "segmentation"
            if any(frame.mask_path.astype(str).str.len().gt(0).any() for frame in val + test)
            else ("classification")
        )
        self.train_data = MultiClassDataset(pd.concat(train), task)
        val_samples = pd.concat(val) if val and sum(len(frame) for frame in val) else None
        if val_samples is None:  # no held-out images: validate on the training split's test images
            val_samples = self.train_data.samples[self.train_data.samples.split == "test"]
        # every image, per category (the protocol scores each category on its own, with or without masks)
        self.validation_samples = val_samples.reset_index(drop=True)
        self.target_samples = pd.concat(test).reset_index(drop=True) if test else self.validation_samples
        self.val_data = MultiClassDataset(_readable(val_samples, task), task)
        self.test_data = MultiClassDataset(_readable(self.target_samples, task), task)
        self.reference_samples = pd.concat(reference).reset_index(drop=True) if reference else pd.DataFrame()

    def _create_test_split(self) -> None:
        """The splits are made per category in :meth:`_setup`."""

    def domain_of(self, category: str) -> str:
        """The domain of a target or source category (its entry's ``domain``, else the category itself).

        A category that is both (``allow_overlap``) takes its target entry's: results are reported for targets.
        """
        for entry in [*self.targets, *self.sources]:
            if category in entry.categories:
                return entry.domain or category
        return category

    def reference_pool(self, category: str) -> list[str]:
        """Normal images a category's references may be drawn from (its training split).

        Args:
            category (str): A source or target category.

        Returns:
            list[str]: Image paths.
        """
        frames = [self.train_data.samples]
        if len(self.reference_samples):
            frames.append(self.reference_samples)
        samples = pd.concat(frames)
        pool = samples[(samples[CATEGORY_COLUMN] == category) & (samples.label_index == 0) & (samples.split == "train")]
        return sorted(pool.image_path.astype(str).unique())


def check_categories(sources: Sequence[str], targets: Sequence[str], allow_overlap: bool = False) -> None:
    """Refuse duplicate categories and, unless allowed, targets that are also sources."""
    for kind, names in (("source", sources), ("target", targets)):
        duplicates = sorted({name for name in names if list(names).count(name) > 1})
        if duplicates:
            msg = f"Duplicate {kind} categories {duplicates}: every category may appear once."
            raise ResADConfigurationError(msg)
    overlap = sorted(set(sources) & set(targets))
    if overlap and not allow_overlap:
        msg = (
            f"Target categories {overlap} are also source (training) categories: that is not class generalization. "
            "Remove them from the sources or the targets, or set allow_overlap=True to do it anyway."
        )
        raise ResADConfigurationError(msg)


def _category_samples(source: CategorySource, category: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train and test sample tables of one category, read by anomalib's own datamodule."""
    datamodule = source.build(category)
    try:
        datamodule.setup()
    except (FileNotFoundError, RuntimeError, ValueError) as error:
        msg = (
            f"Cannot read category '{category}' of {source.datamodule} ({error}). Check its root folder: "
            f"{source.arguments.get('root', '(default root)')}."
        )
        raise ResADInputError(msg) from error
    frames = []
    for subset in (datamodule.train_data, datamodule.test_data):
        samples = subset.samples.copy()
        samples[CATEGORY_COLUMN] = category
        if "mask_path" not in samples:
            samples["mask_path"] = ""
        samples["mask_path"] = samples["mask_path"].fillna("").astype(str)
        frames.append(samples)
    train, test = frames
    if not (train.label_index == 0).any():
        msg = f"Category '{category}' of {source.datamodule} has no normal training images."
        raise ResADInputError(msg)
    train["split"], test["split"] = "train", "test"
    return train, test


def _without_unmasked_anomalies(samples: pd.DataFrame, category: str) -> pd.DataFrame:
    """Training rows less the anomalous images without a mask.

    The flows learn every position outside a defect's mask as normal, so an anomalous image with no mask would teach
    them its defect as normal. Such images (datasets with image-level labels only) stay in validation and test.
    """
    unmasked = (samples.label_index == 1) & (samples.mask_path.astype(str).str.len() == 0)
    if unmasked.any():
        logger.info(
            "Category '%s': %d anomalous image(s) without a mask are not trained on (validated and tested only).",
            category,
            int(unmasked.sum()),
        )
    return samples[~unmasked]


def _readable(samples: pd.DataFrame, task: str) -> pd.DataFrame:
    """Rows one dataset of ``task`` can read: a segmentation dataset needs a mask for every anomalous image.

    Categories with image-level labels only (no masks) beside ones with masks: their anomalous images are left out
    of Lightning's validation and test sets (pixel metrics need masks); ``resad evaluate`` scores every category on
    its own, image-level where it has no masks (:attr:`MultiClassDataModule.target_samples`).
    """
    if task != "segmentation":
        return samples
    unmasked = (samples.label_index == 1) & (samples.mask_path.astype(str).str.len() == 0)
    if unmasked.any():
        logger.info("%d anomalous image(s) without a mask are left out of a pixel-level evaluation set.", sum(unmasked))
    return samples[~unmasked]


def _label_aware_sample(samples: pd.DataFrame, ratio: float, seed: int) -> pd.Index:
    """Index of a seeded ``ratio`` share of each label (at least one image per label when ``ratio > 0``)."""
    if ratio <= 0 or samples.empty:
        return samples.index[:0]
    chosen = []
    for _, group in samples.groupby("label_index"):
        count = max(1, round(len(group) * ratio))
        chosen.append(group.sample(n=min(count, len(group) - 1) if len(group) > 1 else 0, random_state=seed).index)
    return chosen[0].append(chosen[1:]) if chosen else samples.index[:0]
