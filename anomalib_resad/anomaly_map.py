# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""Anomaly maps, image scores and their per-class calibration, image by image.

The reference code (``validate.py``) averages two maps, and so does this module:

* **likelihood map** ``S1 = sum_l (1 - exp(min(logp_l - c_l, 0)))``, each level bilinearly upsampled
  (``align_corners=True``) to the input size - the paper's Eq. 7 summed over levels;
* **classifier map** ``S2 = mean_l softmax([logp_l, logp_abnormal_l])[1]``, the probability of the "abnormal" Gaussian;
* ``map = GaussianBlur(sigma=4)((S1 + S2) / 2)``; image score = the map's maximum (``image_score="max"``, the
  reference) or the mean of its top ``top_fraction`` pixels (``"top_mean"``).

**The constants c_l.** The reference takes ``c_l`` as the maximum log-likelihood over the *whole test set of a
class*, so one image's score depends on every other test image - impossible in deployment. Here (``level_constants=
"per_class"``, default) they come from the class's k reference images alone: every reference image is scored against
a bank of the other k - 1 (*leave-one-out*), and ``c_l`` is the largest normal log-likelihood seen at level l. The
same leave-one-out scores set the class's thresholds (:class:`ScoreCalibration`). ``level_constants="global"`` uses
one constant per level for every class instead, learned in training (an EMA of the largest normal log-likelihood).
Log-likelihoods above ``c_l`` count as fully normal (the ``min(., 0)``): a flow can give *higher* likelihood to
residuals far from anything it saw (a blank frame), which must not make a score negative.

**Calibrated outputs.** :meth:`AnomalyMapGenerator.forward` divides the map by the class's map threshold and the
image score by its score threshold, so ``1`` is the decision boundary of every class. Frames unlike the references
(blank, saturated, noise, another product) are caught by two more statistics, each with its own leave-one-out
threshold: the *dissimilarity*, the mean over levels and positions of ``1 - cos`` of each image position's nearest
reference feature (what of the image the references lack), and the *reverse dissimilarity*, the mean of ``1 - cos``
of each *reference* position's nearest feature in the image (what of the references the image lacks). The second is
needed where the references are mostly uniform: a black or white frame matches a circuit board's background better
than the board's references match each other (forward ratio 0.05-1.3 on DeepPCB), but leaves the tracks and pads
unmatched (reverse ratio >= 1.7; docs/benchmark.md). Above either threshold, the image score is the largest of the
ratios (below both, the score alone: the check sets labels, it does not reorder the images it passes).

