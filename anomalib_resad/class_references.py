# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""One room for the k-shot references of every class: selection, cached features, calibrated banks.

ResAD needs k normal images of a class wherever it scores that class, and in training it draws fresh references for
every class in every batch. :class:`ClassReferences` owns all of it:

* **selection** - the first k images of a folder, or k images drawn with a seed from the class's normal pool
  (:meth:`ClassReferences.select`);
* **features** - each image's backbone features are computed once and cached (bounded in bytes), so training draws
  and evaluation banks never re-run the backbone on an image (evaluation banks with ``reference_views`` cache each
  image's views as well: :mod:`~anomalib_resad.reference_views`);
* **banks** - a class's calibrated :class:`~anomalib_resad.feature_converter.ReferenceBank` (features + the
  leave-one-out calibration of :mod:`anomalib_resad.anomaly_map`), built once per set of files
  (:meth:`ClassReferences.bank`); training banks (:meth:`ClassReferences.training_bank`) skip the calibration.

It is built from two callables - an encoder (image files -> per-level features) and a calibrator (features ->
calibration) - so it never reaches into the Lightning module; training, evaluation, ``anomalib export``,
``resad export``/``references`` and the demo all get their banks from here.

Example:
    >>> import torch
    >>> def encode(paths, views=1):  # per-level features of each file (x its views), the pre-processed size
    ...     return [torch.rand(len(paths) * views, 4, 3, 3)], (12, 12)
    >>> def calibrate(features, image_size, paths):
    ...     return torch.ones(4)
    >>> references = ClassReferences(encode, calibrate)
    >>> references.set_pools({"widget": ["a.png", "b.png", "c.png"]})
    >>> selection = references.select("widget", k=2, seed=0)
    >>> bank = references.bank(selection)
    >>> bank.k, tuple(bank.levels[0].shape), bank.calibration.tolist()
    (2, (18, 4), [1.0, 1.0, 1.0, 1.0])
    >>> with_views = ClassReferences(encode, calibrate, bank_views=lambda: (4,))
    >>> with_views.set_pools({"widget": ["a.png", "b.png", "c.png"]})
    >>> bank = with_views.bank(with_views.select("widget", k=2, seed=0))
    >>> bank.k, bank.views, tuple(bank.levels[0].shape)
    (2, [4], (72, 4))
