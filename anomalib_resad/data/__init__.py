# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""Data for ResAD: many categories as one datamodule, and the embedded texture dataset."""

from .multi_class import CategorySource, MultiClassDataModule, MultiClassDataset
from .textures import generate_texture_dataset

__all__ = ["CategorySource", "MultiClassDataModule", "MultiClassDataset", "generate_texture_dataset"]
