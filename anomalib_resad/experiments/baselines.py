# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""Few-shot baselines run on exactly the same reference images as ResAD: PatchCore, WinCLIP and AnomalyDINO.

Each baseline is anomalib's own model, given the k reference images of a class (one
:class:`~anomalib_resad.references.ReferenceSelection`, the object ResAD's ``ClassReferences.select`` makes) through
:meth:`set_references`; scoring then runs its pure torch model (``baseline.model.model``) like ResAD's.

* ``patchcore`` - :class:`FewShotPatchcore`: anomalib has no k-shot PatchCore; its ``Patchcore`` memory bank is filled
  with every patch of the k images (with k images a coreset would only discard evidence), with ResAD's backbone,
  weights and input size.
* ``patchcore_views`` - the same PatchCore, its memory bank also holding each reference image's flipped and rotated
  views (ResAD's ``reference_views`` mode, :mod:`~anomalib_resad.reference_views`): PatchCore given what ResAD's
  evaluation banks get, so a comparison can tell the views' share of ResAD's lead from the rest. Row
  ``PatchCore+views``.
* ``winclip`` - :class:`FewShotWinClip`: anomalib's ``WinClip(class_name=<category>, k_shot=k,
  few_shot_source=<folder>)``, the folder holding exactly the selected images (symbolic links). Needs the package
  ``open_clip`` (``pip install 'anomalib-resad[baselines]'``) and the ``ViT-B-16-plus-240`` / ``laion400m_e31``
  weights. Fixed input of 240 px.
* ``anomaly_dino`` - :class:`FewShotAnomalyDINO`: anomalib's ``AnomalyDINO`` (kNN over DINOv2 patch features,
  ``vit_small_patch14_dinov2.lvd142m``), its memory bank filled with the k images. Input 252 px.

Weights are looked up on disk only (:func:`find_weights`, no network access, no wait): the Hugging Face cache and,
for WinCLIP, open_clip's own cache ``~/.cache/clip``, or a file the user names (``baseline_weights`` of
``resad evaluate``). A baseline whose package or weights are absent is skipped with one log line naming what is
missing and the command that fetches it on a machine with internet (:class:`MissingWeights`); no other weights are
ever used under its name.

Example:
    >>> baseline = FewShotPatchcore("tf_efficientnet_lite0", ["blocks.2", "blocks.4"], weights)  # doctest: +SKIP
    >>> baseline.set_references(selection)  # doctest: +SKIP
    >>> scores = score_samples(baseline.model, test_samples)  # doctest: +SKIP
    >>> find_weights("winclip", None, cache_dir="/nonexistent").model  # doctest: +SKIP
    'WinCLIP'
