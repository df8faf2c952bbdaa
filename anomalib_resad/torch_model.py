# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""PyTorch model of ResAD: backbone -> Feature Converter -> Feature Constraintor -> residual flows -> anomaly map.

The model scores images of any class for which it holds a calibrated reference bank (features of k normal images of
that class plus the class's :class:`~anomalib_resad.anomaly_map.ScoreCalibration`, set with
:meth:`ResADModel.set_references`). In eval mode :meth:`ResADModel.forward` returns anomalib's
:class:`~anomalib.data.InferenceBatch` in calibrated units (``1`` = the class's threshold) and is free of
data-dependent Python control flow, so it exports to ONNX and OpenVINO with the bank baked in - or, with
``reference_bank`` and ``calibration`` given, with both as inputs.

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

from .anomaly_map import (
    NEAREST_AVERAGING,
    NEAREST_LEVELS,
    AnomalyMapGenerator,
    ScoreComponents,
    leave_one_out_calibration,
)
from .errors import ResADInputError, check_choice
from .feature_constraintor import FeatureConstraintor
from .feature_converter import FeatureConverter, ReferenceBank, flatten_levels
from .feature_extractor import ResADFeatureExtractor
from .reference_views import keep_views, level_views, reference_views, view_count, view_rows
from .residual_codebook import ResidualCodebook
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
        clamp_alpha (float): Affine clamping of the flows. Defaults to ``1.9``.
        pos_embed_dim (int): Positional-encoding dimension of the flow condition. Defaults to ``256``.
        permute_soft (bool): Soft (random orthogonal) flow permutations. Defaults to ``True``.
        sigma (float): Gaussian smoothing of the anomaly map. Defaults to ``4``.
        image_score (str): ``"max"`` (reference) or ``"top_mean"``. Defaults to ``"max"``.
        level_constants (str): ``"per_class"`` (leave-one-out over the references) or ``"global"``.
        dissimilarity_check (bool): Flag frames unlike the references (dissimilarity and reverse dissimilarity).
            Defaults to ``True``.
        nearest_score (bool): Anomaly map = mean of the flows' map and the nearest-neighbour map, each over its
            leave-one-out threshold; image score = that map's ``image_score``
            (:mod:`~anomalib_resad.anomaly_map`). Defaults to ``True``.
        threshold_margin (float): Factor on each scoring term's largest leave-one-out value (its threshold).
            Defaults to ``1.25``.
        dissimilarity_margin (float): The same for the dissimilarity. Defaults to ``2.0``.
        reverse_dissimilarity_margin (float): The same for the reverse dissimilarity. Defaults to ``1.5``.
        distribution_matching (bool): ResAD++'s codebook of normal residuals and test-time EFDM
            (:mod:`~anomalib_resad.residual_codebook`). Defaults to ``False`` (the NeurIPS ResAD).
        codebook_size (int): Codes per level. Defaults to ``1536`` (reference).
        efdm_alpha (float): EFDM's share of the residual kept. Defaults to ``0.4`` (reference).
        nearest_averaging (str): PatchCore's matching (3 x 3 averaging, Euclidean) in the nearest-neighbour score and
            map: ``"off"``, ``"on"``, or ``"auto"`` - chosen per class from synthetic defects in its references
            (:mod:`~anomalib_resad.anomaly_map`). Defaults to ``"auto"``.
        reference_views (str): The reference bank holds each reference image's ``"flips"`` (4 views) or
            ``"dihedral"`` symmetries (8) as well, or the images alone (``"none"``;
            :mod:`~anomalib_resad.reference_views`). Defaults to ``"dihedral"``.
        reference_view_levels (int | None): How many of the deepest levels' banks hold the views (``None``: all).
            Defaults to ``2`` (the levels of the nearest-neighbour score; the costly shallow levels stay plain).
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
        image_score: str = "max",
        level_constants: str = "per_class",
        dissimilarity_check: bool = True,
        nearest_score: bool = True,
        threshold_margin: float = 1.25,
        dissimilarity_margin: float = 2.0,
        reverse_dissimilarity_margin: float = 1.5,
        distribution_matching: bool = False,
        codebook_size: int = 1536,
        efdm_alpha: float = 0.4,
        nearest_averaging: str = "auto",
        reference_views: str = "dihedral",
        reference_view_levels: int | None = 2,
    ) -> None:
        super().__init__()
        check_choice("nearest_averaging", nearest_averaging, NEAREST_AVERAGING)
        view_count(reference_views)  # checks the name
        self.feature_extractor = ResADFeatureExtractor(backbone, layers, pre_trained)
        channels = self.feature_extractor.out_dims
        self.feature_converter = FeatureConverter(len(channels), residual)
        self.feature_constraintor = FeatureConstraintor(channels)
        self.residual_flow = ResidualFlow(channels, coupling_layers, clamp_alpha, pos_embed_dim, permute_soft)
        self.anomaly_map_generator = AnomalyMapGenerator(
            len(channels),
            sigma,
            image_score=image_score,
            level_constants=level_constants,
            dissimilarity_check=dissimilarity_check,
            nearest_score=nearest_score,
        )
        self.threshold_margin = threshold_margin
        self.dissimilarity_margin = dissimilarity_margin
        self.reverse_dissimilarity_margin = reverse_dissimilarity_margin
        self.nearest_averaging = nearest_averaging
        self.reference_views = reference_views
        self.reference_view_levels = reference_view_levels
        # ResAD++: residuals moved toward a codebook of normal residuals at test time (None: the NeurIPS ResAD)
        self.codebook = ResidualCodebook(channels, codebook_size, efdm_alpha) if distribution_matching else None

    @property
    def num_levels(self) -> int:
        """Number of feature levels."""
        return len(self.feature_extractor.layers)

    @property
    def bank_views(self) -> list[int]:
        """Views per reference image in each level's evaluation bank (``reference_views``, shallowest level first)."""
        return level_views(self.reference_views, self.num_levels, self.reference_view_levels)

    @torch.no_grad()
    def bank_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Per-level features of a class's evaluation bank: each image's views where :attr:`bank_views` asks.

        Level ``l`` holds ``(k * bank_views[l], C_l, H_l, W_l)``, image by image (its first row is the image itself).
        """
        views = self.bank_views
        if max(views) == 1:  # "none", or no level holds views
            return self.reference_features(images)
        return keep_views(self.reference_features(reference_views(images, self.reference_views)), views)

    @torch.no_grad()
    def reference_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Backbone features of reference images (pre-processed ``(k, 3, H, W)``), per level."""
        return self.feature_extractor(images)

    @torch.no_grad()
    def calibrate(
        self,
        features: Sequence[torch.Tensor],
        image_size: tuple[int, int],
        images: torch.Tensor | None = None,
        views: int | Sequence[int] = 1,
    ) -> torch.Tensor:
        """A class's calibration from the per-level features ``(k * views_l, C_l, H_l, W_l)`` of its k references.

        Every reference image is scored against a bank of the other k - 1 - with views, image ``i`` (its first
        view) against the other images' views, never its own
        (:func:`~anomalib_resad.anomaly_map.leave_one_out_calibration` holds the rule). Needs k >= 2.

        Args:
            features (Sequence[torch.Tensor]): Per-level features of the reference images.
            image_size (tuple[int, int]): Size of the pre-processed images (the maps' resolution).
            images (torch.Tensor | None): The pre-processed reference images ``(k, 3, H, W)``: with
                ``nearest_averaging="auto"`` their synthetic defects choose the class's matching.
            views (int | Sequence[int]): Views per image in ``features``, image by image, for every level or per
                level (:meth:`bank_features`). Defaults to ``1``.

        Returns:
            torch.Tensor: The flat calibration ``(L + 7,)``.
        """
        was_training = self.training
        self.eval()  # BatchNorm on running statistics, as at inference
        views = [views] * len(features) if isinstance(views, int) else list(views)
        k = int(features[0].shape[0]) // views[0]

        def others_of(index: int, levels: Sequence[torch.Tensor], counts: Sequence[int]) -> list[torch.Tensor]:
            rows = [view_rows(index, count) for count in counts]
            kept = [torch.cat([level[: row.start], level[row.stop :]]) for level, row in zip(levels, rows, strict=True)]
            return flatten_levels(kept)

        def score_reference(index: int, constants: torch.Tensor) -> ScoreComponents:
            query = [level[index * count : index * count + 1] for level, count in zip(features, views, strict=True)]
            constants = constants.to(features[0].device)
            return self.score_components(query, others_of(index, features, views), constants, image_size)

        score_defects = None
        generator = self.anomaly_map_generator
        # without the nearest-neighbour term the choice changes nothing: no defects to score
        averaging = self.nearest_averaging if generator.nearest_score else "off"
        if averaging == "auto":
            if images is None:
                msg = "nearest_averaging='auto' chooses from the reference images: pass them to calibrate(images=...)."
                raise ResADInputError(msg)
            defects = synthetic_defects(images)

            def score_defects(index: int, constants: torch.Tensor) -> ScoreComponents:
                # the choice reads the two nearest-neighbour scores only: matching, no constraintor or flows
                del constants
                bank = others_of(index, features[-NEAREST_LEVELS:], views[-NEAREST_LEVELS:])
                query = self.feature_extractor(defects[index])[-NEAREST_LEVELS:]
                similarities = self.feature_converter(query, bank).similarities
                averaged = self.feature_converter.averaged_distances(query, bank, NEAREST_LEVELS)
                return self.anomaly_map_generator.nearest_components(similarities, averaged, image_size)

        calibration = leave_one_out_calibration(
            score_reference,
            k,
            self.num_levels,
            global_constants=generator.global_level_constants if generator.level_constants == "global" else None,
            margin=self.threshold_margin,
            dissimilarity_margin=self.dissimilarity_margin,
            reverse_dissimilarity_margin=self.reverse_dissimilarity_margin,
            nearest_averaging=averaging,
            score_defects=score_defects,
        )
        self.train(was_training)
        return calibration.to_tensor()

    @torch.no_grad()
    def make_reference_bank(self, images: torch.Tensor) -> ReferenceBank:
        """Calibrated reference bank of a class from its k pre-processed normal images ``(k, 3, H, W)``.

        With ``reference_views`` the bank holds each image's views (:mod:`~anomalib_resad.reference_views`).
        """
        features = self.bank_features(images)
        calibration = self.calibrate(features, tuple(images.shape[-2:]), images, self.bank_views)
        return ReferenceBank.from_features(features, calibration, self.bank_views)

    @torch.no_grad()
    def set_references(self, bank: ReferenceBank) -> None:
        """Store a class's calibrated reference bank: the one used when no bank is passed to :meth:`forward`."""
        if bank.calibration is None:
            msg = "The reference bank has no calibration: make it with make_reference_bank (or ResAD.set_references)."
            raise ValueError(msg)
        self.feature_converter.set_bank(bank)
        self.anomaly_map_generator.calibration.copy_(bank.calibration)

    def level_outputs(
        self,
        features: Sequence[torch.Tensor],
        reference_bank: Sequence[torch.Tensor] | None = None,
    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[torch.Tensor], list[torch.Tensor]]:
        """Per-level log-likelihood maps and matches of backbone features (the paper's figure, per box).

        Returns:
            tuple: Per level, the normal and abnormal log-likelihood maps ``(B, H_l, W_l)``, each position's match
            similarity ``(B, H_l, W_l)`` and each reference position's best similarity in each image ``(B, M_l)``.
        """
        residuals, similarities, coverage = self.feature_converter(features, reference_bank)
        if self.codebook is not None and not self.training:  # EFDM at test time only, as the reference
            residuals = self.codebook(residuals)
        constrained = self.feature_constraintor(residuals)
        return self.residual_flow(constrained), similarities, coverage

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
            log_likelihoods, similarities, image_size, level_constants, coverage, averaged
        )

    def _averaging(self, calibration: torch.Tensor | None) -> bool:
        """Whether the class scored needs the averaged matching.

        Always in exported graphs (the calibration is an input there); in eager only where the class's calibration
        chose it, so the classes that did not pay nothing per image.
        """
        if torch.compiler.is_exporting():
            return True
        stored = calibration if calibration is not None else self.anomaly_map_generator.calibration
        return bool(stored.numel()) and bool(stored[-1] > 0)

    def forward(
        self,
        images: torch.Tensor,
        reference_bank: Sequence[torch.Tensor] | None = None,
        calibration: torch.Tensor | None = None,
    ) -> InferenceBatch:
        """Score images in calibrated units (``1`` = the class's threshold).

        Args:
            images (torch.Tensor): Pre-processed images ``(B, 3, H, W)``.
            reference_bank (Sequence[torch.Tensor] | None): Per-level banks ``(M_l, C_l)`` to use instead of the
                stored one (all images must belong to the bank's class).
            calibration (torch.Tensor | None): That bank's calibration ``(L + 7,)``; the stored one when ``None``.

        Returns:
            InferenceBatch: ``pred_score`` ``(B,)`` and ``anomaly_map`` ``(B, 1, H, W)``.
        """
        features = self.feature_extractor(images)
        generator = self.anomaly_map_generator
        if generator.nearest_only:  # matching alone: the constraintor and the flows are not run
            _, similarities, coverage = self.feature_converter(features, reference_bank)
            log_likelihoods = [(level.new_zeros(level.shape),) * 2 for level in similarities]
        else:
            log_likelihoods, similarities, coverage = self.level_outputs(features, reference_bank)
        averaged = None
        if (generator.nearest_score or generator.nearest_only) and self._averaging(calibration):
            averaged = self.feature_converter.averaged_distances(features, reference_bank, NEAREST_LEVELS)
        anomaly_map, pred_score = self.anomaly_map_generator(
            log_likelihoods, similarities, images.shape[-2:], calibration, coverage, averaged
        )
        return InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map)
