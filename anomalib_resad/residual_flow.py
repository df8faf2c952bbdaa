# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""Feature Distribution Estimator: one conditional normalizing flow per level over constrained residuals.

Exactly the reference's flow (``models/fc_flow.py: conditional_flow_model``), built with anomalib's CFlow helpers, which
construct the same thing: a FrEIA ``SequenceINN`` of ``AllInOneBlock`` s with an MLP subnet ``Linear(d, 2d) -> ReLU ->
Linear(2d, out)``, ``affine_clamping=1.9``, ``SOFTPLUS`` global affine and soft (random orthogonal) permutations,
conditioned on a 2-D sin/cos positional encoding. The flow works on single vectors: spatial context enters only
through the condition.

Log-likelihoods are divided by the number of channels everywhere (loss, boundaries, maps), as in the reference code.
Besides the normal log-likelihood ``log N(z; 0, I) + log|det J|``, the flow reports the "abnormal" one under
``N(z; 1, I)``, which the reference uses for its focal loss and its second anomaly map.

Inference projects the condition once per position: each subnet's first layer splits into
``W_x @ x1 + (W_cond @ condition + bias)``, and the second term is the same for every image - a ``(H*W, 2d)`` table
per block, cached until the weights change (eager) or folded into a constant by OpenVINO (export). Exact up to float
summation order; wide_resnet50_2's flows run about 1.2x faster on CPU (``benchmarks/bench_flow_condition.py``).
Training keeps FrEIA's own forward.

Example:
    >>> import torch
    >>> flow = ResidualFlow([4], coupling_layers=2, pos_embed_dim=8)
    >>> log_normal, log_abnormal = flow([torch.rand(2, 4, 3, 3)])[0]
    >>> tuple(log_normal.shape), bool(torch.isfinite(log_abnormal).all())
    ((2, 3, 3), True)
"""

import logging
from collections.abc import Sequence

import torch
from anomalib.models.image.cflow.utils import cflow_head, get_logp, positional_encoding_2d
from torch import nn
from torch.nn import functional as F  # noqa: N812

from .feature_converter import flatten_positions


def log_likelihoods(z: torch.Tensor, log_jac_det: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension log-likelihoods of flow outputs under the normal and the "abnormal" Gaussian.

    Args:
        z (torch.Tensor): Flow outputs ``(N, C)``.
        log_jac_det (torch.Tensor): Log-determinant of the Jacobian ``(N,)``.

    Returns:
        tuple[torch.Tensor, torch.Tensor]: ``(log N(z; 0, I) + logdet, log N(z; 1, I) + logdet)``, each divided by C.
    """
    channels = z.shape[1]
    return get_logp(channels, z, log_jac_det) / channels, get_logp(channels, z - 1, log_jac_det) / channels


