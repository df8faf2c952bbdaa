# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""Feature Converter: turn patch features into residuals against a few normal reference images.

For every level, each query feature vector is matched to its nearest feature among *all positions of all* k reference
images of the same class (global matching, not same-position), and replaced by the residual to it. Like the reference
code, "nearest" is the highest cosine similarity and the residual uses the raw (un-normalised) reference vector:

* ``"squared"`` (reference code, default): ``(x - x*) ** 2`` element-wise;
* ``"difference"`` (NeurIPS paper, Eq. 1): ``x - x*``.

The reference bank (features of the k reference images) is computed once per class and kept in buffers, so it is
saved in checkpoints and baked into exported graphs; :meth:`FeatureConverter.forward` also accepts an explicit bank
(training draws fresh references per class per batch; deployment can feed a bank as a model input). Besides the
residuals it returns, per position, the cosine similarity of the match: how well the references explain the query,
and, per reference position, its best similarity in each image (how well the image covers the references); the
scoring uses both to flag frames unlike the references (:mod:`anomalib_resad.anomaly_map`).

Example:
    >>> import torch
    >>> converter = FeatureConverter(num_levels=1)
    >>> references = [torch.rand(2, 8, 4, 4)]  # k=2 reference images, one level
    >>> converter.set_bank(ReferenceBank.from_features(references))
    >>> residuals, similarities, coverage = converter([references[0][:1]])  # a reference image against its bank
    >>> float(residuals[0].abs().max()), round(float(similarities[0].min()), 4), tuple(coverage[0].shape)
    (0.0, 1.0, (1, 32))
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import torch
from anomalib.models.components import DynamicBufferMixin
from torch import nn
from torch.nn import functional as F  # noqa: N812

from .errors import ResADInputError, check_choice

if TYPE_CHECKING:
    from .calibration import Scoring

RESIDUAL_TYPES = ("squared", "difference")
# Similarity-matrix elements computed at once while matching (16 MiB of float32). The bound keeps memory flat for any
# k and batch size. On a 2-core AMD EPYC (one thread, interleaved), 16 MiB blocks matched the stride-4 level 1.2-1.8x
# faster than 64 MiB blocks (the previous size) for both Lite0 (24 channels) and wide_resnet50_2 (256): the row
# maximum then re-reads a block still partly in cache; 1 MiB blocks were up to 2x slower for wide channels (an
# interleaved comparison of block sizes, docs/history.md "Cheaper smoothing and matching blocks").
_MATCH_BLOCK_ELEMENTS = 1 << 22


