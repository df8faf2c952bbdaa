# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""Anomaly maps and image scores, in units of the scored class's own threshold.

Three maps come out of one matching of an image against a class's references:

* the **flows' map** - the reference code's (``validate.py``): ``S1 = sum_l (1 - exp(min(logp_l - c_l, 0)))`` (the
  paper's Eq. 7 summed over levels, each level bilinearly upsampled) averaged with ``S2 = mean_l p(abnormal)``, the
  probability of the flows' "abnormal" Gaussian. Log-likelihoods above ``c_l`` count as fully normal: a flow can find
  residuals far from anything it saw (a blank frame) *more* likely, which must not make a score negative;
* the **nearest-neighbour map** - ``1 - cos`` of each position's nearest reference feature on the two deepest levels,
  summed and upsampled: PatchCore's score on ResAD's own matching, at no extra cost;
* **PatchCore's averaged map** - the same after 3 x 3 neighbourhood averaging with Euclidean distances, for the
  classes whose references chose it (:mod:`~anomalib_resad.calibration`).

All maps are blurred (Gaussian, sigma 4, as the reference), divided by the class's largest leave-one-out value of
that map (:func:`~anomalib_resad.calibration.relative_maps`) and then by the class's boundary
(:func:`~anomalib_resad.calibration.boundary`: between its references and their synthetic defects, placed by
``sensitivity``), so ``1`` is every class's boundary.

**Scorings** (``scoring``). ``"fused"`` (default): the mean of the flows' map and the class's nearest-neighbour map
(precise or averaged), each over its own threshold - a defect must stand out where both see it; ``"nearest"``: the
nearest-neighbour map alone, ResAD's matching with no trained part; ``"paper"``: the flows' map alone, the reference's
scoring. The image score is the map's maximum: an image is flagged exactly when its map has a pixel above the
boundary - or when the odd-frame check fires: frames unlike the references (blank, saturated, noise, another product)
by either odd-frame statistic over its own threshold. Above either, the image score is the larger of the score and
the statistics' ratios; below both, the score alone (the check sets labels, it does not reorder the images it
passes).

Example:
    >>> import torch
    >>> from anomalib_resad.calibration import Scoring
    >>> generator = AnomalyMapGenerator(num_levels=1)
    >>> level = (torch.zeros(2, 4, 4), torch.full((2, 4, 4), -1.0))
    >>> parts = generator.components([level], [torch.ones(2, 4, 4)], [torch.ones(2, 16)], (16, 16), torch.zeros(1))
    >>> tuple(parts.anomaly_map.shape), tuple(parts.map_max.shape)
    ((2, 1, 16, 16), (2,))
"""

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from .calibration import (
    DISSIMILARITY_MARGIN,
    NEAREST_LEVELS,
    REVERSE_DISSIMILARITY_MARGIN,
    SCORINGS,
    SENSITIVITY,
    ScoreComponents,
    Scoring,
    boundary,
    odd_frame_statistics,
    relative_maps,
)
from .errors import ResADConfigurationError, ResADInputError, check_choice

_EPS = 1e-6


def check_sensitivity(sensitivity: float) -> float:
    """``sensitivity`` if it lies in [0, 1], else a clear error."""
    if not 0.0 <= sensitivity <= 1.0:
        msg = (
            f"sensitivity={sensitivity} is outside [0, 1]: it places each class's boundary between just above its "
            f"references' largest score (1: most defects caught, most false alarms) and its synthetic defects' median "
            f"(0). The default is {SENSITIVITY}."
        )
        raise ResADConfigurationError(msg)
    return float(sensitivity)


def reads_flows(scorings: Sequence[str]) -> bool:
    """Whether any of ``scorings`` reads the flows' map (``"nearest"`` needs neither constraintor nor flows)."""
    return any(name != "nearest" for name in scorings)


def reads_nearest(scorings: Sequence[str]) -> bool:
    """Whether any of ``scorings`` reads a nearest-neighbour map (and so the class's averaging choice)."""
    return any(name != "paper" for name in scorings)


