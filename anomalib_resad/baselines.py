# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""Few-shot baselines run on exactly the same reference images as ResAD.

anomalib's PatchCore has no k-shot mode; :class:`FewShotPatchcore` fits anomalib's own ``Patchcore`` memory bank on
the k reference images of a class (all their patches: with k images a coreset would only discard evidence), so a
comparison uses the same k images, backbone weights and evaluation code as ResAD.

Example:
    >>> baseline = FewShotPatchcore("tf_efficientnet_lite0", ["blocks.2", "blocks.4"], weights)  # doctest: +SKIP
    >>> baseline.set_references(selection)  # doctest: +SKIP
    >>> scores = score_samples(baseline.model, test_samples)  # doctest: +SKIP
"""

from collections.abc import Sequence
from pathlib import Path

import torch
from anomalib.models import Patchcore

from .feature_extractor import ResADFeatureExtractor
from .lightning_model import ResAD
from .references import ReferenceSelection, load_images


class FewShotPatchcore:
    """anomalib ``Patchcore`` whose memory bank holds every patch of k reference images.

    Args:
        backbone (str): timm backbone.
        layers (Sequence[str]): Feature levels (PatchCore uses two middle levels).
        pre_trained (bool | str | Path): timm weights, ``False``, or a local weights file (as for ResAD).
        image_size (int): Input size. Defaults to ``224``.
        num_neighbors (int): PatchCore's re-weighting neighbours. Defaults to ``9``.
    """

    def __init__(
        self,
        backbone: str,
        layers: Sequence[str],
        pre_trained: bool | str | Path = True,
        image_size: int = 224,
        num_neighbors: int = 9,
    ) -> None:
        pre_processor = ResAD.configure_pre_processor(image_size=image_size, backbone=backbone)  # same inputs as ResAD
        self.model = Patchcore(
            backbone=backbone,
            layers=layers,
            pre_trained=False,
            num_neighbors=num_neighbors,
            pre_processor=pre_processor,
            post_processor=False,
            evaluator=False,
            visualizer=False,
        )
        if pre_trained:  # same weights as ResAD, loaded by the same code (local files included)
            extractor = ResADFeatureExtractor(backbone, layers, pre_trained)
            extractor.load_pretrained_weights()
            self.model.model.feature_extractor.feature_extractor.load_state_dict(
                extractor.extractor.feature_extractor.state_dict(),
            )

    @torch.no_grad()
    def set_references(self, selection: ReferenceSelection) -> None:
        """Fill the memory bank with all patches of the reference images."""
        torch_model = self.model.model
        images = load_images(selection.paths, self.model.pre_processor.transform).to(self.model.device)
        torch_model.train()
        torch_model.embedding_store.clear()
        torch_model(images)
        torch_model.memory_bank = torch.vstack(torch_model.embedding_store)
        torch_model.embedding_store.clear()
        torch_model.eval()