"""

import logging
import random
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from .errors import ResADInputError
from .feature_converter import ReferenceBank
from .references import ReferenceSelection, is_blank_image, load_images, sample_references, select_folder_references
from .torch_model import ResADModel

logger = logging.getLogger(__name__)

# (files, views per file) -> per-level features of every file's views, file by file, and the pre-processed image size
Encoder = Callable[[Sequence[str], int], tuple[list[torch.Tensor], tuple[int, int]]]
Calibrator = Callable[[Sequence[torch.Tensor], tuple[int, int], Sequence[str]], torch.Tensor]


class FeatureCache:
    """Per-image backbone features by file, least recently used first out, bounded in bytes."""

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

    @torch.no_grad()
    def __call__(self, paths: Sequence[str], views: int = 1) -> tuple[list[torch.Tensor], tuple[int, int]]:
        """Features ``(n * views, C_l, H_l, W_l)`` per level and the pre-processed image size.

        ``views`` > 1: each image's views of the model's ``reference_views``, image by image.
        """
        device = next(self.model.parameters()).device
        images = load_images(paths, self.transform).to(device)
        size = (int(images.shape[-2]), int(images.shape[-1]))
        if views > 1:  # the model's evaluation bank: views on the levels that hold them (``bank_views``)
            return self.model.bank_features(images), size
        return self.model.reference_features(images), size

    def bank_views(self) -> tuple[int, ...]:
        """Views per reference image in each level of the model's evaluation banks (``ResADModel.bank_views``)."""
        return tuple(self.model.bank_views)

    @torch.no_grad()
    def calibrate(
        self, features: Sequence[torch.Tensor], image_size: tuple[int, int], paths: Sequence[str]
    ) -> torch.Tensor:
        """The class's flat calibration from its k references' features (and files; their views, image by image).

        The files are read again only where the calibration needs the images themselves
        (``nearest_averaging="auto"``: synthetic defects are pasted into them); otherwise the cached features do.
        """
        images = None
        if self.model.nearest_averaging == "auto":
            images = load_images(paths, self.transform).to(features[0].device)
        views = [int(level.shape[0]) // len(paths) for level in features]
        return self.model.calibrate(features, image_size, images, views=views)


class ClassReferences:
    """The k-shot references of every class.

    Args:
        encode (Encoder): Image files -> (per-level features ``(n, C_l, H_l, W_l)``, pre-processed image size).
        calibrate (Calibrator): (per-level features of k images, image size, their files) -> the class's flat
            calibration.
        cache_bytes (int): Memory for cached per-image features. Defaults to 1 GiB.
        bank_views (Callable[[], tuple[int, ...]] | None): Views per reference image in each level of evaluation
            banks (the model's ``reference_views``); ``None``: the images alone.
    """

    def __init__(
        self,
        encode: Encoder,
        calibrate: Calibrator,
        cache_bytes: int = 1 << 30,
        bank_views: Callable[[], tuple[int, ...]] | None = None,
    ) -> None:
        self.encode = encode
        self.calibrate = calibrate
        self.bank_views = bank_views or (lambda: (1,))
        self.cache = FeatureCache(cache_bytes)
        self.pools: dict[str, list[str]] = {}
        self._banks: dict[tuple[str, ...], ReferenceBank] = {}
        self._image_size: tuple[int, int] | None = None

    @classmethod
    def for_model(
        cls,
        model: ResADModel,
        transform: Callable[[torch.Tensor], torch.Tensor] | None,
        cache_bytes: int = 1 << 30,
    ) -> "ClassReferences":
        """References encoded and calibrated by ``model``, images pre-processed with ``transform``."""
        encoder = FileEncoder(model, transform)
        return cls(encoder, encoder.calibrate, cache_bytes, encoder.bank_views)

    def clear(self) -> None:
        """Forget cached features and banks (the model changed: new training, new weights)."""
        self.cache.clear()
        self._banks.clear()

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
    def features(self, paths: Sequence[str], views: int | Sequence[int] = 1) -> list[torch.Tensor]:
        """Per-level features of files, each encoded once: ``(n, C_l, H_l, W_l)``.

        With ``views`` > 1 (a count, or the per-level layout of the model's ``bank_views``): the encoder's views of
        each file in turn, ``(n * views_l, ...)``.
        """
        paths = [str(path) for path in paths]
        # an image's views are cached under their own key (with the per-level layout): training draws read the
        # images alone
        layout = (views,) if isinstance(views, int) else tuple(views)
        views = max(layout)
        keys = {path: path if views == 1 else f"{path}\0views={layout}" for path in paths}
        missing = [path for path in dict.fromkeys(paths) if self.cache.get(keys[path]) is None]
        if missing:
            encoded, self._image_size = self.encode(missing, views)
            counts = [int(level.shape[0]) // len(missing) for level in encoded]  # views per file, per level
            computed = {
                path: [level[index * count : (index + 1) * count] for level, count in zip(encoded, counts, strict=True)]
                for index, path in enumerate(missing)
            }
            for path, features in computed.items():
                self.cache.put(keys[path], features)
        else:
            computed = {}
        per_image = [self.cache.get(keys[path]) or computed.get(path) for path in paths]
        if any(features is None for features in per_image):  # cache smaller than one image: encode directly
            encoded, self._image_size = self.encode(paths, views)
            return encoded
        return [torch.cat(level) for level in zip(*per_image, strict=True)]

    def bank(self, selection: ReferenceSelection) -> ReferenceBank:
        """The calibrated bank of a class's selected references (built once per set of files)."""
        views = self.bank_views()
        key = (*selection.paths, f"views={views}")
        if key not in self._banks:
            blank = [path for path in selection.paths if is_blank_image(path)]
            if blank:
                msg = (
                    f"Reference image(s) {blank} of class '{selection.class_name}' are blank (constant) frames: they "
                    "show nothing to compare against. Use k normal images of the class as references."
                )
                raise ResADInputError(msg)
            features = self.features(selection.paths, views)
            if self._image_size is None:  # features cached before a clear(): learn the pre-processed size again
                _, self._image_size = self.encode(selection.paths[:1], 1)
            calibration = self.calibrate(features, self._image_size, selection.paths)
            per_level = [int(level.shape[0]) // selection.k for level in features]  # one count per feature level
            self._banks[key] = ReferenceBank.from_features(features, calibration, per_level)
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
