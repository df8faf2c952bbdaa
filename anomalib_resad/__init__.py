# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""ResAD: A Simple Framework for Class Generalizable Anomaly Detection (Yao et al., NeurIPS 2024), for anomalib 2.x.

ResAD learns the distribution of *residual features* - each patch feature minus its nearest feature among k normal
reference images of the same class - which vary far less across classes than raw features. Trained once on some
classes, it detects anomalies in classes it has never seen from k normal images, without retraining.

Paper: https://arxiv.org/abs/2410.20047 - reference code: https://github.com/xcyao00/ResAD

Example:
    >>> from anomalib_resad import ResAD
    >>> model = ResAD(pre_trained=False)  # doctest: +SKIP
"""

from .errors import ResADConfigurationError, ResADError, ResADInputError
from .lightning_model import ResAD
from .references import ReferenceSelection
from .torch_model import ResADModel


def _register_with_anomalib() -> None:
    """Expose ``ResAD`` as ``anomalib.models.ResAD`` (for ``get_model({"class_path": "ResAD"})`` and benchmarks).

    The plugin hook (``anomalib_resad_hook``) does this when anomalib is imported first; this covers imports of
    ``anomalib_resad`` that come first (and installs without the hook).
    """
    from importlib import import_module

    models = import_module("anomalib.models")  # not `anomalib.models`: that attribute is unset while it imports us
    if getattr(models, "ResAD", None) is not ResAD:
        models.ResAD = ResAD


_register_with_anomalib()

__all__ = ["ReferenceSelection", "ResAD", "ResADConfigurationError", "ResADError", "ResADInputError", "ResADModel"]
__version__ = "0.1.0"
