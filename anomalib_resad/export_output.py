# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""Quiet exports that say what they wrote.

``torch.onnx.export(dynamo=True)`` hands the graph to onnxscript and onnx_ir, whose optimisation passes log one INFO
line per rewritten node (thousands for ResAD's graph: "Replaced initializer ...", "Skipping constant folding ...").
They reach the console when an application sets the root logger to INFO - ``anomalib``'s command line does, and prints
each line twice (a plain handler on stderr, rich on stdout). :func:`quiet_export` raises those library loggers to
WARNING for the duration of one export, so their warnings still show, and restores them afterwards;
:func:`announce_written` prints the files an export wrote on one line, unwrapped (rich wraps log lines at the
terminal width, 80 columns when the output is not a terminal, which cut the path in anomalib's own message).

Example:
    >>> with quiet_export() as outermost:
    ...     logging.getLogger("onnxscript.optimizer").info("hidden")
    >>> outermost
    True
"""

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Loggers of the ONNX export pipeline that log per-node INFO/DEBUG progress.
EXPORT_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx")
# torch's dynamo exporter implements opset 18 and up; asking for less (anomalib's default: 14) makes it warn, try a
# down-conversion that fails for ResAD's graph (no adapter for Pad), log that failure with a traceback and keep 18.
ONNX_OPSET_VERSION = 18

_depth = 0


@contextmanager
def quiet_export(level: int = logging.WARNING) -> Iterator[bool]:
    """Raise the export libraries' loggers to ``level`` while the block runs.

    Only loggers whose effective level is below ``level`` are changed; each gets its own level back afterwards.
    Nested uses (``to_openvino`` calls ``to_onnx``) leave the settings to the outermost one.

    Args:
        level (int): Least level to let through. Defaults to ``logging.WARNING``.

    Yields:
        bool: Whether this is the outermost export (the one that should announce what it wrote).
    """
    global _depth  # noqa: PLW0603 - one process-wide nesting count, exports do not run concurrently
    outermost = _depth == 0
    saved: dict[str, int] = {}
    if outermost:
        for name in EXPORT_LOGGERS:
            library_logger = logging.getLogger(name)
            if library_logger.getEffectiveLevel() < level:
                saved[name] = library_logger.level
                library_logger.setLevel(level)
    _depth += 1
    try:
        yield outermost
    finally:
        _depth -= 1
        for name, previous in saved.items():
            logging.getLogger(name).setLevel(previous)


def written_files(path: str | Path) -> list[Path]:
    """The files an export wrote for the model file ``path``: itself and its companions with the same stem.

    OpenVINO writes ``model.xml`` and ``model.bin``; ONNX can add an external-data file ``model.onnx.data``.

    Args:
        path (str | Path): The model file the exporter returned.

    Returns:
        list[Path]: ``path`` first, then the companion files, sorted.
    """
    path = Path(path)
    companions = sorted(other for other in path.parent.glob(f"{path.stem}.*") if other != path and other.is_file())
    return [path, *companions]


def announce_written(kind: str, path: str | Path) -> None:
    """Print ``ResAD <kind> export wrote <files>`` on one line (``print``: no log handler wraps or repeats it).

    Args:
        kind (str): Export type, e.g. ``"ONNX"``.
        path (str | Path): The model file the exporter returned.
    """
    files = ", ".join(str(file.resolve()) for file in written_files(path))
    print(f"ResAD {kind} export wrote {files}", flush=True)