class SeparableGaussianBlur(nn.Module):
    """Gaussian smoothing of every channel of ``(B, C, H, W)`` maps as two 1-D convolutions, replicate borders.

    Written here because anomalib's ``GaussianBlur2d`` convolves with the full 2-D kernel: at the reference's
    sigma = 4 that is 33 x 33 = 1,089 multiply-adds per pixel against 2 x 33 here, for the same result (a Gaussian is
    separable). Replicate borders work for maps of any size (reflection needs maps larger than the kernel radius).

    Args:
        sigma (float): Standard deviation, in pixels.
        truncate (float): Kernel radius in standard deviations (``scipy.ndimage.gaussian_filter``'s default, as in
            the reference code). Defaults to ``4``.

    Example:
        >>> blur = SeparableGaussianBlur(sigma=1.0)
        >>> maps = torch.zeros(1, 2, 9, 9)
        >>> maps[0, 0, 4, 4] = 1.0
        >>> smoothed = blur(maps)
        >>> round(float(smoothed[0, 0].sum()), 4), float(smoothed[0, 1].abs().max())
        (1.0, 0.0)
    """

    def __init__(self, sigma: float, truncate: float = 4.0) -> None:
        super().__init__()
        self.radius = int(truncate * sigma + 0.5)
        offsets = torch.arange(-self.radius, self.radius + 1, dtype=torch.float32)
        kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
        self.register_buffer("kernel", kernel / kernel.sum(), persistent=False)  # derived from sigma

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        """Smooth ``(B, C, H, W)`` maps."""
        batch, channels, height, width = maps.shape
        flat = F.pad(maps.reshape(batch * channels, 1, height, width), (self.radius,) * 4, "replicate")
        flat = F.conv2d(flat, self.kernel.view(1, 1, 1, -1))
        flat = F.conv2d(flat, self.kernel.view(1, 1, -1, 1))
        return flat.reshape(batch, channels, height, width)


class StoredScoring(nn.Module):
    """The stored class's :class:`~anomalib_resad.calibration.Scoring`, one buffer per field (by name)."""

    def __init__(self, num_levels: int) -> None:
        super().__init__()
        for name, value in Scoring.neutral(num_levels).tensors().items():
            self.register_buffer(name, value)

    def get(self) -> Scoring:
        """The stored record (the buffers themselves: traceable by export)."""
        return Scoring(**{name: getattr(self, name) for name in Scoring.names()})

    @torch.no_grad()
    def set(self, scoring: Scoring) -> None:
        """Store a class's record."""
        for name, value in scoring.tensors().items():
            buffer = getattr(self, name)
            if buffer.shape != value.shape:
                msg = f"A scoring record for {value.numel()} level(s) was given to a model of {buffer.numel()}."
                raise ResADInputError(msg)
            buffer.copy_(value.to(buffer.device))


