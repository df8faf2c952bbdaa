# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""The ``resad`` command: what anomalib's own CLI has no verb for.

Training, testing and exporting go through anomalib (``anomalib train --model ResAD ...``). ``resad`` adds:

* ``resad demo``: the offline end-to-end demo (:mod:`anomalib_resad.demo`);
* ``resad evaluate``: the class-generalization protocol (:mod:`~anomalib_resad.experiments.protocol`): train on
  source classes, evaluate unseen classes for several k and reference draws, write CSV / markdown tables and maps;
* ``resad export``: an OpenVINO/ONNX model that takes a class's references as inputs (new classes without re-export),
  or a standard anomalib export with another class's references baked in (:mod:`anomalib_resad.deploy`);
* ``resad references``: a references file from a folder of k normal images of a class;
* ``resad serve``: an HTTP inspection server for such a deployment (LitServe; :mod:`anomalib_resad.serve`).

Every sub-command takes ``--config file.yaml`` and ``--print_config``, as anomalib's do (jsonargparse).

Example:
    $ resad demo --epochs 4 --k 4
    $ resad evaluate --config configs/settings/mvtec_to_visa.yaml --source_root ./datasets/MVTecAD
"""

import logging
import os

from jsonargparse import CLI

from .demo import run_demo
from .deploy import export_model, make_references
from .errors import install_cli_excepthook
from .experiments.protocol import run_protocol
from .serve import serve


def main() -> None:
    """The ``resad`` command (the console script enters through :func:`anomalib_resad_hook.resad_main`)."""
    install_cli_excepthook()
    logging.basicConfig(level=os.environ.get("RESAD_LOG_LEVEL", "WARNING"))
    if "RESAD_LOG_LEVEL" not in os.environ:  # long runs (`resad evaluate`): a line per epoch and per finished cell
        logging.getLogger("anomalib_resad.experiments").setLevel(logging.INFO)
    commands = {
        "demo": run_demo,
        "evaluate": run_protocol,
        "export": export_model,
        "references": make_references,
        "serve": serve,
    }
    CLI(commands, as_positional=False)


if __name__ == "__main__":
    main()