class ResidualFlow(nn.Module):
    """Per-level conditional normalizing flows.

    ``project_condition`` (``True``): at inference, each subnet's condition share comes from per-position tables
    (:meth:`condition_tables`): wide_resnet50_2's flows about 1.2x faster, the whole model about 1.1x, in eager
    PyTorch and in the exported graph, whose constants grow by the tables (``H*W x 2d`` floats per block). Set it to
    ``False`` on a model before use or export to trade that speed back for memory.

    Args:
        channels (Sequence[int]): Channels of each feature level.
        coupling_layers (int): ``AllInOneBlock`` s per flow. Defaults to ``10`` (reference code; the paper says 8).
        clamp_alpha (float): Affine clamping of the coupling blocks. Defaults to ``1.9``.
        pos_embed_dim (int): Dimension of the positional-encoding condition (multiple of 4). Defaults to ``256``.
        permute_soft (bool): Random orthogonal (``True``, reference) or hard channel permutations. Defaults to ``True``.
    """

    def __init__(
        self,
        channels: Sequence[int],
        coupling_layers: int = 10,
        clamp_alpha: float = 1.9,
        pos_embed_dim: int = 256,
        permute_soft: bool = True,
    ) -> None:
        super().__init__()
        self.pos_embed_dim = pos_embed_dim
        # anomalib's AllInOneBlock warns once per block that soft permutations of >512 channels initialise slowly
        # (about 1 s for WRN50's 1024 channels here); the reference uses them, so keep them and the log quiet.
        block_logger = logging.getLogger("anomalib.models.components.flow.all_in_one_block")
        previous_level = block_logger.level
        block_logger.setLevel(logging.ERROR)
        try:
            self.flows = nn.ModuleList(
                cflow_head(pos_embed_dim, coupling_layers, clamp_alpha, channel, permute_soft=permute_soft)
                for channel in channels
            )
        finally:
            block_logger.setLevel(previous_level)
        self.project_condition = True
        # level -> (what its tables were computed from, one table per block); see condition_tables
        self._condition_tables: dict[int, tuple[tuple, list[torch.Tensor]]] = {}

    def train(self, mode: bool = True) -> "ResidualFlow":
        """Switch mode and drop the condition tables.

        Whatever trains the weights (a fused optimizer too) runs between two mode switches, so the next inference
        rebuilds them from the weights it then finds.
        """
        self._condition_tables.clear()
        return super().train(mode)

    def __getstate__(self) -> dict:
        """Pickle (``torch.save`` of the module, ``copy.deepcopy``) without the condition tables: derived data."""
        return {**self.__dict__, "_condition_tables": {}}

    def __setstate__(self, state: dict) -> None:
        """Unpickle, modules pickled before the tables existed too (anomalib's ``to_torch`` files)."""
        state.setdefault("project_condition", True)
        state.setdefault("_condition_tables", {})
        super().__setstate__(state)

    def positional_encoding(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        """Condition vectors ``(H*W, D)`` for the positions of an ``H x W`` feature map, row-major."""
        encoding = positional_encoding_2d(self.pos_embed_dim, height, width).to(device)
        return encoding.reshape(self.pos_embed_dim, -1).T

    def flatten(self, feature: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """Positions of a ``(B, C, H, W)`` map as flow inputs: vectors ``(N, C)``, conditions ``(N, D)``, mask ``(N,)``.

        Args:
            feature (torch.Tensor): Constrained residuals of one level.
            mask (torch.Tensor | None): ``(B, H, W)`` anomaly mask (1 = anomalous); zeros when ``None``.

        Returns:
            tuple[torch.Tensor, ...]: ``(vectors, conditions, mask)``, row-major over (batch, row, column).
        """
        batch, _, height, width = feature.shape
        conditions = self.positional_encoding(height, width, feature.device).repeat(batch, 1)
        mask = feature.new_zeros(batch, height, width) if mask is None else mask
        return flatten_positions(feature), conditions, mask.reshape(-1)

    def sample_positions(
        self, feature: torch.Tensor, mask: torch.Tensor, positions: int | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A random subset of ``positions`` positions of a level (all when ``None`` or fewer exist), for training."""
        vectors, conditions, mask = self.flatten(feature, mask)
        if positions is not None and vectors.shape[0] > positions:
            chosen = torch.randperm(vectors.shape[0], device=vectors.device)[:positions]
            vectors, conditions, mask = vectors[chosen], conditions[chosen], mask[chosen]
        return vectors, conditions, mask

    def vector_log_likelihoods(
        self,
        level: int,
        vectors: torch.Tensor,
        conditions: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-likelihoods of feature vectors of one level.

        Args:
            level (int): Level index.
            vectors (torch.Tensor): Constrained residual vectors ``(N, C_l)``.
            conditions (torch.Tensor): Positional encodings ``(N, D)``.

        Returns:
            tuple[torch.Tensor, torch.Tensor]: Normal and abnormal per-dimension log-likelihoods ``(N,)``.
        """
        z, log_jac_det = self.flows[level](vectors, [conditions])
        return log_likelihoods(z, log_jac_det)

    def condition_tables(self, level: int, height: int, width: int, device: torch.device) -> list[torch.Tensor]:
        """Per coupling block of ``level``: ``W_cond @ condition + bias`` of its subnet's first layer, ``(H*W, 2d)``.

        One set per level is kept while gradients are off, for the map size, mode and first-layer weights it was
        computed from: the same tensors (storage kept alive by the cache, so an address cannot be reused) at the same
        version - ``load_state_dict``, a device or dtype move and in-place edits rebuild it, and every switch between
        training and eval mode drops it (fused optimizers do not bump versions; a fused step taken in eval mode, or
        a write through ``.data``, is not seen). With gradients on, or while ``torch.onnx.export`` traces, the tables
        are computed in the graph (OpenVINO folds them into constants). Computed in the weights' dtype, autocast off.

        Args:
            level (int): Level index.
            height (int): Rows of the level's feature map.
            width (int): Columns of the level's feature map.
            device (torch.device): Device of the features.

        Returns:
            list[torch.Tensor]: One table per block, rows in row-major position order.
        """
        firsts = [block.subnet[0] for block in self.flows[level].module_list]

        def compute() -> list[torch.Tensor]:
            condition = self.positional_encoding(height, width, device).to(firsts[0].weight.dtype)
            return [F.linear(condition, first.weight[:, -self.pos_embed_dim :], first.bias) for first in firsts]

        parameters = [tensor for first in firsts for tensor in (first.weight, first.bias)]
        if torch.compiler.is_compiling() or torch.is_grad_enabled() or any(t.is_inference() for t in parameters):
            return compute()  # (inference tensors have no version counter to check a cache against)
        cached = self._condition_tables.get(level)
        if cached is not None:
            (size, inference, versions, aliases), tables = cached
            if (
                size == (height, width)
                and inference == torch.is_inference_mode_enabled()
                and versions == tuple(t._version for t in parameters)
                and all(
                    a.data_ptr() == t.data_ptr() and a.dtype == t.dtype
                    for a, t in zip(aliases, parameters, strict=True)
                )
                and tables[0].device == device
            ):
                return tables
        stamp = (
            (height, width),
            torch.is_inference_mode_enabled(),
            tuple(t._version for t in parameters),
            tuple(t.detach() for t in parameters),  # keeps the storage alive: its address stays theirs
        )
        with torch.autocast(device.type, enabled=False):  # kept tables: full precision whatever the caller's autocast
            self._condition_tables[level] = (stamp, compute())
        return self._condition_tables[level][1]

    def _projected_flow(self, level: int, feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``self.flows[level](vectors, [conditions])`` with the condition's share of each subnet precomputed.

        Follows ``AllInOneBlock.forward`` (anomalib's port of FrEIA's, for the configuration ``cflow_head`` builds:
        no Householder, no pre-permutation) block by block; only the subnet's first layer differs.
        ``tests/unit/test_residual_flow.py`` checks it against FrEIA's forward.
        """
        batch, _, height, width = feature.shape
        tables = self.condition_tables(level, height, width, feature.device)
        x = flatten_positions(feature)
        log_jac_det = x.new_zeros(())
        for block, table in zip(self.flows[level].module_list, tables, strict=True):
            first, activation, last = block.subnet
            x1, x2 = torch.split(x, block.splits, dim=1)
            hidden = F.linear(x1, first.weight[:, : x1.shape[1]]).unflatten(0, (batch, -1)) + table
            coefficients = last(activation(hidden.flatten(0, 1)))
            x2, coupling_log_jac = block._affine(x2, coefficients)  # the block's own coupling and scaling
            x, scaling_log_jac = block._permute(torch.cat((x1, x2), 1), rev=False)
            log_jac_det = log_jac_det + coupling_log_jac + scaling_log_jac  # one "pixel" per vector
        return x, log_jac_det

    def _projection_applies(self, level: int) -> bool:
        return all(
            block.conditional and not block.householder and not block.reverse_pre_permute and not block.GIN
            for block in self.flows[level].module_list
        )

    def forward(self, features: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Log-likelihood maps of all positions of all levels.

        In training mode through FrEIA's forward; otherwise with the condition projected once per position
        (:meth:`condition_tables`), the same values up to float summation order.

        Args:
            features (Sequence[torch.Tensor]): Per-level constrained residuals ``(B, C_l, H_l, W_l)``.

        Returns:
            list[tuple[torch.Tensor, torch.Tensor]]: Per level, normal and abnormal log-likelihood maps ``(B, H, W)``.
        """
        outputs = []
        for level, feature in enumerate(features):
            batch, _, height, width = feature.shape
            if self.training or not self.project_condition or not self._projection_applies(level):
                vectors, conditions, _ = self.flatten(feature)
                log_normal, log_abnormal = self.vector_log_likelihoods(level, vectors, conditions)
            else:
                log_normal, log_abnormal = log_likelihoods(*self._projected_flow(level, feature))
            outputs.append((log_normal.reshape(batch, height, width), log_abnormal.reshape(batch, height, width)))
        return outputs
