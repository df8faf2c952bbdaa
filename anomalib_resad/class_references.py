# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""One room for the k-shot references of every class: selection, cached features, calibrated banks, routing.

ResAD needs k normal images of a class wherever it scores that class, and in training it draws fresh references for
every class in every batch. :class:`ClassReferences` owns all of it:

* **selection** - the first k images of a folder, or k images drawn with a seed from the class's normal pool
  (:meth:`ClassReferences.select`);
* **features** - each image's backbone features are computed once and cached (bounded in bytes), so training draws
  and evaluation banks never re-run the backbone on an image (evaluation banks cache each image's flipped and
  rotated views as well: :mod:`~anomalib_resad.reference_views`);
* **banks** - a class's calibrated :class:`~anomalib_resad.feature_converter.ReferenceBank` (features + the class's
  :class:`~anomalib_resad.calibration.Scoring`), built once per set of files (:meth:`ClassReferences.bank`) and
  measured again once the trained part changed (:meth:`ClassReferences.forget_scoring`, after every training
  epoch); training banks (:meth:`ClassReferences.training_bank`) skip the calibration;
* **routing** - which class's bank is the stored one (saved in checkpoints, baked into exports), whether it is pinned
  (kept in later evaluations instead of drawn again), and the banks of the other classes of a multi-class
  evaluation set (:meth:`ClassReferences.prepare_evaluation`, :meth:`ClassReferences.bank_of`).

It is built from two callables - an encoder (image files -> per-level features) and a calibrator (features ->
scoring record) - so it never reaches into the Lightning module; training, evaluation, ``anomalib export``,
``resad export``/``references`` and the demo all get their banks from here.

Example:
    >>> import torch
    >>> from anomalib_resad.calibration import Scoring
    >>> def encode(paths, bank=False):  # features of each file (x 4 views in a bank), image size, views per level
    ...     views = 4 if bank else 1
    ...     return [torch.rand(len(paths) * views, 4, 3, 3)], (12, 12), (views,)
    >>> def calibrate(features, image_size, paths, views):
    ...     return Scoring.neutral(num_levels=1)
    >>> references = ClassReferences(encode, calibrate)
    >>> references.set_pools({"widget": ["a.png", "b.png", "c.png"]})
    >>> bank = references.bank(references.select("widget", k=2, seed=0))
    >>> bank.k, bank.views, tuple(bank.levels[0].shape)
    (2, [4], (72, 4))
    >>> references.training_bank("widget", 2, random.Random(0)).views
    [1]
"""

import logging
import random
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from anomalib.data.transforms.utils import extract_transforms_by_type
from torchvision.transforms.v2 import Resize

from .calibration import Scoring
from .errors import ResADInputError
from .feature_converter import ReferenceBank
from .references import ReferenceSelection, is_blank_image, load_images, sample_references, select_folder_references
from .torch_model import ResADModel

logger = logging.getLogger(__name__)

# (files, whether for an evaluation bank) -> per-level features of every file (and its views in a bank), file by
# file, the pre-processed image size and the views per file in each level
Encoder = Callable[[Sequence[str], bool], tuple[list[torch.Tensor], tuple[int, int], tuple[int, ...]]]
# (per-level bank features of k files, image size, their files, views per level) -> the class's scoring record
Calibrator = Callable[[Sequence[torch.Tensor], tuple[int, int], Sequence[str], Sequence[int]], Scoring]
CACHE_BYTES = 1 << 30  # cached reference features: 1 GiB


class FeatureCache:
    """Per-image backbone features by key, least recently used first out, bounded in bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, list[torch.Tensor]] = OrderedDict()
        self._bytes = 0

    def clear(self) -> None:
        """Drop everything (the backbone or the pre-processing changed)."""
        self._entries.clear()
        self._bytes = 0

    def get(self, key: str) -> list[torch.Tensor] | None:
        """Per-level features ``(views_l, C_l, H_l, W_l)`` of an image, or ``None``."""
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        return None

    def put(self, key: str, features: list[torch.Tensor]) -> None:
        """Store the per-level features of one image, evicting old entries beyond the budget."""
        size = sum(feature.numel() * feature.element_size() for feature in features)
        if size > self.max_bytes:
            return
        self._entries[key] = features
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= sum(feature.numel() * feature.element_size() for feature in evicted)


