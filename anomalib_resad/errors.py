# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""Errors ResAD raises for bad input, and a short report of them on the ``resad`` command line.

Every error raised for something the user can fix (a wrong ``k``, missing references, a corrupt image ...) is a
:class:`ResADError` whose message says what is wrong and how to fix it: on ``anomalib``'s command line it is the last
line of anomalib's report. The ``resad`` command prints it as one line instead (:func:`install_cli_excepthook`);
set ``RESAD_TRACEBACK=1`` to get the traceback too.

Example:
    >>> try:
    ...     raise ResADInputError("Reference folder 'x' holds no images. Put k normal images of the class in it.")
    ... except ValueError as error:
    ...     print(error)
    Reference folder 'x' holds no images. Put k normal images of the class in it.
"""

import os
import sys
from pathlib import Path
from types import TracebackType


class ResADError(Exception):
    """Base class of the errors ResAD raises for problems the user can fix."""


class ResADConfigurationError(ResADError, ValueError):
    """Invalid model configuration: unknown backbone or level, mismatched checkpoint, bad hyper-parameter."""


class ResADInputError(ResADError, ValueError):
    """Invalid input data: missing or too few reference images, wrong image size, unreadable image files."""


def check_choice(name: str, value: object, choices: tuple[object, ...]) -> None:
    """Raise a :class:`ResADConfigurationError` naming the valid values when ``value`` is not one of ``choices``.

    Example:
        >>> check_choice("residual", "absolute", ("squared",))
        Traceback (most recent call last):
        ...
        anomalib_resad.errors.ResADConfigurationError: Unknown residual 'absolute': use one of ('squared',).
    """
    if value not in choices:
        msg = f"Unknown {name} '{value}': use one of {choices}."
        raise ResADConfigurationError(msg)


def _find_resad_error(error: BaseException | None) -> ResADError | None:
    """The ResADError behind an uncaught exception: the exception itself or one it was raised from."""
    seen: set[int] = set()
    pending = [error]
    while pending:
        current = pending.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, ResADError):
            return current
        pending.extend([current.__cause__, current.__context__])
    return None


def install_cli_excepthook(only_for: tuple[str, ...] = ("resad",)) -> None:
    """Print uncaught :class:`ResADError` s as ``error: <message>`` without a traceback, on the command line.

    Does nothing unless the running program is one of ``only_for`` (so notebooks and scripts keep their tracebacks).
    Other exceptions keep the previous report. Idempotent.

    Args:
        only_for (tuple[str, ...]): Program names (``sys.argv[0]``) to act for.
    """
    program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    if program not in only_for or getattr(sys.excepthook, "_resad", False) or os.environ.get("RESAD_TRACEBACK") == "1":
        return
    previous = sys.excepthook

    def hook(kind: type[BaseException], error: BaseException, traceback: TracebackType | None) -> None:
        resad_error = _find_resad_error(error)
        if resad_error is None:
            previous(kind, error, traceback)
            return
        sys.stderr.write(f"\nerror: {resad_error}\n(set RESAD_TRACEBACK=1 to see the full traceback)\n")

    hook._resad = True  # type: ignore[attr-defined]
    sys.excepthook = hook