**Nearest-neighbour score** (``nearest_score=True``, not in the reference). The flows are trained on the source
classes; on a target class unlike them they can rank images worse than their own input does. The nearest-neighbour
map - ``1 - cos`` of each position's nearest reference feature on the two deepest levels, summed, upsampled and
blurred like the map - is PatchCore's score on ResAD's own matching and costs nothing extra (the matching is done
anyway). With the option, the anomaly map is the mean of the flows' map and the nearest-neighbour map, each divided
by its own leave-one-out threshold (on all three settings of ``../shared/data`` that localises 0.4-0.9 point of pixel
AUROC better than the flows' map alone), and the image score is that fused map's score (``image_score``: its
maximum by default, or its top-pixel mean): a defect must stand out where both terms see it (the mean of the two terms'
own maxima ranked images better or level on all three settings, end to end). Each term is divided by ``margin`` x
its own leave-one-out maximum, so every leave-one-out reference stays at or below ``1 / margin`` on the fused map and
the class's boundary stays at ``1``; with ``image_score="max"`` an image is flagged exactly when its map has a pixel
above the boundary (or the odd-frame check fires) - ``"top_mean"`` is more conservative (its thresholds are still
those of the maxima). See docs/benchmark.md (ablation, "The image score of the fused map").

**PatchCore's matching, chosen per class** (``nearest_averaging``). PatchCore averages each feature with its
3 x 3 neighbours before matching and measures Euclidean distances; on stochastic textures that localises and ranks
better than ResAD's position-precise cosine matching, on aligned parts (circuit boards) it blurs small defects away.
With ``"auto"`` a class's k references choose: synthetic defects pasted into each reference
(:mod:`~anomalib_resad.synthetic_defects`) are scored leave-one-out with both matchings, and when the averaged one
puts them more than ``1 + AVERAGING_GAIN`` times further above its own threshold (median ratio), the class is scored
with it: its anomaly map (and so its image score) is the mean of the flows' map and the averaged map, each divided by
its own leave-one-out threshold (the other classes' map: the mean of the flows' map and the precise
nearest-neighbour map, likewise). ``"on"`` / ``"off"`` force it.

Example:
    >>> import torch
    >>> generator = AnomalyMapGenerator(num_levels=1)
    >>> level = (torch.zeros(2, 4, 4), torch.full((2, 4, 4), -1.0))
    >>> similarity = torch.ones(2, 4, 4)
    >>> components = generator.components([level], [similarity], (16, 16), torch.zeros(1))
    >>> tuple(components.anomaly_map.shape), tuple(components.score.shape)
    ((2, 1, 16, 16), (2,))
"""

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from .errors import ResADConfigurationError, ResADInputError, check_choice

logger = logging.getLogger(__name__)

IMAGE_SCORES = ("max", "top_mean")
LEVEL_CONSTANTS = ("per_class", "global")
# map, score, dissimilarity, nearest, reverse dissimilarity, averaged nearest, averaging (0 / 1): L + 7 values
CALIBRATION_THRESHOLDS = 7
NEAREST_AVERAGING = ("off", "auto", "on")
# "auto": average when synthetic defects land this much further above the averaged matching's threshold (median
# ratio). With PatchCore's Euclidean averaged matching the statistic is narrower than with the cosine one (which chose
# 0.1): 0.05 is the one gain that, for each of the three ../shared/data settings, sends the *other two* settings'
# texture draws to averaging and their board draws to precise matching best (benchmarks/averaging_statistic.py;
# docs/benchmark.md, "Which nearest-neighbour map")
AVERAGING_GAIN = 0.05
NEAREST_LEVELS = 2  # the nearest-neighbour score uses the deepest levels, as PatchCore does


class ScoreComponents(NamedTuple):
    """Uncalibrated scoring results of a batch.

    Attributes:
        anomaly_map (torch.Tensor): ``(B, 1, H, W)`` anomaly map.
        score (torch.Tensor): ``(B,)`` image score (max or top mean of the map).
        map_max (torch.Tensor): ``(B,)`` the map's maximum.
        dissimilarity (torch.Tensor): ``(B,)`` mean ``1 - cos`` of the nearest-reference matches.
        level_max_log_likelihood (torch.Tensor): ``(B, L)`` largest normal log-likelihood per level.
        nearest (torch.Tensor): ``(B,)`` maximum of the nearest-neighbour map (``1 - cos`` of the matches on the two
            deepest levels, summed, upsampled and blurred).
        reverse_dissimilarity (torch.Tensor): ``(B,)`` mean ``1 - cos`` of each reference position's best match in
            the image, averaged over levels.
        averaged_nearest (torch.Tensor | None): ``(B,)`` the maximum of the averaged nearest-neighbour map
            (``None``: not computed).
        averaged_map (torch.Tensor | None): ``(B, 1, H, W)`` the averaged nearest-neighbour map: PatchCore's matching
            (3 x 3 averaging of both sides, Euclidean distance) on the two deepest levels, summed, upsampled and
            blurred (``None``: not computed).
        nearest_map (torch.Tensor | None): ``(B, 1, H, W)`` the nearest-neighbour map whose maximum is ``nearest``.
    """

    anomaly_map: torch.Tensor
    score: torch.Tensor
    map_max: torch.Tensor
    dissimilarity: torch.Tensor
    level_max_log_likelihood: torch.Tensor
    nearest: torch.Tensor
    reverse_dissimilarity: torch.Tensor
    averaged_nearest: torch.Tensor | None = None
    averaged_map: torch.Tensor | None = None
    nearest_map: torch.Tensor | None = None


@dataclass
class ScoreCalibration:
    """Per-class scoring constants and thresholds, set from the class's k reference images alone.

    Stored as one flat tensor (:meth:`to_tensor`, layout ``[c_0 .. c_{L-1}, map, score, dissimilarity, nearest,
    reverse dissimilarity, averaged nearest, averaging]``, ``L + 7`` values) wherever a
    class's references live: the model's buffers (checkpoint, ``anomalib export``), a references ``.npz`` file and
    the ``calibration`` input of the reference-conditioned export.

    Attributes:
        level_constants (torch.Tensor): ``(L,)`` the constants ``c_l``.
        map_threshold (float): Anomaly-map value above which a pixel is anomalous.
        score_threshold (float): Flow score above which an image is anomalous (the image boundary without
            ``nearest_score``; with it the image score is the fused map's, in the map's units).
        dissimilarity_threshold (float): Dissimilarity above which a frame is unlike the references.
        nearest_threshold (float): Divides the precise nearest-neighbour map in the fused map (``margin`` x its
            largest leave-one-out maximum).
        reverse_dissimilarity_threshold (float): Reverse dissimilarity above which a frame is unlike the references
            (``0``: not calibrated - references set before the statistic existed; that check is then off).
        averaged_nearest_threshold (float): Threshold of the neighbourhood-averaged nearest-neighbour score (``0``:
            not calibrated).
        averaging (float): ``1``: the class's fused map (and so its score) uses the averaged nearest-neighbour map
            instead of the precise one; ``0``: precise.
    """

    level_constants: torch.Tensor
    map_threshold: float
    score_threshold: float
    dissimilarity_threshold: float
    nearest_threshold: float
    reverse_dissimilarity_threshold: float
    averaged_nearest_threshold: float = 0.0
    averaging: float = 0.0

    def to_tensor(self) -> torch.Tensor:
        """Flat float32 tensor ``(L + 7,)``."""
        thresholds = torch.tensor(
            [
                self.map_threshold,
                self.score_threshold,
                self.dissimilarity_threshold,
                self.nearest_threshold,
                self.reverse_dissimilarity_threshold,
                self.averaged_nearest_threshold,
                self.averaging,
            ]
        )
        return torch.cat([self.level_constants.detach().float().cpu(), thresholds])

    @classmethod
    def from_tensor(cls, values: torch.Tensor) -> "ScoreCalibration":
        """Inverse of :meth:`to_tensor`."""
        values = values.detach().float().cpu()
        return cls(
            values[:-CALIBRATION_THRESHOLDS].clone(), *(float(value) for value in values[-CALIBRATION_THRESHOLDS:])
        )


def odd_frame_statistics(
    similarities: Sequence[torch.Tensor], coverage: Sequence[torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two statistics of the odd-frame check, from a batch's matches against a class's references.

    Args:
        similarities (Sequence[torch.Tensor]): Per level, each image position's best similarity ``(B, H_l, W_l)``.
        coverage (Sequence[torch.Tensor] | None): Per level, each reference position's best similarity in each image
            ``(B, M_l)``; ``None`` gives a reverse dissimilarity of zeros.

    Returns:
        tuple[torch.Tensor, torch.Tensor]: The dissimilarity and the reverse dissimilarity ``(B,)``: mean
        ``1 - cos`` over positions, then over levels.

    Example:
        >>> dissimilarity, reverse = odd_frame_statistics([torch.full((1, 2, 2), 0.75)], [torch.tensor([[1.0, 0.0]])])
        >>> dissimilarity.tolist(), reverse.tolist()
        ([0.25], [0.5])
    """
    dissimilarity = torch.stack([(1 - level).flatten(start_dim=1).mean(dim=1) for level in similarities]).mean(dim=0)
    if coverage is None:
        return dissimilarity, torch.zeros_like(dissimilarity)
    return dissimilarity, torch.stack([(1 - level).mean(dim=1) for level in coverage]).mean(dim=0)


def leave_one_out_calibration(
    score_reference: Callable[[int, torch.Tensor], ScoreComponents],
    k: int,
    num_levels: int,
    global_constants: torch.Tensor | None = None,
    margin: float = 1.0,
    dissimilarity_margin: float = 1.0,
    reverse_dissimilarity_margin: float = 1.0,
    nearest_averaging: str = "off",
    score_defects: Callable[[int, torch.Tensor], ScoreComponents] | None = None,
) -> ScoreCalibration:
    """Calibrate a class from its k reference images: each scored against a bank of the other k - 1.

    The rule: ``c_l`` = the largest log-likelihood at level l over all leave-one-out positions (``global_constants``
    instead when given); each threshold = ``margin`` x the largest leave-one-out value of its statistic (the
    dissimilarity with ``dissimilarity_margin``, the reverse one with ``reverse_dissimilarity_margin``). Leave-one-out
    banks hold one image fewer than the bank used on queries, so for the flows, the nearest-neighbour score and the
    forward dissimilarity the reference images look a little *less* normal here than normal queries will (fewer
    candidates to match): those thresholds err towards fewer false alarms. The reverse dissimilarity has no such
    bias (a larger bank brings more positions to cover as well as more to choose from); its margin was measured.

    This function is the one place where the rule lives: eager PyTorch and the exported OpenVINO calibrator both call
    it, each with its own ``score_reference``.

    Args:
        score_reference (Callable[[int, torch.Tensor], ScoreComponents]): ``(i, level_constants) ->`` the scoring of
            reference image ``i`` against the bank of the other references, with those constants.
        k (int): Number of reference images (at least 2).
        num_levels (int): Number of feature levels.
        global_constants (torch.Tensor | None): Use these ``(L,)`` constants instead of per-class ones.
        margin (float): Factor on the largest leave-one-out map and image score. Defaults to ``1``.
        dissimilarity_margin (float): Factor on the largest leave-one-out dissimilarity. Defaults to ``1``.
        reverse_dissimilarity_margin (float): Factor on the largest leave-one-out reverse dissimilarity.
            Defaults to ``1``.
        nearest_averaging (str): ``"off"``, ``"on"`` or ``"auto"`` (chosen from ``score_defects``; see the module
            docstring). Defaults to ``"off"``.
        score_defects (Callable[[int, torch.Tensor], ScoreComponents] | None): ``(i, level_constants) ->`` the
            scoring of reference image ``i``'s synthetic defects against the bank of the other references (only the
            two nearest-neighbour scores are read). Needed for ``"auto"``.

    Returns:
        ScoreCalibration: The class's calibration.

    Raises:
        ResADInputError: ``k < 2`` (leave-one-out needs a bank of at least one other image).
        ResADConfigurationError: ``"auto"`` without ``score_defects``, or an unknown ``nearest_averaging``.
    """
    check_choice("nearest_averaging", nearest_averaging, NEAREST_AVERAGING)
    if nearest_averaging == "auto" and score_defects is None:
        msg = "nearest_averaging='auto' needs the reference images' synthetic defects scored (score_defects)."
        raise ResADConfigurationError(msg)
    if k < 2:
        msg = (
            f"ResAD sets each class's scoring constants and threshold from its reference images scored against each "
            f"other (leave-one-out), which needs k >= 2 normal images; got k={k}. Give at least 2 reference images."
        )
        raise ResADInputError(msg)
    if global_constants is None:
        probe = torch.zeros(num_levels)
        constants = torch.stack(
            [score_reference(index, probe).level_max_log_likelihood.amax(dim=0).float().cpu() for index in range(k)]
        ).amax(dim=0)
    else:
        constants = global_constants.detach().float().cpu()
    results = [score_reference(index, constants) for index in range(k)]
    map_max = max(float(result.map_max.max()) for result in results)
    score = max(float(result.score.max()) for result in results)
    dissimilarity = max(float(result.dissimilarity.max()) for result in results)
    nearest = max(float(result.nearest.max()) for result in results)
    reverse = max(float(result.reverse_dissimilarity.max()) for result in results)
    averaged = max(float(_averaged(result).max()) for result in results)
    eps = 1e-6  # a threshold of 0 would divide by zero (k identical references)
    averaging = float(nearest_averaging == "on")
    if nearest_averaging == "auto":
        defects = [score_defects(index, constants) for index in range(k)]
        precise = torch.cat([result.nearest.flatten() for result in defects]) / max(nearest, eps)
        pooled = torch.cat([_averaged(result).flatten() for result in defects]) / max(averaged, eps)
        averaging = float(float(pooled.median()) > (1 + AVERAGING_GAIN) * float(precise.median()))
    return ScoreCalibration(
        level_constants=constants,
        map_threshold=max(margin * map_max, eps),
        score_threshold=max(margin * score, eps),
        dissimilarity_threshold=max(dissimilarity_margin * dissimilarity, eps),
        nearest_threshold=max(margin * nearest, eps),
        reverse_dissimilarity_threshold=max(reverse_dissimilarity_margin * reverse, eps),
        averaged_nearest_threshold=max(margin * averaged, eps),
        averaging=averaging,
    )


def _averaged(components: ScoreComponents) -> torch.Tensor:
    """The averaged nearest-neighbour score of scoring results (zeros where it was not computed)."""
    value = components.averaged_nearest
    return torch.zeros_like(components.nearest) if value is None else value


class SeparableGaussianBlur(nn.Module):
    """Gaussian smoothing of every channel of ``(B, C, H, W)`` maps as two 1-D convolutions, replicate borders.

    Written here because anomalib's ``GaussianBlur2d`` convolves with the full 2-D kernel: at the reference's
    sigma = 4 that is 33 x 33 = 1,089 multiply-adds per pixel against 2 x 33 here, for the same result (a Gaussian is
    separable; padding once and filtering rows then columns equals the 2-D filter on the padded map). Measured on
    one CPU thread, 224 x 224: 37 ms vs 1.7-2.7 ms per map - with two maps per image, most of the light model's
    scoring time. kornia's separable ``gaussian_blur2d`` rebuilds its kernel on every call (2x slower than this).

    Args:
        sigma (float): Standard deviation, in pixels.
        truncate (float): Kernel radius in standard deviations (``scipy.ndimage.gaussian_filter``'s default, as in
            the reference code). Defaults to ``4``.
        padding_mode (str): ``F.pad`` mode of the borders. Defaults to ``"replicate"`` (works for maps of any size).

    Example:
        >>> blur = SeparableGaussianBlur(sigma=1.0)
        >>> maps = torch.zeros(1, 2, 9, 9)
        >>> maps[0, 0, 4, 4] = 1.0
        >>> smoothed = blur(maps)
        >>> round(float(smoothed[0, 0].sum()), 4), float(smoothed[0, 1].abs().max())
        (1.0, 0.0)
    """

    def __init__(self, sigma: float, truncate: float = 4.0, padding_mode: str = "replicate") -> None:
        super().__init__()
        self.padding_mode = padding_mode
        self.radius = int(truncate * sigma + 0.5)
        offsets = torch.arange(-self.radius, self.radius + 1, dtype=torch.float32)
        kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
        # not saved: derived from ``sigma``, and checkpoints of before hold anomalib's 2-D kernel instead
        self.register_buffer("kernel", kernel / kernel.sum(), persistent=False)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        """Smooth ``(B, C, H, W)`` maps."""
        batch, channels, height, width = maps.shape
        flat = F.pad(maps.reshape(batch * channels, 1, height, width), (self.radius,) * 4, self.padding_mode)
        flat = F.conv2d(flat, self.kernel.view(1, 1, 1, -1))
        flat = F.conv2d(flat, self.kernel.view(1, 1, -1, 1))
        return flat.reshape(batch, channels, height, width)


class AnomalyMapGenerator(nn.Module):
    """Turn per-level log-likelihood maps into an anomaly map and an image score, calibrated per class.

    Args:
        num_levels (int): Number of feature levels.
        sigma (float): Standard deviation of the Gaussian smoothing, in output pixels. Defaults to ``4`` (reference).
        image_score (str): ``"max"`` (reference) or ``"top_mean"``. Defaults to ``"max"``.
        top_fraction (float): Share of the map's pixels averaged by ``"top_mean"``. Defaults to ``0.01``.
        level_constants (str): ``"per_class"`` (from the references, default) or ``"global"`` (learned in training).
        dissimilarity_check (bool): Flag frames unlike the references through the dissimilarity and the reverse
            dissimilarity. Defaults to ``True``.
        nearest_score (bool): Fuse the flows' map with the class's nearest-neighbour map (each over its threshold);
            the image score is the fused map's score (see the module docstring). Defaults to ``False`` (the
            reference's flows alone).

    Attributes:
        global_level_constants (torch.Tensor): ``(L,)`` constants learned in training (EMA).
        calibration (torch.Tensor): ``(L + 7,)`` the stored class's :class:`ScoreCalibration` (zeros: none yet).
    """

    def __init__(
        self,
        num_levels: int,
        sigma: float = 4.0,
        image_score: str = "max",
        top_fraction: float = 0.01,
        level_constants: str = "per_class",
        dissimilarity_check: bool = True,
        nearest_score: bool = False,
    ) -> None:
        super().__init__()
        check_choice("image_score", image_score, IMAGE_SCORES)
        check_choice("level_constants", level_constants, LEVEL_CONSTANTS)
        if not 0.0 < top_fraction <= 1.0:
            msg = f"top_fraction must be in (0, 1], got {top_fraction}."
            raise ResADConfigurationError(msg)
        self.num_levels = num_levels
        self.image_score = image_score
        self.top_fraction = top_fraction
        self.level_constants = level_constants
        self.dissimilarity_check = dissimilarity_check
        self.nearest_score = nearest_score
        # the training-free `nearest` row of `resad evaluate`: the class's nearest-neighbour map alone (precise or
        # averaged, as its references chose) over its threshold - ResAD's matching with no trained part
        self.nearest_only = False
        self.register_buffer("global_level_constants", torch.zeros(num_levels))
        self.register_buffer("calibration", torch.zeros(num_levels + CALIBRATION_THRESHOLDS))
        # scipy.ndimage.gaussian_filter's truncate=4, as in the reference; "replicate" borders work for maps of any
        # size ("reflect" needs maps larger than the kernel radius)
        self.blur = SeparableGaussianBlur(sigma)

    @property
    def has_calibration(self) -> bool:
        """Whether a class calibration is stored."""
        thresholds = self.calibration[-CALIBRATION_THRESHOLDS:]
        return bool(thresholds[:3].gt(0).all()) and (not self.nearest_score or bool(thresholds[3] > 0))

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object, **kwargs: object) -> None:
        """Read checkpoints of before the nearest (``L + 3``), reverse (``L + 4``) or averaging (``L + 5``) values.

        Their stored 2-D blur kernel (anomalib's ``GaussianBlur2d``) is dropped: the separable one is derived from
        ``sigma``. The missing thresholds are unset (``0``). Such a model scores as before: without the reverse check
        (a warning says so while references are stored); with ``nearest_score`` and no nearest threshold it asks for
        its references to be set again.
        """
        state_dict.pop(f"{prefix}blur.kernel", None)  # anomalib's 2-D kernel, saved by earlier versions
        stored = state_dict.get(f"{prefix}calibration")
        full = self.num_levels + CALIBRATION_THRESHOLDS
        if stored is not None and full - 4 <= stored.numel() < full:
            state_dict[f"{prefix}calibration"] = torch.cat([stored, stored.new_zeros(full - stored.numel())])
            # L + 5: no averaged nearest-neighbour threshold, averaging 0 = off, as these references were scored
            if stored.numel() < full - 2 and bool(stored[self.num_levels :].gt(0).any()):
                logger.warning(
                    "These stored references were calibrated before the reverse odd-frame check (blank or saturated "
                    "frames against mostly uniform references): it stays off until the references are set again "
                    "(ResAD.set_references, --model.reference_dir, or `resad references`)."
                )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def update_global_constant(self, level: int, normal_log_likelihoods: torch.Tensor, momentum: float) -> None:
        """EMA update of a level's global constant with the largest normal log-likelihood of a training step."""
        if normal_log_likelihoods.numel():
            constants = self.global_level_constants
            constants[level] = momentum * constants[level] + (1 - momentum) * normal_log_likelihoods.max()

    def constants_for(self, calibration: torch.Tensor) -> torch.Tensor:
        """The ``c_l`` to score with: the calibration's (per class) or the learned global ones."""
        return calibration[: self.num_levels] if self.level_constants == "per_class" else self.global_level_constants

    def components(
        self,
        log_likelihoods: Sequence[tuple[torch.Tensor, torch.Tensor]],
        similarities: Sequence[torch.Tensor],
        image_size: tuple[int, int] | torch.Size,
        level_constants: torch.Tensor,
        coverage: Sequence[torch.Tensor] | None = None,
        averaged_distances: Sequence[torch.Tensor] | None = None,
    ) -> ScoreComponents:
        """Uncalibrated map, image score and dissimilarities.

        Args:
            log_likelihoods (Sequence[tuple[torch.Tensor, torch.Tensor]]): Per level, the normal and abnormal
                per-dimension log-likelihood maps ``(B, H_l, W_l)``.
            similarities (Sequence[torch.Tensor]): Per level, cosine similarity of each position's match
                ``(B, H_l, W_l)``.
            image_size (tuple[int, int] | torch.Size): Output size ``(H, W)``.
            level_constants (torch.Tensor): ``(L,)`` the constants ``c_l``.
            coverage (Sequence[torch.Tensor] | None): Per level, each reference position's best similarity in each
                image ``(B, M_l)`` (:class:`~anomalib_resad.feature_converter.ResidualMatches`). ``None``: no
                reverse dissimilarity (zeros).
            averaged_distances (Sequence[torch.Tensor] | None): The two deepest levels' nearest distances after
                neighbourhood averaging (:meth:`~anomalib_resad.feature_converter.FeatureConverter.
                averaged_distances`). ``None``: no averaged nearest-neighbour map and score (zeros).

        Returns:
            ScoreComponents: The scoring results.
        """
        likelihood_map = 0.0
        classifier_map = 0.0
        for level, (log_normal, log_abnormal) in enumerate(log_likelihoods):
            normality = torch.exp(torch.clamp(log_normal - level_constants[level], max=0.0)).unsqueeze(1)
            abnormal_probability = torch.softmax(torch.stack([log_normal, log_abnormal], dim=1), dim=1)[:, 1:]
            likelihood_map = likelihood_map + (1 - self._upsample(normality, image_size))
            classifier_map = classifier_map + self._upsample(abnormal_probability, image_size)
        maps = [(likelihood_map + classifier_map / len(log_likelihoods)) / 2]
        maps += self._nearest_maps(similarities, averaged_distances, image_size)
        # all maps in one call of the blur
        blurred = self.blur(torch.cat(maps, dim=1)).split(1, dim=1)
        # maps of their own, not views of one tensor holding them all
        anomaly_map, nearest_map = blurred[0].contiguous(), blurred[1].contiguous()
        map_max = anomaly_map.flatten(start_dim=1).amax(dim=1)
        score = self.score_of(anomaly_map)
        level_max = torch.stack([log_normal.flatten(start_dim=1).amax(dim=1) for log_normal, _ in log_likelihoods])
        nearest = nearest_map.flatten(start_dim=1).amax(dim=1)
        averaged_map = blurred[2].contiguous() if len(blurred) > 2 else None
        averaged = (
            averaged_map.flatten(start_dim=1).amax(dim=1) if averaged_map is not None else torch.zeros_like(nearest)
        )
        dissimilarity, reverse = odd_frame_statistics(similarities, coverage)
        return ScoreComponents(
            anomaly_map,
            score,
            map_max,
            dissimilarity,
            level_max.T,
            nearest,
            reverse,
            averaged,
            averaged_map,
            nearest_map,
        )

    def score_of(self, anomaly_map: torch.Tensor) -> torch.Tensor:
        """Image score of a ``(B, 1, H, W)`` map: its maximum, or the mean of its top ``top_fraction`` pixels."""
        flat = anomaly_map.flatten(start_dim=1)
        if self.image_score == "max":
            return flat.amax(dim=1)
        count = max(1, round(flat.shape[1] * self.top_fraction))
        return flat.topk(count, dim=1).values.mean(dim=1)

    def _nearest_maps(
        self,
        similarities: Sequence[torch.Tensor],
        averaged_distances: Sequence[torch.Tensor] | None,
        image_size: tuple[int, int] | torch.Size,
    ) -> list[torch.Tensor]:
        """The precise (and averaged) nearest-neighbour maps at the output size, not yet blurred."""
        nearest_map = 0.0
        for similarity in similarities[-NEAREST_LEVELS:]:
            nearest_map = nearest_map + self._upsample((1 - similarity).unsqueeze(1), image_size)
        if averaged_distances is None:
            return [nearest_map]
        averaged_map = 0.0
        for distance in averaged_distances[-NEAREST_LEVELS:]:
            averaged_map = averaged_map + self._upsample(distance.unsqueeze(1), image_size)
        return [nearest_map, averaged_map]

    def nearest_components(
        self,
        similarities: Sequence[torch.Tensor],
        averaged_distances: Sequence[torch.Tensor],
        image_size: tuple[int, int] | torch.Size,
        maps: bool = False,
    ) -> ScoreComponents:
        """Only the two nearest-neighbour scores, without the flows (what the averaging choice reads).

        The same values as :meth:`components` gives for them (the blur treats each map on its own); the other
        fields are zeros. Scoring the references' synthetic defects this way skips the constraintor and the flows.
        ``maps=True`` also returns the two maps (``nearest_map``, ``averaged_map``; benchmarks read them) - off by
        default, so a calibration holding k x 12 defects' results keeps no maps.

        Example:
            >>> generator = AnomalyMapGenerator(num_levels=2)
            >>> parts = generator.nearest_components([torch.ones(1, 4, 4)] * 2, [torch.zeros(1, 4, 4)] * 2, (8, 8))
            >>> parts.nearest.tolist(), parts.averaged_nearest.tolist()
            ([0.0], [0.0])
        """
        nearest_map, averaged_map = self.blur(
            torch.cat(self._nearest_maps(similarities, averaged_distances, image_size), dim=1)
        ).split(1, dim=1)
        nearest = nearest_map.flatten(start_dim=1).amax(dim=1)
        zeros = torch.zeros_like(nearest)
        averaged = averaged_map.flatten(start_dim=1).amax(dim=1)
        return ScoreComponents(
            None,
            zeros,
            zeros,
            zeros,
            zeros.new_zeros(len(zeros), self.num_levels),
            nearest,
            zeros,
            averaged,
            averaged_map.contiguous() if maps else None,
            nearest_map.contiguous() if maps else None,
        )

    def forward(
        self,
        log_likelihoods: Sequence[tuple[torch.Tensor, torch.Tensor]],
        similarities: Sequence[torch.Tensor],
        image_size: tuple[int, int] | torch.Size,
        calibration: torch.Tensor | None = None,
        coverage: Sequence[torch.Tensor] | None = None,
        averaged_distances: Sequence[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Calibrated anomaly map and image score: ``1`` is the class's decision boundary.

        Args:
            log_likelihoods (Sequence[tuple[torch.Tensor, torch.Tensor]]): See :meth:`components`.
            similarities (Sequence[torch.Tensor]): See :meth:`components`.
            image_size (tuple[int, int] | torch.Size): Output size ``(H, W)``.
            calibration (torch.Tensor | None): ``(L + 7,)`` the class's calibration; the stored one when ``None``.
            coverage (Sequence[torch.Tensor] | None): See :meth:`components`.
            averaged_distances (Sequence[torch.Tensor] | None): See :meth:`components` (needed where the
                calibration asks for averaging).

        Returns:
            tuple[torch.Tensor, torch.Tensor]: Anomaly map ``(B, 1, H, W)`` and image score ``(B,)``.
        """
        if calibration is None:
            if not torch.compiler.is_exporting() and not self.has_calibration:
                msg = (
                    "This ResAD model holds no calibrated references for the class it scores. Set them with "
                    "ResAD.set_references(...), --model.reference_dir <folder of k >= 2 normal images>, or a "
                    "datamodule with normal training images of the class."
                )
                raise ResADInputError(msg)
            calibration = self.calibration
        elif not torch.compiler.is_exporting() and calibration.numel() != self.num_levels + CALIBRATION_THRESHOLDS:
            msg = (
                f"A calibration of {calibration.numel()} values was given; this model reads {self.num_levels} level "
                f"constants + {CALIBRATION_THRESHOLDS} thresholds. Make the references again with this anomalib-resad."
            )
            raise ResADInputError(msg)
        parts = self.components(
            log_likelihoods, similarities, image_size, self.constants_for(calibration), coverage, averaged_distances
        )
        (
            map_threshold,
            score_threshold,
            dissimilarity_threshold,
            nearest_threshold,
            reverse_threshold,
            averaged_threshold,
            averaging,
        ) = calibration[-CALIBRATION_THRESHOLDS:].unbind()
        anomaly_map = parts.anomaly_map / map_threshold
        if self.nearest_only:
            anomaly_map = parts.nearest_map / nearest_threshold
            if parts.averaged_map is not None:
                averaged = parts.averaged_map / averaged_threshold.clamp(min=1e-12)
                anomaly_map = torch.where(averaging > 0, averaged, anomaly_map)
            score = self.score_of(anomaly_map)
        elif not self.nearest_score:
            score = parts.score / score_threshold  # the reference's flow score
        else:
            # the flows' map fused with the precise nearest-neighbour map, or - for the classes that chose averaging -
            # with PatchCore's averaged map, each divided by its own leave-one-out threshold (docs/benchmark.md, "Which
            # nearest-neighbour map"); the image score is this map's score, so the image is judged on the map the
            # user sees: a defect must stand out where both terms see it, not in each term somewhere (the mean of the
            # two terms' own maxima ranked images better or level on all three settings; "The image score of the
            # fused map"). Every leave-one-out reference stays <= 1 / margin on it, so 1 is still the boundary.
            fused = (anomaly_map + parts.nearest_map / nearest_threshold) / 2
            if parts.averaged_map is not None:
                averaged_fused = (anomaly_map + parts.averaged_map / averaged_threshold.clamp(min=1e-12)) / 2
                fused = torch.where(averaging > 0, averaged_fused, fused)
            anomaly_map = fused
            score = self.score_of(fused)
        if self.dissimilarity_check:
            # the check takes over only above its own thresholds: the labels are those of max(score, ratios), and
            # below them the images keep the score's ranking (no normal image is ranked up by a mere lighting change).
            # A reverse threshold of 0 is references calibrated before that statistic: its check is off.
            reverse = torch.where(
                reverse_threshold > 0, parts.reverse_dissimilarity / reverse_threshold.clamp(min=1e-12), 0.0
            )
            odd = torch.maximum(parts.dissimilarity / dissimilarity_threshold, reverse)
            score = torch.where(odd > 1, torch.maximum(score, odd), score)
        return anomaly_map, score

    @staticmethod
    def _upsample(level_map: torch.Tensor, image_size: tuple[int, int] | torch.Size) -> torch.Tensor:
        return F.interpolate(level_map, size=tuple(image_size), mode="bilinear", align_corners=True)
