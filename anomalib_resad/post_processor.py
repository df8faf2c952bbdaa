# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""anomalib's post-processor with the class's own threshold instead of one learned on validation images.

anomalib's :class:`~anomalib.post_processing.PostProcessor` learns one image and one pixel threshold (F1-optimal)
and a min-max range from the validation set. For ResAD the validation set holds *source* classes, so that
threshold means nothing for a class the model never saw. ResAD's torch model already outputs scores and maps in
units of the scored class's own threshold (set from its k references, see :mod:`anomalib_resad.anomaly_map`), so
the decision boundary is ``1`` for every class. This post-processor fixes it there and maps ``[0, 2]`` to
``[0, 1]``: a normalised score above ``0.5`` means "above the class's threshold", in eager PyTorch and in every
exported graph (its buffers are baked in like anomalib's). Sensitivities shift the boundary as in anomalib.

Example:
    >>> import torch
    >>> from anomalib.data import InferenceBatch
    >>> post_processor = CalibratedPostProcessor()
    >>> scores, maps = torch.tensor([0.5, 1.5]), torch.zeros(2, 1, 4, 4)
    >>> output = post_processor(InferenceBatch(pred_score=scores, anomaly_map=maps))
    >>> output.pred_score.tolist(), output.pred_label.tolist()
    ([0.25, 0.75], [False, True])
"""

from typing import Any

import torch
from anomalib.post_processing import PostProcessor

# Calibrated units: 1 is the class's threshold; [0, 2] is mapped linearly to [0, 1].
_THRESHOLD = 1.0
_RANGE = (0.0, 2.0)


class CalibratedPostProcessor(PostProcessor):
    """Post-processor whose thresholds are the per-class calibrated boundary ``1`` (nothing learned on validation).

    Args:
        **kwargs: :class:`~anomalib.post_processing.PostProcessor` arguments (sensitivities ...).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        with torch.no_grad():
            self._image_threshold.fill_(_THRESHOLD)
            self._pixel_threshold.fill_(_THRESHOLD)
            self.image_min.fill_(_RANGE[0])
            self.pixel_min.fill_(_RANGE[0])
            self.image_max.fill_(_RANGE[1])
            self.pixel_max.fill_(_RANGE[1])

    def on_validation_batch_end(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to learn: the thresholds come from each class's references."""
        del args, kwargs

    def on_validation_epoch_end(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to learn: the thresholds come from each class's references."""
        del args, kwargs
