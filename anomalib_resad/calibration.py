# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""A class's scoring, set from its k reference images alone: the leave-one-out rule and its record.

ResAD scores a class it never saw from k normal images. Everything that class-specific scoring needs is measured on
those k images, each scored against a bank of the *other* k - 1 (leave-one-out: the reference image plays a normal
query), and kept in one record, :class:`Scoring`:

* ``level_constants`` - the constants ``c_l`` of the likelihood map: the largest normal log-likelihood at level l
  over all leave-one-out positions (the reference code takes it over the class's whole test set instead, so one
  image's score depends on the others: impossible in deployment);
* ``map_max``, ``nearest_max``, ``averaged_max`` - the largest leave-one-out value of the flows' map, of the
  nearest-neighbour map (position-precise cosine matching) and of PatchCore's averaged map;
* ``dissimilarity_max``, ``reverse_dissimilarity_max`` - the same for the odd-frame statistics
  (:func:`odd_frame_statistics`);
* ``averaging`` - whether the class is scored with PatchCore's averaged matching: synthetic defects pasted into its
  references (:mod:`~anomalib_resad.synthetic_defects`) choose it when they stand out further above its threshold
  than above the precise one's;
* ``fused_max`` and ``fused_defects``, ``nearest_defects``, ``paper_defects`` - where the class's normal and
  defective images lie in each scoring's *relative* units (:func:`relative_maps`: each map over its own maximum):
  the largest leave-one-out image score of the references (1 for ``nearest`` and ``paper`` by construction, at most 1
  for ``fused``) and the median image score of the references' synthetic defects, scored against the same
  leave-one-out banks.

The record holds *measurements*, not thresholds. A class's boundary sits between its references and its synthetic
defects (:func:`boundary`), ``1 - sensitivity`` of the way from the first to the second, applied where the class is
scored (:class:`~anomalib_resad.anomaly_map.AnomalyMapGenerator`), so a sensitivity set on a trained model takes
effect on classes stored before. The record is stored wherever a class's references go (the model's buffers, a
references file, the inputs of the reference-conditioned export) under its field names - never by position.

Leave-one-out banks hold one image fewer than the bank queries meet, so the reference images look a little *less*
normal here than normal queries will: thresholds err towards fewer false alarms.

Example:
    >>> scoring = Scoring.neutral(num_levels=2)
    >>> sorted(scoring.tensors())[:3]
    ['averaged_max', 'averaging', 'dissimilarity_max']
    >>> float(boundary(replace(scoring, nearest_defects=torch.tensor(3.0)), "nearest", sensitivity=0.5))
    2.0
    >>> list(leave_one_out_rows(3, views=[1, 2], index=1))
    [[0, 2], [0, 1, 4, 5]]
