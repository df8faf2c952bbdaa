# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""A Lightning callback that records, on every DDP rank, what the rank drew and what it holds after training.

Given to ``anomalib train`` as ``--trainer.callbacks tests.helpers.ddp_probe.DDPProbe`` (with
``--trainer.callbacks.output_dir``): each rank writes ``rank<r>.pt`` with

* ``draws``: ``(global step, class, reference files)`` of every training-reference draw the rank made, in order;
* ``pools``: each class's pool of normal images the draws come from, and ``seed`` (``reference_seed``);
* ``state``: the rank's whole state dict at the end of training (parameters and buffers, on the CPU).
"""

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch


class DDPProbe(pl.Callback):
    """Record each rank's training-reference draws and final state (see the module docstring).

    Args:
        output_dir (str): Folder of the ``rank<r>.pt`` files.
    """

    def __init__(self, output_dir: str) -> None:
        self.output_dir = Path(output_dir)
        self.draws: list[tuple[int, str, list[str]]] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        references = pl_module.references
        training_bank = references.training_bank

        def recording_training_bank(class_name: str, k: int, rng: Any) -> Any:
            # the files of the draw are the ones whose features the bank is made of
            features, seen = references.features, []

            def recording_features(paths: Any, *args: Any, **kwargs: Any) -> Any:
                seen.append([str(path) for path in paths])
                return features(paths, *args, **kwargs)

            references.features = recording_features
            try:
                bank = training_bank(class_name, k, rng)
            finally:
                references.features = features
            self.draws.append((trainer.global_step, class_name, seen[0]))
            return bank

        references.training_bank = recording_training_bank

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        state = {name: value.detach().cpu().clone() for name, value in pl_module.state_dict().items()}
        torch.save(
            {
                "rank": trainer.global_rank,
                "world_size": trainer.world_size,
                "seed": pl_module.reference_seed,
                "train_k": pl_module.train_k,
                "pools": dict(pl_module.references.pools),
                "draws": self.draws,
                "state": state,
            },
            self.output_dir / f"rank{trainer.global_rank}.pt",
        )