class FileEncoder:
    """Image files -> per-level backbone features of a :class:`ResADModel` (and its calibration of a class).

    Images are read as RGB. Blank frames are not refused here: training draws from whole pools, as the reference
    does; evaluation banks check their images (:meth:`ClassReferences.bank`).

    Args:
        model (ResADModel): The model whose backbone encodes the images.
        transform (Callable | None): Pre-processing (resize + normalise) applied to each image.
    """

    def __init__(self, model: ResADModel, transform: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
        self.model = model
        self.transform = transform

    def _images(self, paths: Sequence[str], references: bool = False) -> torch.Tensor:
        size = self.input_size() if references else None
        return load_images(paths, self.transform, references_for=size).to(next(self.model.parameters()).device)

    def input_size(self) -> tuple[int, int] | None:
        """The pre-processed image size (the transform's resize), ``None`` without one."""
        resizes = extract_transforms_by_type(self.transform, Resize) if self.transform is not None else []
        if not resizes:
            return None
        size = resizes[0].size
        return (int(size[0]), int(size[-1])) if isinstance(size, list | tuple) else (int(size), int(size))

    @torch.no_grad()
    def __call__(
        self, paths: Sequence[str], bank: bool = False
    ) -> tuple[list[torch.Tensor], tuple[int, int], tuple[int, ...]]:
        """Features ``(n * views_l, C_l, H_l, W_l)`` per level, the pre-processed image size and the views per level.

        ``bank``: each image's views where the model's evaluation banks hold them (:meth:`ResADModel.bank_features`).
        """
        images = self._images(paths, references=bank)  # an evaluation bank's images are checked as references
        size = (int(images.shape[-2]), int(images.shape[-1]))
        if bank:
            return self.model.bank_features(images), size, tuple(self.model.bank_views(size))
        return self.model.reference_features(images), size, (1,) * self.model.num_levels

    @torch.no_grad()
    def calibrate(
        self,
        features: Sequence[torch.Tensor],
        image_size: tuple[int, int],
        paths: Sequence[str],
        views: Sequence[int],
    ) -> Scoring:
        """The class's scoring record from its k references' bank features (the files give their synthetic defects)."""
        return self.model.calibrate(features, image_size, self._images(paths), views)


class ClassReferences:
    """The k-shot references of every class.

    Args:
        encode (Encoder): Image files -> (per-level features, pre-processed image size, views per level).
        calibrate (Calibrator): Per-level bank features of k images -> the class's scoring record.
        cache_bytes (int): Memory for cached per-image features. Defaults to 1 GiB.

    Attributes:
        stored (ReferenceSelection | None): The references of the stored bank (the model's buffers).
        pinned (bool): Keep the stored references for their class in later evaluations instead of drawing them.
        eval_banks (dict[str, ReferenceBank]): Banks of the other classes of the data being evaluated.
    """

    def __init__(
        self,
        encode: Encoder,
        calibrate: Calibrator,
        cache_bytes: int = CACHE_BYTES,
    ) -> None:
        self.encode = encode
        self.calibrate = calibrate
        self.cache = FeatureCache(cache_bytes)
        self.pools: dict[str, list[str]] = {}
        self.stored: ReferenceSelection | None = None
        self.pinned = False
        self.eval_banks: dict[str, ReferenceBank] = {}
        self._banks: dict[tuple[str, ...], ReferenceBank] = {}
        self._stale = False  # the stored bank's scoring was measured with trained weights that have changed since
        self._image_size: tuple[int, int] | None = None
        self._layouts: dict[bool, tuple[int, ...]] = {}  # views per level of plain and of bank features

    @classmethod
    def for_model(
        cls,
        model: ResADModel,
        transform: Callable[[torch.Tensor], torch.Tensor] | None,
        cache_bytes: int = CACHE_BYTES,
    ) -> "ClassReferences":
        """References encoded and calibrated by ``model``, images pre-processed with ``transform``."""
        encoder = FileEncoder(model, transform)
        return cls(encoder, encoder.calibrate, cache_bytes)

    def clear(self) -> None:
        """Forget cached features and banks (the model changed: new training, new weights)."""
        self.cache.clear()
        self._layouts.clear()
        self.forget_scoring()

    def forget_scoring(self) -> None:
        """Measure every class's scoring again where it is next needed: the trained part changed (a training step).

        A scoring record holds the flows' constants and maxima, so one measured before a training step no longer fits
        the model after it; the stored bank is calibrated again at the next evaluation, before a checkpoint is saved,
        before an export or a prediction (:meth:`needs_recalibration`). Features and matching choices stay: the
        backbone is frozen.
        """
        self._banks.clear()
        self.eval_banks = {}
        self._stale = True

    def store(self, selection: ReferenceSelection, pinned: bool) -> None:
        """Record ``selection`` as the stored bank's references, just calibrated with the current weights."""
        self.stored = selection
        self.pinned = pinned
        self._stale = False

    def needs_recalibration(self) -> bool:
        """Whether the stored bank's scoring predates the trained part's last change (:meth:`forget_scoring`).

        A stored bank whose reference files are not on this machine (a checkpoint made elsewhere, trained further
        here) cannot be measured again: it keeps the record it holds, with a warning naming the fix (once: the bank
        then counts as up to date).
        """
        if not self._stale or self.stored is None:
            return False
        missing = [path for path in self.stored.paths if not Path(path).is_file()]
        if missing:
            logger.warning(
                "ResAD: the stored references of class '%s' are not on this machine (%s): the class keeps the scoring "
                "measured with earlier weights. Give --model.reference_dir <folder of k normal images of it> to "
                "calibrate it with these weights.",
                self.stored.class_name,
                missing[0] if len(missing) == 1 else f"{missing[0]} and {len(missing) - 1} more",
            )
            self._stale = False
            return False
        return True

    def set_pools(self, pools: Mapping[str, Sequence[str]]) -> None:
        """The normal images each class's references may be drawn from (e.g. its training split)."""
        self.pools = {name: sorted(map(str, paths)) for name, paths in pools.items()}

    # ------------------------------------------------------------------ selection
    def select(
        self,
        class_name: str,
        k: int,
        seed: int = 42,
        folder: str | Path | None = None,
        source: str = "training split",
    ) -> ReferenceSelection:
        """Choose the k reference images of a class: the first k of ``folder``, else a seeded draw from its pool.

        Raises:
            ResADInputError: No folder and no pool for the class, or fewer than k images.
        """
        if folder is not None:
            return select_folder_references(folder, k, class_name)
        pool = self.pools.get(class_name)
        if not pool:
            msg = (
                f"No reference images for class '{class_name}': give --model.reference_dir <folder of k normal "
                "images>, a datamodule with normal training images of the class, or a checkpoint with references."
            )
            raise ResADInputError(msg)
        where = f"the normal training images of class '{class_name}'"
        paths = sample_references(pool, k, seed, where, usable=lambda path: not is_blank_image(path))
        return ReferenceSelection(class_name=class_name, paths=paths, source=source, seed=seed)

    # ------------------------------------------------------------------ features and banks
    def features(self, paths: Sequence[str], bank: bool = False) -> list[torch.Tensor]:
        """Per-level features of files, each encoded once: ``(n * views_l, C_l, H_l, W_l)``.

        ``bank``: with each image's views where evaluation banks hold them, cached under their own key (training
        draws read the images alone).
        """
        paths = [str(path) for path in paths]
        keys = {path: f"{path}\0bank" if bank else path for path in paths}
        missing = [path for path in dict.fromkeys(paths) if self.cache.get(keys[path]) is None]
        computed = {}
        if missing:
            encoded, self._image_size, self._layouts[bank] = self.encode(missing, bank)
            counts = [int(level.shape[0]) // len(missing) for level in encoded]  # rows per file, per level
            computed = {
                path: [level[index * count : (index + 1) * count] for level, count in zip(encoded, counts, strict=True)]
                for index, path in enumerate(missing)
            }
            for path, features in computed.items():
                self.cache.put(keys[path], features)
        per_image = [self.cache.get(keys[path]) or computed.get(path) for path in paths]
        if any(features is None for features in per_image):  # cache smaller than one image: encode directly
            encoded, self._image_size, self._layouts[bank] = self.encode(paths, bank)
            return encoded
        return [torch.cat(level) for level in zip(*per_image, strict=True)]

    def bank(self, selection: ReferenceSelection) -> ReferenceBank:
        """The calibrated bank of a class's selected references (built once per set of files)."""
        key = tuple(selection.paths)
        if key not in self._banks:
            features = self.features(selection.paths, bank=True)
            views = self._layouts[True]
            scoring = self.calibrate(features, self._image_size, selection.paths, views)
            self._banks[key] = ReferenceBank.from_features(features, views, scoring)
            logger.info(
                "ResAD references of class '%s' (k=%d, %s): %s",
                selection.class_name,
                selection.k,
                selection.source or "given",
                selection.paths,
            )
        return self._banks[key]

    def training_bank(self, class_name: str, k: int, rng: random.Random) -> ReferenceBank:
        """Fresh, uncalibrated references of a class for one training step (``k`` drawn from its pool)."""
        pool = self.pools.get(class_name)
        if not pool:
            msg = f"No normal training images of class '{class_name}' to draw training references from."
            raise ResADInputError(msg)
        paths = rng.sample(pool, k) if len(pool) >= k else rng.choices(pool, k=k)
        return ReferenceBank.from_features(self.features(paths))

    # ------------------------------------------------------------------ routing
    def prepare_evaluation(
        self, classes: Sequence[str], select: Callable[[str], ReferenceSelection], folder: bool
    ) -> ReferenceSelection | None:
        """A calibrated bank for every class about to be evaluated, each built once.

        The stored references stay where they are pinned to a class being evaluated (and no folder overrides them);
        otherwise the stored bank becomes the stored class's (or the first class's) fresh selection. The other classes'
        banks go to :attr:`eval_banks`. A stored bank that :meth:`needs_recalibration` is always returned, to be
        calibrated again.

        Args:
            classes (Sequence[str]): The classes of the data to evaluate.
            select (Callable[[str], ReferenceSelection]): A class's references (a folder, or a seeded draw).
            folder (bool): The references come from one folder (``reference_dir``): one class only, and it wins.

        Returns:
            ReferenceSelection | None: The selection to store as the model's bank, or ``None`` to keep the stored one.

        Raises:
            ResADInputError: A folder of references for data of several classes.
        """
        classes = sorted(set(classes))
        if len(classes) > 1 and folder:
            msg = f"reference_dir holds references of one class, but the evaluated data has classes {classes}."
            raise ResADInputError(msg)
        stored = self.stored
        keep = not folder and self.pinned and stored is not None and stored.class_name in classes
        selections = {name: select(name) for name in classes if not (keep and name == stored.class_name)}
        to_store = None
        if not keep:
            primary = stored.class_name if stored is not None and stored.class_name in classes else classes[0]
            if stored is None or stored.paths != selections[primary].paths or self.needs_recalibration():
                to_store = selections[primary]
        elif self.needs_recalibration():
            to_store = stored
        stored_class = (to_store or stored).class_name
        self.eval_banks = {name: self.bank(choice) for name, choice in selections.items() if name != stored_class}
        return to_store

    def bank_of(self, class_name: str) -> ReferenceBank | None:
        """The bank to score ``class_name`` with: ``None`` for the stored class (the model's own buffers)."""
        if self.stored is not None and class_name == self.stored.class_name:
            return None
        return self.eval_banks.get(class_name)
