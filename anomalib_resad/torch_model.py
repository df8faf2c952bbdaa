# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""PyTorch model of ResAD: backbone -> Feature Converter -> Feature Constraintor -> residual flows -> anomaly map.

The model scores images of any class for which it holds a reference bank (features of k normal images of that class,
set with :meth:`ResADModel.set_references`). In eval mode :meth:`ResADModel.forward` returns anomalib's
:class:`~anomalib.data.InferenceBatch` and is free of data-dependent Python control flow, so it exports to ONNX and
OpenVINO with the bank baked in - or, with ``reference_bank`` given, with the bank as an input.

Example:
    >>> import torch
    >>> model = ResADModel("resnet18", ["layer1", "layer2"], pre_trained=False, coupling_layers=2, pos_embed_dim=16)
    >>> model.set_references(torch.rand(2, 3, 64, 64))
    >>> output = model.eval()(torch.rand(3, 3, 64, 64))
    >>> tuple(output.anomaly_map.shape), tuple(output.pred_score.shape)
    ((3, 1, 64, 64), (3,))
"""

from collections.abc import Sequence
from pathlib import Path

import torch
from anomalib.data import InferenceBatch
from torch import nn

from .anomaly_map import AnomalyMapGenerator
from .feature_constraintor import FeatureConstraintor
from .feature_converter import FeatureConverter, ReferenceBank
from .feature_extractor import ResADFeatureExtractor
from .residual_flow import ResidualFlow


class ResADModel(nn.Module):
    """ResAD as a plain ``nn.Module``.

    Args:
        backbone (str): timm backbone. Defaults to ``"wide_resnet50_2"``.
        layers (Sequence[str]): Feature levels, shallow to deep. Defaults to ``("layer1", "layer2", "layer3")``.
        pre_trained (bool | str | Path): timm weights (``True``), random (``False``) or a local weights file.
        residual (str): ``"squared"`` (reference code) or ``"difference"`` (paper). Defaults to ``"squared"``.
        coupling_layers (int): Coupling blocks per flow. Defaults to ``10``.
        clamp_alpha (float): Affine clamping of the flows. Defaults to ``1.9``.
        pos_embed_dim (int): Positional-encoding dimension of the flow condition. Defaults to ``256``.
        permute_soft (bool): Soft (random orthogonal) flow permutations. Defaults to ``True``.
        sigma (float): Gaussian smoothing of the anomaly map. Defaults to ``4``.
    """

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        layers: Sequence[str] = ("layer1", "layer2", "layer3"),
        pre_trained: bool | str | Path = True,
        residual: str = "squared",
        coupling_layers: int = 10,
        clamp_alpha: float = 1.9,
        pos_embed_dim: int = 256,
        permute_soft: bool = True,
        sigma: float = 4.0,
    ) -> None:
        super().__init__()
        self.feature_extractor = ResADFeatureExtractor(backbone, layers, pre_trained)
        channels = self.feature_extractor.out_dims
        self.feature_converter = FeatureConverter(len(channels), residual)
        self.feature_constraintor = FeatureConstraintor(channels)
        self.residual_flow = ResidualFlow(channels, coupling_layers, clamp_alpha, pos_embed_dim, permute_soft)
        self.anomaly_map_generator = AnomalyMapGenerator(len(channels), sigma)

    @property
    def num_levels(self) -> int:
        """Number of feature levels."""
        return len(self.feature_extractor.layers)

    @torch.no_grad()
    def reference_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Backbone features of reference images (pre-processed ``(k, 3, H, W)``), per level."""
        return self.feature_extractor(images)

    @torch.no_grad()
    def make_reference_bank(self, images: torch.Tensor) -> ReferenceBank:
        """Reference bank of a class from its k pre-processed normal images ``(k, 3, H, W)``."""
        return ReferenceBank.from_features(self.reference_features(images))

    @torch.no_grad()
    def set_references(self, images: torch.Tensor) -> None:
        """Compute and store the reference bank of a class from its k pre-processed normal images."""
        self.feature_converter.set_bank(self.make_reference_bank(images))

    def forward(
        self,
        images: torch.Tensor,
        reference_bank: Sequence[torch.Tensor] | None = None,
    ) -> InferenceBatch:
        """Score images.

        Args:
            images (torch.Tensor): Pre-processed images ``(B, 3, H, W)``.
            reference_bank (Sequence[torch.Tensor] | None): Per-level banks ``(M_l, C_l)`` to use instead of the
                stored one (all images must belong to the bank's class).

        Returns:
            InferenceBatch: ``pred_score`` ``(B,)`` and ``anomaly_map`` ``(B, 1, H, W)``.
        """
        features = self.feature_extractor(images)
        residuals = self.feature_converter(features, reference_bank)
        constrained = self.feature_constraintor(residuals)
        log_likelihoods = self.residual_flow(constrained)
        anomaly_map, pred_score = self.anomaly_map_generator(log_likelihoods, images.shape[-2:])
        return InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map)
