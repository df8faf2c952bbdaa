# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""A checkpoint is enough on anomalib's command line: its ResAD settings, read before the model is built.

anomalib's CLI builds the model from the command line *before* it reads ``--ckpt_path``, so ``anomalib predict
--model ResAD --ckpt_path X`` would build the default backbone (wide_resnet50_2) and then refuse the checkpoint. ResAD
calls :func:`adopt_checkpoint_settings` first: every setting left at its default takes the checkpoint's value.

Example:
    >>> checkpoint_settings_from_command_line(["python", "--ckpt_path", "model.ckpt"])  # not the anomalib command
    {}
"""

import inspect
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

# Hyper-parameters that define the network's structure: a checkpoint only fits a model built with the same ones.
ARCHITECTURE_HPARAMS = (
    "backbone",
    "layers",
    "coupling_layers",
    "pos_embed_dim",
    "residual",
    "distribution_matching",
    "codebook_size",
)
# What `anomalib predict/test/export --ckpt_path X` takes from the checkpoint when left at its default on the line.
# ResAD arguments that change how a trained model scores, not what it learned (``resad evaluate`` applies them to a
# given checkpoint too)
SCORING_OPTIONS = (
    "image_score",
    "level_constants",
    "dissimilarity_check",
    "nearest_score",
    "threshold_margin",
    "dissimilarity_margin",
    "reverse_dissimilarity_margin",
    "nearest_averaging",
    "reference_views",
    "reference_view_levels",
)
CHECKPOINT_SETTINGS = (
    *ARCHITECTURE_HPARAMS,
    "image_size",
    "clamp_alpha",
    "k",
    "reference_seed",
    *SCORING_OPTIONS,
    "efdm_alpha",
)


def checkpoint_settings_from_command_line(arguments: Sequence[str] | None = None) -> dict[str, Any]:
    """The ResAD hyper-parameters of ``--ckpt_path X`` on the ``anomalib`` command line (empty elsewhere).

    anomalib's CLI builds the model from the command line *before* it reads the checkpoint, so without this
    ``anomalib predict --model ResAD --ckpt_path X`` would build the default backbone and then refuse the checkpoint.
    ResAD reads the checkpoint's hyper-parameters first and uses them for every setting left at its default.
    """
    arguments = list(sys.argv if arguments is None else arguments)
    if not arguments or Path(arguments[0]).name != "anomalib":
        return {}
    path = None
    for index, argument in enumerate(arguments):
        if argument == "--ckpt_path" and index + 1 < len(arguments):
            path = arguments[index + 1]
        elif argument.startswith("--ckpt_path="):
            path = argument.split("=", 1)[1]
    if not path or not Path(path).is_file():
        return {}
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except (RuntimeError, OSError, ValueError):
        return {}  # not a checkpoint ResAD can read: Lightning reports it with its own message
    saved = checkpoint.get("hyper_parameters", {}) if isinstance(checkpoint, dict) else {}
    return {name: saved[name] for name in CHECKPOINT_SETTINGS if name in saved}


def adopt_checkpoint_settings(arguments: dict[str, Any], constructor: Callable[..., Any]) -> dict[str, Any]:
    """Checkpoint settings (``--ckpt_path`` on the anomalib command line) for arguments left at their defaults.

    Args:
        arguments (dict[str, Any]): The constructor's arguments as given.
        constructor (Callable): The constructor (its signature gives the defaults).

    Returns:
        dict[str, Any]: Argument name -> the checkpoint's value, for those to replace.
    """
    saved = checkpoint_settings_from_command_line()
    if not saved:
        return {}
    defaults = inspect.signature(constructor).parameters

    def is_default(name: str) -> bool:
        return normalize_value(arguments[name]) == normalize_value(defaults[name].default)

    # a structure asked for explicitly that differs from the checkpoint's: build what was asked, and let the
    # checkpoint be refused with its mismatch message rather than mixing the two
    conflicting = any(
        not is_default(name) and normalize_value(arguments[name]) != normalize_value(saved[name])
        for name in ARCHITECTURE_HPARAMS
        if name in saved
    )
    adopted = {
        name: value
        for name, value in saved.items()
        if is_default(name)
        and normalize_value(value) != normalize_value(arguments[name])
        and not (conflicting and name in (*ARCHITECTURE_HPARAMS, "image_size"))
    }
    if adopted:
        settings = ", ".join(f"{name}={value!r}" for name, value in adopted.items())
        logger.warning("ResAD: using the checkpoint's settings %s", settings)
    return adopted


def normalize_value(value: object) -> object:
    """Lists and tuples of names compare equal (YAML gives lists, defaults are tuples)."""
    return [str(item) for item in value] if isinstance(value, list | tuple) else value
