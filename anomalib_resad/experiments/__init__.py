# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""How ResAD is measured, apart from the product: the class-generalization protocol and what it compares against.

* :mod:`.protocol` - ``resad evaluate``: train on source classes, score unseen classes (or the sources' validation
  images) for several k and reference draws, beside the baselines, with the cost of each model;
* :mod:`.baselines` - anomalib's PatchCore, WinCLIP and AnomalyDINO given exactly ResAD's k references;
* :mod:`.grid` - resumable result files and progress lines of a long run;
* :mod:`.cost` - latency, throughput, memory and multiply-adds per image, eager and OpenVINO;
* :mod:`.cpu_info` - the CPU and runtime versions printed beside every timing.

Nothing in the model, its training or its deployment imports from here.

Example:
    >>> from anomalib_resad.experiments.protocol import run_protocol  # doctest: +SKIP
"""
