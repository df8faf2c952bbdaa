# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""Anomaly maps and image scores from the flows' per-level log-likelihoods, image by image.

The reference code (``validate.py``) averages two maps, and so does this module:

* **likelihood map** ``S1 = sum_l (1 - exp(logp_l - c_l))``, each level bilinearly upsampled (``align_corners=True``)
  to the input size - the paper's Eq. 7 summed over levels;
* **classifier map** ``S2 = mean_l softmax([logp_l, logp_abnormal_l])[1]``, the probability of the "abnormal" Gaussian;
* ``map = GaussianBlur(sigma=4)((S1 + S2) / 2)``; image score = the map's maximum.

The reference takes ``c_l`` as the maximum log-likelihood over the *whole test set of a class*, so one image's score
depends on every other test image - impossible in deployment, where images come one at a time. Here ``c_l`` is a
constant per level learned in training (an EMA of the largest normal log-likelihood, see
:class:`~anomalib_resad.loss.ResADLoss`), stored in the checkpoint and the exported graph: every image is scored on
its own. Within one class the reference's constant only shifts the map (the ``max - sum`` form), so rankings, and
hence AUROC, differ from the reference only through the per-level weights ``exp(-c_l)``.

Example:
    >>> import torch
    >>> generator = AnomalyMapGenerator(num_levels=1)
    >>> level = (torch.zeros(2, 4, 4), torch.full((2, 4, 4), -1.0))
    >>> anomaly_map, score = generator([level], image_size=(16, 16))
    >>> tuple(anomaly_map.shape), tuple(score.shape)
    ((2, 1, 16, 16), (2,))
"""

from collections.abc import Sequence

import torch
from anomalib.models.components import GaussianBlur2d
from torch import nn
from torch.nn import functional as F  # noqa: N812

# Largest exponent used in the likelihood map: keeps exp() finite for a flow far from its training distribution.
_MAX_EXPONENT = 30.0


class AnomalyMapGenerator(nn.Module):
    """Turn per-level log-likelihood maps into an anomaly map and an image score.

    Args:
        num_levels (int): Number of feature levels.
        sigma (float): Standard deviation of the Gaussian smoothing, in output pixels. Defaults to ``4`` (reference).

    Attributes:
        log_likelihood_reference (torch.Tensor): ``(L,)`` per-level constants ``c_l`` subtracted before ``exp``.
    """

    def __init__(self, num_levels: int, sigma: float = 4.0) -> None:
        super().__init__()
        self.register_buffer("log_likelihood_reference", torch.zeros(num_levels))
        kernel_size = 2 * int(4.0 * sigma + 0.5) + 1  # scipy.ndimage.gaussian_filter's truncate=4, as in the reference
        # "replicate" borders work for maps of any size ("reflect" needs maps larger than the kernel radius)
        self.blur = GaussianBlur2d(
            kernel_size=(kernel_size, kernel_size),
            sigma=(sigma, sigma),
            channels=1,
            border_type="replicate",
        )

    def forward(
        self,
        log_likelihoods: Sequence[tuple[torch.Tensor, torch.Tensor]],
        image_size: tuple[int, int] | torch.Size,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Compute the anomaly map and the image score.

        Args:
            log_likelihoods (Sequence[tuple[torch.Tensor, torch.Tensor]]): Per level, the normal and abnormal
                per-dimension log-likelihood maps ``(B, H_l, W_l)``.
            image_size (tuple[int, int] | torch.Size): Output size ``(H, W)``.

        Returns:
            tuple[torch.Tensor, torch.Tensor]: Anomaly map ``(B, 1, H, W)`` and image score ``(B,)``.
        """
        likelihood_map = 0.0
        classifier_map = 0.0
        for level, (log_normal, log_abnormal) in enumerate(log_likelihoods):
            exponent = torch.clamp(log_normal - self.log_likelihood_reference[level], max=_MAX_EXPONENT)
            normality = torch.exp(exponent).unsqueeze(1)
            abnormal_probability = torch.softmax(torch.stack([log_normal, log_abnormal], dim=1), dim=1)[:, 1:]
            likelihood_map = likelihood_map + (1 - self._upsample(normality, image_size))
            classifier_map = classifier_map + self._upsample(abnormal_probability, image_size)
        anomaly_map = self.blur((likelihood_map + classifier_map / len(log_likelihoods)) / 2)
        return anomaly_map, torch.amax(anomaly_map, dim=(-3, -2, -1))

    @staticmethod
    def _upsample(level_map: torch.Tensor, image_size: tuple[int, int] | torch.Size) -> torch.Tensor:
        return F.interpolate(level_map, size=tuple(image_size), mode="bilinear", align_corners=True)