"""

import importlib.util
import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import timm
import torch
from anomalib.data.predict import PredictDataset
from anomalib.models import AnomalyDINO, Patchcore, WinClip
from anomalib.models.components import AnomalibModule
from anomalib.models.image.winclip import torch_model as winclip_torch_model
from torch.utils.data import DataLoader

from ..feature_extractor import ResADFeatureExtractor
from ..lightning_model import ResAD
from ..reference_views import reference_views as views_of
from ..references import ReferenceSelection, load_images

logger = logging.getLogger(__name__)

BASELINES = ("patchcore", "patchcore_views", "winclip", "anomaly_dino")
# Row names in the result tables.
BASELINE_NAMES = {
    "patchcore": "PatchCore",
    "patchcore_views": "PatchCore+views",
    "winclip": "WinCLIP",
    "anomaly_dino": "AnomalyDINO",
}
SKIPPED_STATUS = "skipped: no weights"
WINCLIP_ARCHITECTURE = winclip_torch_model.BACKBONE  # "ViT-B-16-plus-240"
WINCLIP_TAG = winclip_torch_model.PRETRAINED  # "laion400m_e31"
ANOMALY_DINO_ENCODER = "vit_small_patch14_dinov2.lvd142m"
_OPEN_CLIP_HF_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_TIMM_HF_FILES = ("model.safetensors", "pytorch_model.bin")


def _store_reference_embeddings(
    module: AnomalibModule, selection: ReferenceSelection, reference_views: str = "none"
) -> torch.nn.Module:
    """Run a memory-bank model's torch model in training mode on the reference images (fills ``embedding_store``).

    PatchCore and AnomalyDINO collect their memory bank this way in anomalib's ``training_step``; the caller turns
    the store into the bank (each model its own way) and puts the model back in eval mode. ``reference_views``:
    each image's views too (:func:`~anomalib_resad.reference_views.reference_views`).
    """
    torch_model = module.model
    images = views_of(load_images(selection.paths, module.pre_processor.transform), reference_views)
    images = images.to(module.device)
    torch_model.train()
    torch_model.embedding_store.clear()
    torch_model(images)
    return torch_model


class FewShotPatchcore:
    """anomalib ``Patchcore`` whose memory bank holds every patch of k reference images.

    Args:
        backbone (str): timm backbone.
        layers (Sequence[str]): Feature levels (PatchCore uses two middle levels).
        pre_trained (bool | str | Path): timm weights, ``False``, or a local weights file (as for ResAD).
        image_size (int): Input size. Defaults to ``224``.
        num_neighbors (int): PatchCore's re-weighting neighbours. Defaults to ``9``.
        reference_views (str): ``"none"``, or the memory bank also holds each image's ``"flips"`` / ``"dihedral"``
            views (as ResAD's ``reference_views``). Defaults to ``"none"``.
    """

    def __init__(
        self,
        backbone: str,
        layers: Sequence[str],
        pre_trained: bool | str | Path = True,
        image_size: int = 224,
        num_neighbors: int = 9,
        reference_views: str = "none",
    ) -> None:
        self.reference_views = reference_views
        pre_processor = ResAD.configure_pre_processor(image_size=image_size, backbone=backbone)  # same inputs as ResAD
        self.model = Patchcore(
            backbone=backbone,
            layers=layers,
            pre_trained=False,
            num_neighbors=num_neighbors,
            pre_processor=pre_processor,
            post_processor=False,
            evaluator=False,
            visualizer=False,
        )
        if pre_trained:  # same weights as ResAD, loaded by the same code (local files included)
            extractor = ResADFeatureExtractor(backbone, layers, pre_trained)
            extractor.load_pretrained_weights()
            self.model.model.feature_extractor.feature_extractor.load_state_dict(
                extractor.extractor.feature_extractor.state_dict(),
            )

    @torch.no_grad()
    def set_references(self, selection: ReferenceSelection) -> None:
        """Fill the memory bank with all patches of the reference images (and of their views)."""
        torch_model = _store_reference_embeddings(self.model, selection, self.reference_views)
        torch_model.memory_bank = torch.vstack(torch_model.embedding_store)
        torch_model.embedding_store.clear()
        torch_model.eval()


@dataclass(frozen=True)
class MissingWeights:
    """Why a baseline cannot run here, and how to fix it on a machine with internet.

    Attributes:
        model (str): Row name of the baseline (``"WinCLIP"``).
        key (str): Its name in ``baselines`` / ``baseline_weights`` (``"winclip"``).
        missing (str): The package or files that were looked for.
        fetch (str): The command that fetches them.
    """

    model: str
    key: str
    missing: str
    fetch: str

    def message(self) -> str:
        """One log line: what is missing, the command that fetches it, and the config key for a local file."""
        return (
            f"{self.model} skipped ({SKIPPED_STATUS}): {self.missing} not found. On a machine with internet run "
            f"`{self.fetch}` and copy the result here, or name the file with "
            f"`baseline_weights: {{{self.key}: <file>}}`."
        )


def _hf_cached_file(repo_id: str, filenames: Sequence[str], cache_dir: str | Path | None) -> Path | None:
    """A file of a Hugging Face repository already in the local cache (no network access), else ``None``."""
    from huggingface_hub import try_to_load_from_cache

    for filename in filenames:
        found = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir)
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None


def _hf_cache_name(cache_dir: str | Path | None) -> str:
    if cache_dir is not None:
        return str(cache_dir)
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _given_file(key: str, model: str, path: str | Path, fetch: str) -> Path | MissingWeights:
    file = Path(path).expanduser()
    if file.is_file():
        return file
    return MissingWeights(model, key, f"the weights file '{file}' given in baseline_weights", fetch)


def find_winclip_weights(path: str | Path | None = None, cache_dir: str | Path | None = None) -> Path | MissingWeights:
    """The local file of WinCLIP's ``ViT-B-16-plus-240`` / ``laion400m_e31`` weights, or what is missing.

    Looks, in this order, at ``path``, the Hugging Face cache (open_clip >= 2.2 downloads from there,
    ``timm/vit_base_patch16_plus_clip_240.laion400m_e31``) and open_clip's release-file cache ``~/.cache/clip``.

    Args:
        path (str | Path | None): A weights file the user names. Defaults to ``None``.
        cache_dir (str | Path | None): Hugging Face cache to look in. Defaults to the standard one.

    Returns:
        Path | MissingWeights: The file, or what is missing and how to fetch it.
    """
    fetch = (
        f"python -c \"import open_clip; open_clip.create_model_and_transforms('{WINCLIP_ARCHITECTURE}', "
        f"pretrained='{WINCLIP_TAG}')\""
    )
    if importlib.util.find_spec("open_clip") is None:
        return MissingWeights(
            "WinCLIP",
            "winclip",
            "the Python package 'open_clip' (PyPI: open-clip-torch)",
            f"pip install 'anomalib-resad[baselines]' && {fetch}",
        )
    if path is not None:
        return _given_file("winclip", "WinCLIP", path, fetch)
    import open_clip

    config = open_clip.get_pretrained_cfg(WINCLIP_ARCHITECTURE, WINCLIP_TAG)
    repo_id, filename = os.path.split(config.get("hf_hub", ""))  # "org/model/" names the default files
    candidates = [filename] if filename else list(_OPEN_CLIP_HF_FILES)
    cached = _hf_cached_file(repo_id, candidates, cache_dir) if repo_id else None
    if cached is not None:
        return cached
    release_file = Path("~/.cache/clip").expanduser() / Path(config.get("url", "missing.pt")).name
    if release_file.is_file():
        return release_file
    missing = f"'{repo_id}' in the Hugging Face cache ({_hf_cache_name(cache_dir)}) and {release_file}"
    return MissingWeights("WinCLIP", "winclip", missing, fetch)


def find_anomaly_dino_weights(
    path: str | Path | None = None,
    cache_dir: str | Path | None = None,
) -> Path | MissingWeights:
    """The local file of AnomalyDINO's timm ``vit_small_patch14_dinov2.lvd142m`` weights, or what is missing.

    Args:
        path (str | Path | None): A weights file the user names (a timm state dict). Defaults to ``None``.
        cache_dir (str | Path | None): Hugging Face cache to look in. Defaults to the standard one.

    Returns:
        Path | MissingWeights: The file, or what is missing and how to fetch it.
    """
    repo_id = timm.models.get_pretrained_cfg(ANOMALY_DINO_ENCODER).hf_hub_id
    fetch = f"hf download {repo_id}"
    if path is not None:
        return _given_file("anomaly_dino", "AnomalyDINO", path, fetch)
    cached = _hf_cached_file(repo_id, _TIMM_HF_FILES, cache_dir)
    if cached is not None:
        return cached
    missing = f"'{repo_id}' in the Hugging Face cache ({_hf_cache_name(cache_dir)})"
    return MissingWeights("AnomalyDINO", "anomaly_dino", missing, fetch)


def find_weights(
    name: str, path: str | Path | None = None, cache_dir: str | Path | None = None
) -> Path | MissingWeights | None:
    """The weights file a baseline needs (``None`` for PatchCore: it shares ResAD's backbone), or what is missing."""
    if name == "winclip":
        return find_winclip_weights(path, cache_dir)
    if name == "anomaly_dino":
        return find_anomaly_dino_weights(path, cache_dir)
    return None


@contextmanager
def _replaced(module: ModuleType, name: str, value: object) -> Iterator[None]:
    """Temporarily replace a module attribute (how a local weights file reaches a hard-coded anomalib constructor)."""
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


class FewShotWinClip:
    """anomalib ``WinClip`` few-shot, its k reference images the selected ones, its class name the category.

    anomalib 2.7's ``WinClip.setup`` cannot read ``few_shot_source``: it asks the pre-processor for a
    ``test_transform`` that ``PreProcessor`` no longer has, and its data loader lacks the dataset's ``collate_fn``
    (items are ``ImageItem`` dataclasses). So :meth:`set_references` does the same steps itself with anomalib's own
    parts: ``PredictDataset(few_shot_source, transform)`` -> ``WinClip.collect_reference_images`` ->
    ``WinClipModel.setup(class_name, reference_images)``.

    Args:
        weights (str | Path): The ``ViT-B-16-plus-240`` / ``laion400m_e31`` open_clip weights file
            (:func:`find_winclip_weights`).
        scales (tuple[int, ...]): Sliding-window scales. Defaults to ``(2, 3)`` (anomalib's).
    """

    def __init__(self, weights: str | Path, scales: tuple[int, ...] = (2, 3)) -> None:
        logger.info("WinCLIP weights: %s", weights)
        with _replaced(winclip_torch_model, "PRETRAINED", str(weights)):  # open_clip loads a file path as given
            self.model = WinClip(scales=scales, post_processor=False, evaluator=False, visualizer=False)
        self._folder: tempfile.TemporaryDirectory | None = None

    def _link_references(self, selection: ReferenceSelection) -> Path:
        if self._folder is not None:
            self._folder.cleanup()
        self._folder = tempfile.TemporaryDirectory(prefix="winclip_references_")
        folder = Path(self._folder.name)
        for index, path in enumerate(selection.paths):
            (folder / f"{index:03d}_{Path(path).name}").symlink_to(Path(path).resolve())
        return folder

    @torch.no_grad()
    def set_references(self, selection: ReferenceSelection) -> None:
        """Text prompts for the class and visual embeddings of exactly the selected images."""
        winclip = self.model
        winclip.class_name = selection.class_name
        winclip.k_shot = selection.k
        winclip.few_shot_source = self._link_references(selection)
        dataset = PredictDataset(winclip.few_shot_source, transform=winclip.pre_processor.transform)
        loader = DataLoader(dataset, batch_size=1, shuffle=False, collate_fn=dataset.collate_fn)
        references = winclip.collect_reference_images(loader)
        winclip.model.setup(winclip.class_name, references.to(winclip.device))
        winclip.is_setup = True


class FewShotAnomalyDINO:
    """anomalib ``AnomalyDINO`` whose memory bank holds every patch of the k reference images.

    Args:
        weights (str | Path): The timm ``vit_small_patch14_dinov2.lvd142m`` state dict
            (:func:`find_anomaly_dino_weights`).
        num_neighbours (int): Nearest neighbours per patch. Defaults to ``1`` (anomalib's and the paper's).
    """

    def __init__(self, weights: str | Path, num_neighbours: int = 1) -> None:
        logger.info("AnomalyDINO weights: %s", weights)
        create_model = timm.create_model

        def create_from_file(name: str, *args: object, **kwargs: object) -> torch.nn.Module:
            if kwargs.get("pretrained") and name == ANOMALY_DINO_ENCODER:
                kwargs["pretrained_cfg_overlay"] = {"file": str(weights)}  # timm loads this file, no download
            return create_model(name, *args, **kwargs)

        with _replaced(timm, "create_model", create_from_file):
            self.model = AnomalyDINO(
                num_neighbours=num_neighbours,
                encoder_name=ANOMALY_DINO_ENCODER,
                post_processor=False,
                evaluator=False,
                visualizer=False,
            )

    @torch.no_grad()
    def set_references(self, selection: ReferenceSelection) -> None:
        """Fill the memory bank with all patches of the reference images (anomalib's ``fit``)."""
        torch_model = _store_reference_embeddings(self.model, selection)
        torch_model.fit()
        torch_model.eval()


Baseline = FewShotPatchcore | FewShotWinClip | FewShotAnomalyDINO
BaselineFactory = Callable[[Path | None], Baseline]


def build_baselines(
    names: Sequence[str],
    patchcore: Callable[..., FewShotPatchcore],
    weights: dict[str, str] | None = None,
    cache_dir: str | Path | None = None,
) -> tuple[dict[str, Baseline], dict[str, MissingWeights]]:
    """Build the requested baselines; those whose package or weights are absent are skipped with one log line.

    Args:
        names (Sequence[str]): Keys of :data:`BASELINES`.
        patchcore (Callable[..., FewShotPatchcore]): Builds PatchCore (it shares ResAD's backbone settings);
            ``patchcore(with_views=True)`` the one whose memory bank holds ResAD's reference views.
        weights (dict[str, str] | None): Baseline key -> local weights file. Defaults to ``None``.
        cache_dir (str | Path | None): Hugging Face cache to look in. Defaults to the standard one.

    Returns:
        tuple[dict[str, Baseline], dict[str, MissingWeights]]: Row name -> baseline, row name -> why skipped.
    """
    weights = weights or {}
    built: dict[str, Baseline] = {}
    skipped: dict[str, MissingWeights] = {}
    for name in names:
        row_name = BASELINE_NAMES[name]
        if name in {"patchcore", "patchcore_views"}:
            built[row_name] = patchcore(with_views=name == "patchcore_views")
            continue
        found = find_weights(name, weights.get(name), cache_dir)
        if isinstance(found, MissingWeights):
            logger.warning(found.message())
            skipped[row_name] = found
            continue
        built[row_name] = FewShotWinClip(found) if name == "winclip" else FewShotAnomalyDINO(found)
    return built, skipped
