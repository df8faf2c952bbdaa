# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""PyTorch model of ResAD: backbone -> Feature Converter -> Feature Constraintor -> residual flows -> anomaly map.

The model scores images of any class for which it holds a calibrated reference bank (features of k normal images of
that class plus the class's :class:`~anomalib_resad.calibration.Scoring`, made with
:meth:`ResADModel.make_reference_bank` and stored with :meth:`ResADModel.set_references`). In eval mode
:meth:`ResADModel.forward` returns anomalib's :class:`~anomalib.data.InferenceBatch` in calibrated units (``1`` = the
class's threshold) and is free of data-dependent Python control flow, so it exports to ONNX and OpenVINO with the bank
baked in - or, with ``reference_bank`` and ``scoring`` given, with both as inputs.

Example:
    >>> import torch
    >>> model = ResADModel("resnet18", ["layer1", "layer2"], pre_trained=False, coupling_layers=2, pos_embed_dim=16)
    >>> model = model.eval()
    >>> model.set_references(model.make_reference_bank(torch.rand(2, 3, 64, 64)))
    >>> output = model(torch.rand(3, 3, 64, 64))
    >>> tuple(output.anomaly_map.shape), tuple(output.pred_score.shape)
    ((3, 1, 64, 64), (3,))
"""

from collections.abc import Sequence
from pathlib import Path

import torch
from anomalib.data import InferenceBatch
from torch import nn

from .anomaly_map import SCORINGS, AnomalyMapGenerator, reads_flows, reads_nearest
from .calibration import (
    NEAREST_LEVELS,
    SENSITIVITY,
    ScoreComponents,
    Scoring,
    leave_one_out_banks,
    leave_one_out_scoring,
)
from .errors import check_choice
from .feature_constraintor import FeatureConstraintor
from .feature_converter import FeatureConverter, ReferenceBank, flatten_levels
from .feature_extractor import ResADFeatureExtractor
from .reference_views import keep_views, level_views, reference_views, views_mode
from .residual_flow import ResidualFlow
from .synthetic_defects import synthetic_defects


class ResADModel(nn.Module):
    """ResAD as a plain ``nn.Module``.

    Args:
        backbone (str): timm backbone. Defaults to ``"wide_resnet50_2"``.
        layers (Sequence[str]): Feature levels, shallow to deep. Defaults to ``("layer1", "layer2", "layer3")``.
        pre_trained (bool | str | Path): timm weights (``True``), random (``False``) or a local weights file.
        residual (str): ``"squared"`` (reference code) or ``"difference"`` (paper). Defaults to ``"squared"``.
        coupling_layers (int): Coupling blocks per flow. Defaults to ``10``.
        clamp_alpha (float): Affine clamping of the flows. Defaults to ``1.9`` (reference).
        pos_embed_dim (int): Positional-encoding dimension of the flow condition. Defaults to ``256``.
        permute_soft (bool): Soft (random orthogonal) flow permutations. Defaults to ``True``.
        sigma (float): Gaussian smoothing of the anomaly map. Defaults to ``4``.
        scoring (str): ``"fused"``, ``"nearest"`` or ``"paper"`` (:mod:`~anomalib_resad.anomaly_map`). Defaults to
            ``"fused"``.
        sensitivity (float): Where each class's boundary sits between its references (1) and their synthetic
            defects (0) (:func:`~anomalib_resad.calibration.boundary`). Defaults to ``0.35``.
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
        scoring: str = "fused",
        sensitivity: float = SENSITIVITY,
    ) -> None:
        super().__init__()
        self.feature_extractor = ResADFeatureExtractor(backbone, layers, pre_trained)
        channels = self.feature_extractor.out_dims
        self.feature_converter = FeatureConverter(len(channels), residual)
        self.feature_constraintor = FeatureConstraintor(channels)
        self.residual_flow = ResidualFlow(channels, coupling_layers, clamp_alpha, pos_embed_dim, permute_soft)
        self.anomaly_map_generator = AnomalyMapGenerator(len(channels), sigma, scoring, sensitivity)

    @property
    def num_levels(self) -> int:
        """Number of feature levels."""
        return len(self.feature_extractor.layers)

    def bank_views(self, image_size: Sequence[int]) -> list[int]:
        """Views per reference image in each level's evaluation bank, for pre-processed images of ``image_size``."""
        return level_views(image_size, self.num_levels)

    @torch.no_grad()
    def bank_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Per-level features of a class's evaluation bank: each image's views where :meth:`bank_views` asks.

        Level ``l`` holds ``(k * views_l, C_l, H_l, W_l)``, image by image (its first row is the image itself).
        """
        size = images.shape[-2:]
        views = reference_views(images, views_mode(size))
        return keep_views(self.reference_features(views), self.bank_views(size))

    @torch.no_grad()
    def reference_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Backbone features of reference images (pre-processed ``(k, 3, H, W)``), per level."""
        return self.feature_extractor(images)

    @torch.no_grad()
    def calibrate(
        self,
        features: Sequence[torch.Tensor],
        image_size: tuple[int, int],
        images: torch.Tensor,
        views: Sequence[int],
    ) -> Scoring:
        """A class's :class:`~anomalib_resad.calibration.Scoring` from its k references' bank features.

        Every reference image is scored against a bank of the other k - 1 (their views too, never its own:
        :func:`~anomalib_resad.calibration.leave_one_out_banks`), and so are synthetic defects pasted into it: they
        choose the class's matching and place its boundaries. Needs k >= 2.

        Args:
            features (Sequence[torch.Tensor]): Per-level bank features ``(k * views_l, C_l, H_l, W_l)``.
            image_size (tuple[int, int]): Size of the pre-processed images (the maps' resolution).
            images (torch.Tensor): The pre-processed reference images ``(k, 3, H, W)`` (their synthetic defects).
            views (Sequence[int]): Views per image in each level of ``features``.

        Returns:
            Scoring: The class's record.
        """
        was_training = self.training
        self.eval()  # BatchNorm on running statistics, as at inference
        queries, banks = {}, {}
        for index, query, others in leave_one_out_banks(features, views):
            queries[index], banks[index] = query, flatten_levels(others)
        defects = synthetic_defects(images)

        def score_reference(index: int, constants: torch.Tensor) -> ScoreComponents:
            constants = constants.to(features[0].device)
            return self.score_components(queries[index], banks[index], constants, image_size)

        def score_defects(index: int, constants: torch.Tensor) -> ScoreComponents:
            constants = constants.to(features[0].device)
            return self.score_components(self.feature_extractor(defects[index]), banks[index], constants, image_size)

        scoring = leave_one_out_scoring(score_reference, len(banks), self.num_levels, score_defects)
        self.train(was_training)
        return scoring

    @torch.no_grad()
    def make_reference_bank(self, images: torch.Tensor) -> ReferenceBank:
        """Calibrated reference bank of a class from its k pre-processed normal images ``(k, 3, H, W)``."""
        features = self.bank_features(images)
        views = self.bank_views(images.shape[-2:])
        scoring = self.calibrate(features, tuple(images.shape[-2:]), images, views)
        return ReferenceBank.from_features(features, views, scoring)

    @torch.no_grad()
    def set_references(self, bank: ReferenceBank) -> None:
        """Store a class's calibrated reference bank: the one used when no bank is passed to :meth:`forward`."""
        if bank.scoring is None:
            msg = (
                "The reference bank has no scoring record: make it with make_reference_bank (or ResAD.set_references)."
            )
            raise ValueError(msg)
        self.feature_converter.set_bank(bank)
        self.anomaly_map_generator.stored.set(bank.scoring)

    def level_outputs(
        self,
        features: Sequence[torch.Tensor],
        reference_bank: Sequence[torch.Tensor] | None = None,
        flows: bool = True,
    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[torch.Tensor], list[torch.Tensor]]:
        """Per-level log-likelihood maps and matches of backbone features (the paper's figure, per box).

        Returns:
            tuple: Per level, the normal and abnormal log-likelihood maps ``(B, H_l, W_l)`` (none with
            ``flows=False``: matching alone), each position's match similarity ``(B, H_l, W_l)`` and each reference
            position's best similarity in each image ``(B, M_l)``.
        """
        residuals, similarities, coverage = self.feature_converter(features, reference_bank)
        if not flows:
            return [], similarities, coverage
        return self.residual_flow(self.feature_constraintor(residuals)), similarities, coverage

    def score_components(
        self,
        features: Sequence[torch.Tensor],
        reference_bank: Sequence[torch.Tensor],
        level_constants: torch.Tensor,
        image_size: tuple[int, int] | torch.Size,
    ) -> ScoreComponents:
        """Uncalibrated scoring of backbone features against a bank (calibration and the exported calibrator)."""
        log_likelihoods, similarities, coverage = self.level_outputs(features, reference_bank)
        averaged = self.feature_converter.averaged_distances(features, reference_bank, NEAREST_LEVELS)
        return self.anomaly_map_generator.components(
            log_likelihoods, similarities, coverage, image_size, level_constants, averaged
        )

    def forward(
        self,
        images: torch.Tensor,
        reference_bank: Sequence[torch.Tensor] | None = None,
        scoring: Scoring | None = None,
    ) -> InferenceBatch:
        """Score images in calibrated units (``1`` = the class's threshold).

        Args:
            images (torch.Tensor): Pre-processed images ``(B, 3, H, W)``.
            reference_bank (Sequence[torch.Tensor] | None): Per-level banks ``(M_l, C_l)`` to use instead of the
                stored one (all images must belong to the bank's class).
            scoring (Scoring | None): That bank's scoring record; the stored one when ``None``.

        Returns:
            InferenceBatch: ``pred_score`` ``(B,)`` and ``anomaly_map`` ``(B, 1, H, W)``.
        """
        name = self.anomaly_map_generator.scoring
        anomaly_map, pred_score = self._scored(images, (name,), reference_bank, scoring)[name]
        return InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map)

    @torch.no_grad()
    def forward_scorings(self, images: torch.Tensor, scorings: Sequence[str]) -> dict[str, InferenceBatch]:
        """The stored class's scores under several scorings from one backbone pass and one matching.

        What :meth:`forward` gives with the generator's ``scoring`` set to each name in turn, at the cost of one
        forward (the flows run where a scoring reads them): the side-by-side protocol scores ResAD and its own
        ``nearest`` and ``flows`` rows this way.

        Args:
            images (torch.Tensor): Pre-processed images ``(B, 3, H, W)``.
            scorings (Sequence[str]): Scoring names (``"fused"``, ``"nearest"``, ``"paper"``).

        Returns:
            dict[str, InferenceBatch]: Scoring name -> ``pred_score`` ``(B,)`` and ``anomaly_map`` ``(B, 1, H, W)``.

        Example:
            >>> model = ResADModel("resnet18", ["layer1", "layer2"], pre_trained=False, coupling_layers=2,
            ...                    pos_embed_dim=16).eval()
            >>> model.set_references(model.make_reference_bank(torch.rand(2, 3, 64, 64)))
            >>> sorted(model.forward_scorings(torch.rand(1, 3, 64, 64), ["nearest", "paper"]))
            ['nearest', 'paper']
        """
        for name in scorings:
            check_choice("scoring", name, SCORINGS)
        return {
            name: InferenceBatch(pred_score=score, anomaly_map=anomaly_map)
            for name, (anomaly_map, score) in self._scored(images, scorings).items()
        }

    def _scored(
        self,
        images: torch.Tensor,
        scorings: Sequence[str],
        reference_bank: Sequence[torch.Tensor] | None = None,
        scoring: Scoring | None = None,
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Calibrated map and score per scoring name; the flows and the averaged matching run only where needed."""
        generator = self.anomaly_map_generator
        record = generator.record(scoring)
        features = self.feature_extractor(images)
        log_likelihoods, similarities, coverage = self.level_outputs(features, reference_bank, reads_flows(scorings))
        averaged = None
        if reads_nearest(scorings) and self._averaging(record):
            averaged = self.feature_converter.averaged_distances(features, reference_bank, NEAREST_LEVELS)
        parts = generator.components(
            log_likelihoods, similarities, coverage, images.shape[-2:], record.level_constants, averaged
        )
        return generator.calibrated(parts, record, scorings)

    @staticmethod
    def _averaging(record: Scoring) -> bool:
        """Whether the class scored needs the averaged matching.

        Always in exported graphs (the scoring record is an input there); in eager only where the class's record
        chose it, so the classes that did not pay nothing per image.
        """
        if torch.compiler.is_exporting():
            return True
        return bool(record.averaging > 0)