def match_features(
    query: torch.Tensor, bank: torch.Tensor, coverage: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Match images' vectors to a bank both ways by cosine similarity.

    Forward, for every query vector: the bank vector with the highest cosine similarity, and that similarity (the
    residuals and the dissimilarity come from these). Reverse, for every bank vector and query image: its highest
    similarity to any vector of that image - how well the image *covers* the references. A blank frame matches a
    mostly uniform reference (a circuit board's background) well forward, but leaves the references' structure
    unmatched: the reverse view flags it (:mod:`~anomalib_resad.anomaly_map`). Both come from one similarity matrix.

    Args:
        query (torch.Tensor): Query vectors of B images ``(B, N, C)``.
        bank (torch.Tensor): Reference vectors ``(M, C)``.
        coverage (bool): Also the reverse view. Training and the matching choice read only the forward one, and the
            reverse maximum is a second pass over the similarity matrix (about a quarter of the matching time on a
            2-core AMD EPYC, Lite0's stride-4 level against 4 images). Defaults to ``True``.

    Returns:
        tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]: The matched (un-normalised) bank vectors
        ``(B, N, C)``, their cosine similarities ``(B, N)`` and each bank vector's best similarity per image
        ``(B, M)`` (``None`` without ``coverage``).

    Example:
        >>> bank = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> matched, similarity, coverage = match_features(torch.tensor([[[0.0, 3.0], [0.0, 1.0]]]), bank)
        >>> matched[0], similarity, coverage
        (tensor([[0., 2.],
                [0., 2.]]), tensor([[1., 1.]]), tensor([[0., 1.]]))
    """
    batch, length, _ = query.shape
    bank_normalized = F.normalize(bank, dim=1)
    query_normalized = F.normalize(query, dim=2)
    if torch.compiler.is_exporting():
        similarity = query_normalized.reshape(batch * length, -1) @ bank_normalized.T
        indices, best = _first_index_of_max(similarity)
        coverage = similarity.reshape(batch, length, -1).amax(dim=1)
        return bank[indices].reshape(batch, length, -1), best.reshape(batch, length), coverage
    # bound the similarity matrix: whole images at a time where they fit, else blocks of rows of one image
    size = max(1, length * bank.shape[0])
    if size <= _MATCH_BLOCK_ELEMENTS:
        blocks = query_normalized.split(_MATCH_BLOCK_ELEMENTS // size)
        parts = [_match_block(images, bank_normalized, coverage) for images in blocks]
    else:
        rows = max(1, _MATCH_BLOCK_ELEMENTS // max(1, bank.shape[0]))
        parts = []
        for image in query_normalized:
            blocks = [_match_block(part.unsqueeze(0), bank_normalized, coverage) for part in image.split(rows)]
            best, indices = (torch.cat([block[i] for block in blocks], dim=1) for i in range(2))
            covered = torch.stack([block[2] for block in blocks]).amax(dim=0) if coverage else None
            parts.append((best, indices, covered))
    best, indices = (torch.cat([part[i] for part in parts]) for i in range(2))
    return bank[indices], best, torch.cat([part[2] for part in parts]) if coverage else None


def _match_block(
    images: torch.Tensor, bank: torch.Tensor, coverage: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Best similarity and index per row ``(b, n)`` and per bank row ``(b, M)`` of normalised ``(b, n, C)``."""
    similarity = images @ bank.T
    best, indices = similarity.max(dim=2)
    return best, indices, similarity.amax(dim=1) if coverage else None


def nearest_reference(query: torch.Tensor, bank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return, for every query vector, the bank vector with the highest cosine similarity, and that similarity.

    Args:
        query (torch.Tensor): Query vectors ``(N, C)``.
        bank (torch.Tensor): Reference vectors ``(M, C)``.

    Returns:
        tuple[torch.Tensor, torch.Tensor]: The matched (un-normalised) bank vectors ``(N, C)`` and their cosine
        similarities ``(N,)``.

    Example:
        >>> bank = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> matched, similarity = nearest_reference(torch.tensor([[0.0, 3.0], [5.0, 0.0]]), bank)
        >>> matched, similarity
        (tensor([[0., 2.],
                [1., 0.]]), tensor([1., 1.]))
    """
    matched, similarity, _ = match_features(query.unsqueeze(0), bank, coverage=False)
    return matched[0], similarity[0]


def nearest_distance(query: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Euclidean distance of every query vector to its nearest bank vector.

    ``|q - b|^2 = |q|^2 - 2 q.b + |b|^2`` minimised over the bank: one matrix product (in blocks of the same bounded
    size as :func:`match_features`), no ``(B, N, M, C)`` difference tensor; what ``torch.cdist`` computes, written
    out because the exporter and OpenVINO take plain matrix products.

    Args:
        query (torch.Tensor): Query vectors of B images ``(B, N, C)``.
        bank (torch.Tensor): Reference vectors ``(M, C)``.

    Returns:
        torch.Tensor: ``(B, N)`` distances.

    Example:
        >>> bank = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
        >>> nearest_distance(torch.tensor([[[3.0, 3.0], [0.0, 1.0]]]), bank)
        tensor([[1., 1.]])
    """
    batch, length, _ = query.shape
    # centred on the bank's mean (distances unchanged): the expansion then subtracts smaller numbers, which keeps
    # the small normal distances that set the thresholds accurate - also where a runtime computes in f16 / bf16
    centre = bank.mean(dim=0)
    query, bank = query - centre, bank - centre
    bank_norms = (bank * bank).sum(dim=1)
    if torch.compiler.is_exporting():
        return _nearest_distance_block(query, bank, bank_norms)
    rows = max(1, _MATCH_BLOCK_ELEMENTS // max(1, bank.shape[0]))
    flat = query.reshape(batch * length, -1)
    parts = [_nearest_distance_block(block.unsqueeze(0), bank, bank_norms)[0] for block in flat.split(rows)]
    return torch.cat(parts).reshape(batch, length)


def _nearest_distance_block(query: torch.Tensor, bank: torch.Tensor, bank_norms: torch.Tensor) -> torch.Tensor:
    """Nearest Euclidean distance ``(b, n)`` of ``(b, n, C)`` query vectors to a ``(M, C)`` bank."""
    squared = (query * query).sum(dim=2, keepdim=True) - 2 * query @ bank.T + bank_norms
    return squared.amin(dim=2).clamp(min=0).sqrt()


def _first_index_of_max(similarity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``similarity.argmax(dim=1)`` written as reductions, for exported graphs.

    ONNX ``ArgMax`` becomes a ``TopK`` in OpenVINO, which took 55 % of the whole light model's time on CPU; a
    ``ReduceMax``, a select and a ``ReduceMin`` give the same first index 1.5-3x faster there (measured with
    OpenVINO's per-layer profiling; in eager PyTorch ``argmax`` itself is the faster one). The positions are
    integers: as floats, a runtime computing in bf16 or fp16 (OpenVINO's CPU default on bf16 hardware) would round
    them, bf16 holding whole numbers exactly only up to 256. The "no match" filler is 2**24, not the int32 maximum,
    which crashed OpenVINO 2026.4's CPU plugin at run time.
    """
    best = similarity.amax(dim=1, keepdim=True)
    positions = torch.arange(similarity.shape[1], dtype=torch.int32, device=similarity.device)
    return torch.where(similarity >= best, positions, 2**24).amin(dim=1).long(), best[:, 0]


def residual_features(features: torch.Tensor, matched: torch.Tensor, residual: str = "squared") -> torch.Tensor:
    """Residual of features against their matched reference features.

    Args:
        features (torch.Tensor): Query features, any shape.
        matched (torch.Tensor): Matched reference features, same shape.
        residual (str): ``"squared"`` (reference code) or ``"difference"`` (paper). Defaults to ``"squared"``.

    Returns:
        torch.Tensor: The residual features, same shape.
    """
    difference = features - matched
    return difference * difference if residual == "squared" else difference


def flatten_positions(feature: torch.Tensor) -> torch.Tensor:
    """Turn a ``(B, C, H, W)`` feature map into ``(B*H*W, C)`` vectors, row-major (batch, row, column).

    Example:
        >>> tuple(flatten_positions(torch.rand(2, 3, 4, 5)).shape)
        (40, 3)
    """
    return feature.permute(0, 2, 3, 1).reshape(-1, feature.shape[1])


def flatten_levels(features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Turn ``(k, C, H, W)`` feature maps into ``(k*H*W, C)`` banks, one per level.

    Args:
        features (Sequence[torch.Tensor]): Per-level feature maps of the reference images.

    Returns:
        list[torch.Tensor]: Per-level reference banks.
    """
    return [flatten_positions(feature) for feature in features]


class ResidualMatches(NamedTuple):
    """What :class:`FeatureConverter` returns, per level.

    Attributes:
        residuals (list[torch.Tensor]): Residual features ``(B, C_l, H_l, W_l)``.
        similarities (list[torch.Tensor]): Cosine similarity of each query position's match ``(B, H_l, W_l)``.
        coverage (list[torch.Tensor]): Each reference position's best similarity in each image ``(B, M_l)`` (empty
            where not asked for).
    """

    residuals: list[torch.Tensor]
    similarities: list[torch.Tensor]
    coverage: list[torch.Tensor]


@dataclass
class ReferenceBank:
    """The k reference images of one class as the model uses them: flattened features per level + scoring record.

    This is the one "bank" type: training banks (fresh references per batch) simply have no scoring record.

    Attributes:
        levels (list[torch.Tensor]): ``(k * views_l * H_l * W_l, C_l)`` per level.
        grids (list[tuple[int, int]]): ``(H_l, W_l)`` per level (the feature-map size the references were made at).
        k (int): Number of reference images.
        views (list[int]): Per level, the views of each reference image it holds, image by image
            (:mod:`~anomalib_resad.reference_views`). Defaults to one (the image itself) per level.
        scoring (Scoring | None): The class's :class:`~anomalib_resad.calibration.Scoring`, ``None`` for an
            uncalibrated (training) bank.
    """

    levels: list[torch.Tensor]
    grids: list[tuple[int, int]]
    k: int
    views: list[int] = field(default_factory=list)
    scoring: "Scoring | None" = None

    def __post_init__(self) -> None:
        self.views = [int(count) for count in self.views] or [1] * len(self.levels)

    @classmethod
    def from_features(
        cls,
        features: Sequence[torch.Tensor],
        views: Sequence[int] | None = None,
        scoring: "Scoring | None" = None,
    ) -> "ReferenceBank":
        """Build a bank from per-level ``(k * views_l, C_l, H_l, W_l)`` features (image by image)."""
        views = [1] * len(features) if views is None else [int(count) for count in views]
        return cls(
            levels=[level.contiguous() for level in flatten_levels(features)],
            grids=[(int(feature.shape[2]), int(feature.shape[3])) for feature in features],
            k=int(features[0].shape[0]) // views[0],
            views=views,
            scoring=scoring,
        )


class FeatureConverter(DynamicBufferMixin, nn.Module):
    """Residual features against the nearest reference features, level by level.

    Args:
        num_levels (int): Number of feature levels.
        residual (str): ``"squared"`` (reference code, default) or ``"difference"`` (paper, Eq. 1).

    Attributes:
        reference_layout (torch.Tensor): ``(L, 4)`` ``[k, views, H_l, W_l]`` of the stored bank (zeros when empty).
    """

    def __init__(self, num_levels: int, residual: str = "squared") -> None:
        super().__init__()
        check_choice("residual type", residual, RESIDUAL_TYPES)
        self.num_levels = num_levels
        self.residual = residual
        for level in range(num_levels):
            self.register_buffer(f"reference_{level}", torch.empty(0))
        self.register_buffer("reference_layout", torch.zeros(num_levels, 4, dtype=torch.long))

    @property
    def reference_levels(self) -> list[torch.Tensor]:
        """The stored per-level reference features ``(M_l, C_l)`` (no shape bookkeeping: traceable by export)."""
        return [getattr(self, f"reference_{level}") for level in range(self.num_levels)]

    @property
    def bank(self) -> ReferenceBank:
        """The stored reference bank (without its scoring record, which the scoring holds)."""
        layout = self.reference_layout.tolist()
        return ReferenceBank(
            levels=self.reference_levels,
            grids=[(height, width) for _, _, height, width in layout],
            k=int(layout[0][0]),
            views=[views for _, views, _, _ in layout],
        )

    @property
    def has_references(self) -> bool:
        """Whether a reference bank is stored."""
        return self.reference_0.numel() > 0

    def set_bank(self, bank: ReferenceBank) -> None:
        """Store a reference bank (in buffers: it is saved in checkpoints and baked into exports)."""
        if len(bank.levels) != self.num_levels:
            msg = f"Expected a reference bank with {self.num_levels} levels, got {len(bank.levels)}."
            raise ResADInputError(msg)
        device = self.reference_layout.device
        for level, (features, (height, width), views) in enumerate(
            zip(bank.levels, bank.grids, bank.views, strict=True)
        ):
            setattr(self, f"reference_{level}", features.detach().to(device).contiguous())
            self.reference_layout[level] = torch.tensor([bank.k, views, height, width], device=device)

    def check_query_grid(self, features: Sequence[torch.Tensor]) -> None:
        """Raise a clear error when query feature maps do not have the size the references were made at."""
        for level, feature in enumerate(features):
            expected = tuple(int(size) for size in self.reference_layout[level, 2:])
            if expected != (0, 0) and tuple(feature.shape[-2:]) != expected:
                msg = (
                    f"The references were made at another image size: level {level} of the references is "
                    f"{expected[0]}x{expected[1]}, of the query {feature.shape[-2]}x{feature.shape[-1]}. "
                    "Make the references with the same pre-processing (image size) as the images you score."
                )
                raise ResADInputError(msg)

    def forward(
        self,
        features: Sequence[torch.Tensor],
        bank: Sequence[torch.Tensor] | None = None,
        coverage: bool = True,
    ) -> "ResidualMatches":
        """Residuals of the query features against their nearest reference features.

        Args:
            features (Sequence[torch.Tensor]): Per-level query features ``(B, C_l, H_l, W_l)``.
            bank (Sequence[torch.Tensor] | None): Per-level reference banks ``(M_l, C_l)``; the stored bank when
                ``None``.
            coverage (bool): Also each reference position's best similarity (the odd-frame check's reverse view;
                :func:`match_features`). Defaults to ``True``; without it, ``coverage`` is empty.

        Returns:
            ResidualMatches: Per level, the residual features ``(B, C_l, H_l, W_l)``, the cosine similarity of each
            position's match ``(B, H_l, W_l)`` and each reference position's best similarity in each image
            ``(B, M_l)``.
        """
        if bank is None:
            if not torch.compiler.is_exporting():
                if not self.has_references:
                    msg = (
                        "ResAD has no reference images for this class. Give it k normal images of the class: "
                        "--model.reference_dir <folder>, a datamodule with normal training images, or "
                        "ResAD.set_references(...)."
                    )
                    raise ResADInputError(msg)
                self.check_query_grid(features)
            # not ``self.bank``: reading ``reference_layout`` (a buffer) into Python ints fails ``torch.export``'s
            # non-strict trace, which then prints the partial graph and retries with the slower strict one
            bank = self.reference_levels
        residuals, similarities, coverages = [], [], []
        for feature, references in zip(features, bank, strict=True):
            batch, _, height, width = feature.shape
            vectors = feature.permute(0, 2, 3, 1).reshape(batch, height * width, -1)
            matched, similarity, level_coverage = match_features(vectors, references, coverage)
            matched = matched.reshape(batch, height, width, -1).permute(0, 3, 1, 2)
            residuals.append(residual_features(feature, matched, self.residual))
            similarities.append(similarity.reshape(batch, height, width))
            if level_coverage is not None:
                coverages.append(level_coverage)
        return ResidualMatches(residuals, similarities, coverages)

    def averaged_distances(
        self,
        features: Sequence[torch.Tensor],
        bank: Sequence[torch.Tensor] | None = None,
        levels: int = 2,
    ) -> list[torch.Tensor]:
        """PatchCore's matching on the ``levels`` deepest levels: 3 x 3 averaging, then the Euclidean nearest distance.

        Both sides are averaged (``avg_pool2d(3, stride=1, padding=1)``, as PatchCore's feature pooling); the
        references are averaged within each reference image, whose grid is the query's (the bank holds ``k`` images
        of the query's feature size, row-major - checked in eager for the stored bank). The distance is Euclidean, as
        PatchCore's, not ResAD's cosine: on magnetic tile the Euclidean maps localise 6-7 points of pixel AUROC better
        than the cosine ones, and on CrackForest within 1 (docs/history.md, "Which nearest-neighbour map"). Used by
        the nearest-neighbour score and map of classes that need it (:mod:`~anomalib_resad.anomaly_map`); written here
        because it needs the bank.

        Args:
            features (Sequence[torch.Tensor]): Per-level query features ``(B, C_l, H_l, W_l)``.
            bank (Sequence[torch.Tensor] | None): Per-level reference banks ``(M_l, C_l)``; the stored bank when
                ``None``.
            levels (int): How many of the deepest levels. Defaults to ``2``.

        Returns:
            list[torch.Tensor]: Per level (the deepest ``levels``), each position's distance to its nearest averaged
            reference feature ``(B, H_l, W_l)``.
        """
        bank = self.reference_levels if bank is None else bank
        out = []
        for feature, references in zip(features[-levels:], list(bank)[-levels:], strict=True):
            batch, channels, height, width = feature.shape
            reference_maps = references.reshape(-1, height, width, channels).permute(0, 3, 1, 2)
            pooled_query = F.avg_pool2d(feature, 3, stride=1, padding=1)
            pooled_bank = F.avg_pool2d(reference_maps, 3, stride=1, padding=1).permute(0, 2, 3, 1)
            vectors = pooled_query.permute(0, 2, 3, 1).reshape(batch, height * width, channels)
            out.append(nearest_distance(vectors, pooled_bank.reshape(-1, channels)).reshape(batch, height, width))
        return out