class AnomalyMapGenerator(nn.Module):
    """Per-level likelihoods and matches -> an anomaly map and an image score in units of the class's threshold.

    Args:
        num_levels (int): Number of feature levels.
        sigma (float): Standard deviation of the Gaussian smoothing, in output pixels. Defaults to ``4`` (reference).
        scoring (str): ``"fused"``, ``"nearest"`` or ``"paper"`` (see the module docstring). Defaults to ``"fused"``.
        sensitivity (float): Where each class's boundary sits between its references' largest leave-one-out score
            (1; never below :data:`~anomalib_resad.calibration.BOUNDARY_FLOOR` x that score) and its synthetic
            defects' median (0) (:func:`~anomalib_resad.calibration.boundary`). Defaults to
            :data:`~anomalib_resad.calibration.SENSITIVITY`.

    Attributes:
        stored (StoredScoring): The stored class's scoring record (zeros: none yet).
    """

    def __init__(
        self,
        num_levels: int,
        sigma: float = 4.0,
        scoring: str = "fused",
        sensitivity: float = SENSITIVITY,
    ) -> None:
        super().__init__()
        check_choice("scoring", scoring, SCORINGS)
        self.num_levels = num_levels
        self.scoring = scoring
        self.sensitivity = check_sensitivity(sensitivity)
        self.stored = StoredScoring(num_levels)
        self.blur = SeparableGaussianBlur(sigma)

    def components(
        self,
        log_likelihoods: Sequence[tuple[torch.Tensor, torch.Tensor]],
        similarities: Sequence[torch.Tensor],
        coverage: Sequence[torch.Tensor],
        image_size: tuple[int, int] | torch.Size,
        level_constants: torch.Tensor,
        averaged_distances: Sequence[torch.Tensor] | None = None,
    ) -> ScoreComponents:
        """Uncalibrated maps, their maxima and the odd-frame statistics.

        Args:
            log_likelihoods (Sequence[tuple[torch.Tensor, torch.Tensor]]): Per level, the normal and abnormal
                log-likelihood maps ``(B, H_l, W_l)`` (empty: no flows' map, zeros in its place).
            similarities (Sequence[torch.Tensor]): Per level, cosine similarity of each position's match
                ``(B, H_l, W_l)``.
            coverage (Sequence[torch.Tensor]): Per level, each reference position's best similarity in each image
                ``(B, M_l)``.
            image_size (tuple[int, int] | torch.Size): Output size ``(H, W)``.
            level_constants (torch.Tensor): ``(L,)`` the constants ``c_l``.
            averaged_distances (Sequence[torch.Tensor] | None): The deepest levels' distances after neighbourhood
                averaging (:meth:`~anomalib_resad.feature_converter.FeatureConverter.averaged_distances`); ``None``:
                no averaged map (zeros for its maximum).

        Returns:
            ScoreComponents: The scoring results.
        """
        batch = similarities[0].shape[0]
        maps = [self._flows_map(log_likelihoods, level_constants, image_size, similarities[0])]
        maps.append(self._upsampled_sum([1 - level for level in similarities[-NEAREST_LEVELS:]], image_size))
        if averaged_distances is not None:
            maps.append(self._upsampled_sum(list(averaged_distances[-NEAREST_LEVELS:]), image_size))
        blurred = self.blur(torch.cat(maps, dim=1)).split(1, dim=1)  # all maps in one call of the blur
        anomaly_map, nearest_map = blurred[0].contiguous(), blurred[1].contiguous()
        averaged_map = blurred[2].contiguous() if len(blurred) > 2 else None
        if log_likelihoods:
            level_max = torch.stack([normal.flatten(start_dim=1).amax(dim=1) for normal, _ in log_likelihoods]).T
        else:
            level_max = anomaly_map.new_zeros(batch, self.num_levels)
        dissimilarity, reverse = odd_frame_statistics(similarities, coverage)
        nearest = nearest_map.flatten(start_dim=1).amax(dim=1)
        return ScoreComponents(
            anomaly_map=anomaly_map,
            map_max=anomaly_map.flatten(start_dim=1).amax(dim=1),
            dissimilarity=dissimilarity,
            level_max_log_likelihood=level_max,
            nearest=nearest,
            reverse_dissimilarity=reverse,
            averaged_nearest=(
                averaged_map.flatten(start_dim=1).amax(dim=1) if averaged_map is not None else torch.zeros_like(nearest)
            ),
            nearest_map=nearest_map,
            averaged_map=averaged_map,
        )

    def forward(
        self,
        log_likelihoods: Sequence[tuple[torch.Tensor, torch.Tensor]],
        similarities: Sequence[torch.Tensor],
        coverage: Sequence[torch.Tensor],
        image_size: tuple[int, int] | torch.Size,
        scoring: Scoring | None = None,
        averaged_distances: Sequence[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Calibrated anomaly map and image score: ``1`` is the class's decision boundary.

        Args:
            log_likelihoods (Sequence[tuple[torch.Tensor, torch.Tensor]]): See :meth:`components`.
            similarities (Sequence[torch.Tensor]): See :meth:`components`.
            coverage (Sequence[torch.Tensor]): See :meth:`components`.
            image_size (tuple[int, int] | torch.Size): Output size ``(H, W)``.
            scoring (Scoring | None): The class's record; the stored one when ``None``.
            averaged_distances (Sequence[torch.Tensor] | None): See :meth:`components` (needed where the class
                chose averaging).

        Returns:
            tuple[torch.Tensor, torch.Tensor]: Anomaly map ``(B, 1, H, W)`` and image score ``(B,)``.
        """
        record = self.record(scoring)
        parts = self.components(
            log_likelihoods, similarities, coverage, image_size, record.level_constants, averaged_distances
        )
        return self.calibrated(parts, record, (self.scoring,))[self.scoring]

    def record(self, scoring: Scoring | None = None) -> Scoring:
        """``scoring``, or the stored class's record (refused in eager when no class is stored)."""
        if scoring is not None:
            return scoring
        scoring = self.stored.get()
        if not torch.compiler.is_exporting() and not scoring.is_set:
            msg = (
                "This ResAD model holds no calibrated references for the class it scores. Set them with "
                "ResAD.set_references(...), --model.reference_dir <folder of k >= 2 normal images>, or a "
                "datamodule with normal training images of the class."
            )
            raise ResADInputError(msg)
        return scoring

    def calibrated(
        self, parts: ScoreComponents, scoring: Scoring, scorings: Sequence[str]
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Each of ``scorings``' calibrated map and image score from one set of uncalibrated maps.

        Args:
            parts (ScoreComponents): :meth:`components` of the images (with the flows' map where a scoring reads it,
                the averaged map where the class chose averaging and a scoring reads the nearest map).
            scoring (Scoring): The class's record.
            scorings (Sequence[str]): Scoring names (:data:`SCORINGS`).

        Returns:
            dict[str, tuple[torch.Tensor, torch.Tensor]]: Scoring name -> anomaly map ``(B, 1, H, W)`` and image
            score ``(B,)``, as :meth:`forward` gives them with that ``scoring``.
        """
        maps = relative_maps(parts, scoring, scorings)
        # the odd-frame check takes over only above its own thresholds: below them the images keep the score's
        # ranking (no normal image is ranked up by a mere lighting change)
        dissimilarity = parts.dissimilarity / (DISSIMILARITY_MARGIN * scoring.dissimilarity_max).clamp(min=_EPS)
        reverse_threshold = (REVERSE_DISSIMILARITY_MARGIN * scoring.reverse_dissimilarity_max).clamp(min=_EPS)
        odd = torch.maximum(dissimilarity, parts.reverse_dissimilarity / reverse_threshold)
        outputs = {}
        for name in scorings:
            calibrated_map = maps[name] / boundary(scoring, name, self.sensitivity).clamp(min=_EPS)
            score = calibrated_map.flatten(start_dim=1).amax(dim=1)
            outputs[name] = (calibrated_map, torch.where(odd > 1, torch.maximum(score, odd), score))
        return outputs

    def _flows_map(
        self,
        log_likelihoods: Sequence[tuple[torch.Tensor, torch.Tensor]],
        level_constants: torch.Tensor,
        image_size: tuple[int, int] | torch.Size,
        like: torch.Tensor,
    ) -> torch.Tensor:
        """The flows' map at the output size, not yet blurred (zeros without log-likelihoods)."""
        if not log_likelihoods:
            return like.new_zeros(like.shape[0], 1, *image_size)
        likelihood_map, classifier_map = 0.0, 0.0
        for level, (log_normal, log_abnormal) in enumerate(log_likelihoods):
            normality = torch.exp(torch.clamp(log_normal - level_constants[level], max=0.0)).unsqueeze(1)
            abnormal_probability = torch.softmax(torch.stack([log_normal, log_abnormal], dim=1), dim=1)[:, 1:]
            likelihood_map = likelihood_map + (1 - self._upsample(normality, image_size))
            classifier_map = classifier_map + self._upsample(abnormal_probability, image_size)
        return (likelihood_map + classifier_map / len(log_likelihoods)) / 2

    def _upsampled_sum(self, level_maps: list[torch.Tensor], image_size: tuple[int, int] | torch.Size) -> torch.Tensor:
        total = 0.0
        for level_map in level_maps:
            total = total + self._upsample(level_map.unsqueeze(1), image_size)
        return total

    @staticmethod
    def _upsample(level_map: torch.Tensor, image_size: tuple[int, int] | torch.Size) -> torch.Tensor:
        return F.interpolate(level_map, size=tuple(image_size), mode="bilinear", align_corners=True)