"""

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields, replace
from typing import NamedTuple

import torch

from .errors import ResADInputError

# Odd-frame margins (each statistic's threshold = margin x its leave-one-out maximum), chosen on the source classes'
# validation images of the three ../shared/data development settings (k = 2 and 4, 3 draws, threshold margin 1.25):
# among the swept pairs whose false-positive rate there stays <= 10 % at both k, the one that flags the most odd
# frames (black, white, grey, saturated, noise) on the 13 classes.
DISSIMILARITY_MARGIN = 2.0
REVERSE_DISSIMILARITY_MARGIN = 1.5
# Averaging is chosen when synthetic defects land this much further above the averaged matching's threshold (median
# ratio) than above the precise matching's: chosen leave-one-setting-out on the development settings' draws.
AVERAGING_GAIN = 0.05
NEAREST_LEVELS = 2  # the nearest-neighbour score reads the deepest levels, as PatchCore does
# Where a class's boundary sits between its references' largest leave-one-out score (sensitivity 1) and the median of
# its synthetic defects (0). Chosen on held-out-domain fold 1's source-validation images (6 domains, k = 2 and 4,
# 3 draws; docs/runs/shared_domains_fold1_verdict_boundaries.md): the one of 0.3-0.5 whose normal false-positive
# rate stays <= 10 % at both k and whose recall reaches 60 % of the best any threshold with that rate gets.
SENSITIVITY = 0.35
# A class's boundary never sits below this multiple of its references' largest leave-one-out score: k references
# show less of a class's normal range than its queries will, and where its synthetic defects barely stand out (chest
# CT: their median 0.96-1.08 x that score) the midway rule alone put the boundary on that score (29 % of normal images
# flagged at k = 4). Chosen on fold 1's source validation with the sensitivity above (docs/runs/
# shared_domains_fold1_boundary_floor.md): floors 1.025-1.05 keep the mean normal FPR <= 10 % and the recall >= 60 %
# of the ceiling at both k (1.0: FPR 11 % at k = 4; 1.06: recall below 60 % at k = 2); 1.04 is the window's middle.
BOUNDARY_FLOOR = 1.04
SCORINGS = ("fused", "nearest", "paper")
# References whose leave-one-out matching finds every feature again (1 - cos below this everywhere) are copies of one
# image: copies give float32 rounding noise (about 1e-7), different photographs of a part far more.
IDENTICAL_REFERENCES = 1e-4
_EPS = 1e-6


class ScoreComponents(NamedTuple):
    """Uncalibrated scoring results of a batch against one bank.

    Attributes:
        anomaly_map (torch.Tensor | None): ``(B, 1, H, W)`` the flows' map.
        map_max (torch.Tensor): ``(B,)`` its maximum.
        dissimilarity (torch.Tensor): ``(B,)`` mean ``1 - cos`` of each position's nearest reference feature.
        level_max_log_likelihood (torch.Tensor): ``(B, L)`` largest normal log-likelihood per level.
        nearest (torch.Tensor): ``(B,)`` maximum of the nearest-neighbour map.
        reverse_dissimilarity (torch.Tensor): ``(B,)`` mean ``1 - cos`` of each reference position's best match.
        averaged_nearest (torch.Tensor): ``(B,)`` maximum of the averaged nearest-neighbour map.
        nearest_map (torch.Tensor | None): ``(B, 1, H, W)`` the nearest-neighbour map.
        averaged_map (torch.Tensor | None): ``(B, 1, H, W)`` PatchCore's averaged map (``None``: not computed).
    """

    anomaly_map: torch.Tensor | None
    map_max: torch.Tensor
    dissimilarity: torch.Tensor
    level_max_log_likelihood: torch.Tensor
    nearest: torch.Tensor
    reverse_dissimilarity: torch.Tensor
    averaged_nearest: torch.Tensor
    nearest_map: torch.Tensor | None = None
    averaged_map: torch.Tensor | None = None


@dataclass
class Scoring:
    """A class's scoring record: its constants, its leave-one-out maxima and its matching choice.

    Every field is a tensor (a 0-d one but for ``level_constants``), so the record can be stored in buffers, passed to
    an exported graph as named inputs and read there without Python control flow.

    Attributes:
        level_constants (torch.Tensor): ``(L,)`` the constants ``c_l`` of the likelihood map.
        map_max (torch.Tensor): Largest leave-one-out value of the flows' map.
        nearest_max (torch.Tensor): Largest leave-one-out value of the precise nearest-neighbour map.
        averaged_max (torch.Tensor): Largest leave-one-out value of PatchCore's averaged map.
        dissimilarity_max (torch.Tensor): Largest leave-one-out dissimilarity.
        reverse_dissimilarity_max (torch.Tensor): Largest leave-one-out reverse dissimilarity.
        averaging (torch.Tensor): ``1``: the class is scored with the averaged map; ``0``: with the precise one.
        fused_max (torch.Tensor): Largest leave-one-out image score of the fused scoring, in relative units.
        fused_defects (torch.Tensor): Median image score of the references' synthetic defects, fused scoring,
            relative units (0: not measured).
        nearest_defects (torch.Tensor): The same for the nearest-neighbour scoring.
        paper_defects (torch.Tensor): The same for the flows' scoring.
    """

    level_constants: torch.Tensor
    map_max: torch.Tensor
    nearest_max: torch.Tensor
    averaged_max: torch.Tensor
    dissimilarity_max: torch.Tensor
    reverse_dissimilarity_max: torch.Tensor
    averaging: torch.Tensor
    fused_max: torch.Tensor
    fused_defects: torch.Tensor
    nearest_defects: torch.Tensor
    paper_defects: torch.Tensor

    @classmethod
    def names(cls) -> list[str]:
        """The field names, in declaration order."""
        return [field.name for field in fields(cls)]

    @classmethod
    def neutral(cls, num_levels: int) -> "Scoring":
        """A record of zeros: what a model holds before any class is set (its maxima mark it as not calibrated)."""
        return cls(torch.zeros(num_levels), *(torch.zeros(()) for _ in cls.names()[1:]))

    def tensors(self) -> dict[str, torch.Tensor]:
        """Field name -> tensor."""
        return {name: getattr(self, name) for name in self.names()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "Scoring":
        """Inverse of :meth:`tensors` (float32, contiguous; a missing or misshapen field is a clear error)."""
        missing = [name for name in cls.names() if name not in tensors]
        if missing:
            msg = f"A class scoring record lacks {missing}: make the references again with this anomalib-resad."
            raise ResADInputError(msg)
        values = {name: torch.as_tensor(tensors[name], dtype=torch.float32).contiguous() for name in cls.names()}
        if any(value.ndim != 0 for name, value in values.items() if name != "level_constants"):
            msg = "A class scoring record holds one value per field (and one constant per level)."
            raise ResADInputError(msg)
        return cls(**values)

    def to(self, device: torch.device | str) -> "Scoring":
        """The record on ``device``."""
        return Scoring(**{name: value.to(device) for name, value in self.tensors().items()})

    @property
    def is_set(self) -> bool:
        """Whether the record was measured on references (a neutral record's maxima are 0)."""
        return bool(self.map_max > 0) and bool(self.nearest_max > 0) and bool(self.dissimilarity_max > 0)


def relative_maps(parts: ScoreComponents, scoring: Scoring, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Each of ``names``' map in the class's *relative* units: every map over its own largest leave-one-out value.

    The nearest-neighbour map is the precise or the averaged one, as the class chose; ``"fused"`` is the mean of it
    and the flows' map (a defect must stand out where both see it). Boundaries (:func:`boundary`) are set and applied
    in these units.

    Args:
        parts (ScoreComponents): Uncalibrated maps (with the flows' map where a name reads it, the averaged map where
            the class chose averaging and a name reads the nearest map).
        scoring (Scoring): The class's record.
        names (Sequence[str]): Scoring names (:data:`SCORINGS`).

    Returns:
        dict[str, torch.Tensor]: Scoring name -> ``(B, 1, H, W)`` map (plus the maps the fused one is made of).
    """
    nearest = parts.nearest_map / scoring.nearest_max.clamp(min=_EPS)
    if parts.averaged_map is not None:
        averaged = parts.averaged_map / scoring.averaged_max.clamp(min=_EPS)
        nearest = torch.where(scoring.averaging > 0, averaged, nearest)
    flows = parts.anomaly_map / scoring.map_max.clamp(min=_EPS)
    maps = {"nearest": nearest, "paper": flows}
    if "fused" in names:
        maps["fused"] = (flows + nearest) / 2
    return maps


def boundary(
    scoring: Scoring, name: str, sensitivity: float = SENSITIVITY, floor: float = BOUNDARY_FLOOR
) -> torch.Tensor:
    """A class's image boundary under scoring ``name``, in relative units (:func:`relative_maps`).

    ``1 - sensitivity`` of the way from the references' largest leave-one-out score to the median of their synthetic
    defects: a boundary the defects a class's own references make tell, where a margin over the references alone
    cannot (its recall fell as k grew). Never below ``floor`` x the references' largest score (no reference is
    flagged, and k references' largest score is not a class's), also where the defects do not stand out or were not
    measured (0).

    Args:
        scoring (Scoring): The class's record.
        name (str): Scoring name (:data:`SCORINGS`).
        sensitivity (float): 1: the floor; 0: the defects' median. Defaults to :data:`SENSITIVITY`.
        floor (float): The lowest boundary, a multiple of the references' largest score. Defaults to
            :data:`BOUNDARY_FLOOR`.

    Returns:
        torch.Tensor: 0-d boundary.
    """
    one = torch.ones_like(scoring.fused_max)
    normal = torch.where(scoring.fused_max > 0, scoring.fused_max, one) if name == "fused" else one  # 0: not measured
    defects = getattr(scoring, f"{name}_defects")
    return torch.maximum(normal + (1 - sensitivity) * (defects - normal), floor * normal)


def image_scores(maps: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each map's image score: its maximum ``(B,)``."""
    return {name: value.flatten(start_dim=1).amax(dim=1) for name, value in maps.items()}


def odd_frame_statistics(
    similarities: Sequence[torch.Tensor], coverage: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two statistics of the odd-frame check, from a batch's matches against a class's references.

    The *dissimilarity* is what of the image the references lack; the *reverse dissimilarity* what of the references
    the image lacks. The second is needed where references are mostly uniform: a black frame matches a circuit
    board's background better than the board's references match each other, but leaves its tracks unmatched.

    Args:
        similarities (Sequence[torch.Tensor]): Per level, each image position's best similarity ``(B, H_l, W_l)``.
        coverage (Sequence[torch.Tensor]): Per level, each reference position's best similarity in each image
            ``(B, M_l)``.

    Returns:
        tuple[torch.Tensor, torch.Tensor]: The dissimilarity and the reverse dissimilarity ``(B,)``: mean
        ``1 - cos`` over positions, then over levels.

    Example:
        >>> dissimilarity, reverse = odd_frame_statistics([torch.full((1, 2, 2), 0.75)], [torch.tensor([[1.0, 0.0]])])
        >>> dissimilarity.tolist(), reverse.tolist()
        ([0.25], [0.5])
    """
    dissimilarity = torch.stack([(1 - level).flatten(start_dim=1).mean(dim=1) for level in similarities]).mean(dim=0)
    reverse = torch.stack([(1 - level).mean(dim=1) for level in coverage]).mean(dim=0)
    return dissimilarity, reverse


def leave_one_out_rows(k: int, views: Sequence[int], index: int) -> Iterator[list[int]]:
    """Per level, the bank rows (feature maps) of every reference image but ``index``.

    Level ``l`` of a bank holds ``k * views[l]`` feature maps, image by image (:mod:`~anomalib_resad.
    reference_views`): image ``i``'s views are rows ``i * views[l] .. (i + 1) * views[l] - 1``. Leaving image ``i``
    out leaves out all its views: a reference is never matched against a turned copy of itself.
    """
    for count in views:
        yield [row for row in range(k * count) if row // count != index]


def leave_one_out_banks(
    features: Sequence[torch.Tensor], views: Sequence[int]
) -> Iterator[tuple[int, list[torch.Tensor], list[torch.Tensor]]]:
    """Each reference image and the bank of the others, from a class's per-level bank features.

    Args:
        features (Sequence[torch.Tensor]): Per level ``(k * views_l, C_l, H_l, W_l)`` (or any array with rows first).
        views (Sequence[int]): Views per image in each level.

    Yields:
        tuple[int, list[torch.Tensor], list[torch.Tensor]]: ``(i, query, others)``: image ``i``'s own features (its
        first view: the image itself, ``(1, C_l, H_l, W_l)``) and the other images' rows of every level.

    Example:
        >>> levels = [torch.arange(3.0).reshape(3, 1, 1, 1)]
        >>> [(index, query[0].flatten().tolist(), others[0].flatten().tolist())
        ...  for index, query, others in leave_one_out_banks(levels, [1])][1]
        (1, [1.0], [0.0, 2.0])
    """
    k = int(features[0].shape[0]) // int(views[0])
    for index in range(k):
        query = [level[index * count : index * count + 1] for level, count in zip(features, views, strict=True)]
        rows = leave_one_out_rows(k, views, index)
        others = [level[list(kept)] for level, kept in zip(features, rows, strict=True)]
        yield index, query, others


def leave_one_out_scoring(
    score_reference: Callable[[int, torch.Tensor], ScoreComponents],
    k: int,
    num_levels: int,
    score_defects: Callable[[int, torch.Tensor], ScoreComponents] | None = None,
    averaging: float | None = None,
) -> Scoring:
    """A class's :class:`Scoring` from its k reference images, each scored against a bank of the other k - 1.

    This function is the one place the rule lives: eager PyTorch and the exported OpenVINO calibrator both call it,
    each with its own ``score_reference`` and ``score_defects``.

    Args:
        score_reference (Callable[[int, torch.Tensor], ScoreComponents]): ``(i, level_constants) ->`` the scoring of
            reference image ``i`` against the bank of the others, with those constants (with its maps).
        k (int): Number of reference images (at least 2).
        num_levels (int): Number of feature levels.
        score_defects (Callable[[int, torch.Tensor], ScoreComponents] | None): ``(i, level_constants) ->`` the
            scoring of reference image ``i``'s synthetic defects against the same bank (with their maps): they make
            the averaging choice and the boundaries. ``None``: precise matching, boundaries at the references'
            largest scores.
        averaging (float | None): The class's matching choice where it was made before on the same images (it reads
            the frozen backbone alone); ``None``: made here from the defects.

    Returns:
        Scoring: The class's record.

    Raises:
        ResADInputError: ``k < 2`` (leave-one-out needs a bank of at least one other image), non-finite scores or
            (near-)identical references.
    """
    if k < 2:
        msg = (
            f"ResAD sets each class's scoring constants and threshold from its reference images scored against each "
            f"other (leave-one-out), which needs k >= 2 normal images; got k={k}. Give at least 2 reference images."
        )
        raise ResADInputError(msg)
    probe = torch.zeros(num_levels)
    constants = torch.stack(
        [score_reference(index, probe).level_max_log_likelihood.amax(dim=0).float().cpu() for index in range(k)]
    ).amax(dim=0)
    results = [score_reference(index, constants) for index in range(k)]

    def largest(name: str) -> float:
        return max(float(getattr(result, name).max()) for result in results)

    nearest, averaged = largest("nearest"), largest("averaged_nearest")
    defects = [score_defects(index, constants) for index in range(k)] if score_defects is not None else []
    if averaging is None:
        averaging = 0.0
        if defects:
            precise = torch.cat([result.nearest.flatten() for result in defects]) / max(nearest, _EPS)
            pooled = torch.cat([result.averaged_nearest.flatten() for result in defects]) / max(averaged, _EPS)
            averaging = float(float(pooled.median()) > (1 + AVERAGING_GAIN) * float(precise.median()))
    values = [largest("map_max"), nearest, averaged, largest("dissimilarity"), largest("reverse_dissimilarity")]
    if not all(math.isfinite(value) for value in [*values, *constants.tolist()]):
        msg = "The references' leave-one-out scores are not finite: the reference images or the model are broken."
        raise ResADInputError(msg)
    if max(nearest, largest("dissimilarity")) < IDENTICAL_REFERENCES:
        msg = (
            f"The {k} reference images are (near-)identical: each matches the others perfectly, so no threshold can be "
            "set from them and every image unlike them in a single pixel would be flagged. Use k different normal "
            "images of the class."
        )
        raise ResADInputError(msg)
    zero = torch.zeros(())
    scoring = Scoring(constants, *(torch.tensor(value) for value in values), torch.tensor(float(averaging)),
                      zero, zero, zero, zero)  # fmt: skip
    normal = [image_scores(relative_maps(result, scoring, SCORINGS))["fused"] for result in results]
    scoring = replace(scoring, fused_max=torch.cat(normal).max().float().cpu())
    if defects:
        scores = [image_scores(relative_maps(result, scoring, SCORINGS)) for result in defects]
        medians = {name: torch.cat([each[name] for each in scores]).median().float().cpu() for name in SCORINGS}
        if not all(math.isfinite(float(value)) for value in medians.values()):
            msg = "The references' synthetic defects score as not finite: the reference images or the model are broken."
            raise ResADInputError(msg)
        scoring = replace(scoring, **{f"{name}_defects": value for name, value in medians.items()})
    return scoring
