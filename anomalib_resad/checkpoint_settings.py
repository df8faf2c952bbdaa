# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""What a trained checkpoint fixes, and what may still be chosen when it is scored.

anomalib's CLI builds the model from the command line *before* Lightning restores ``--ckpt_path``, so
``anomalib predict --model ResAD --ckpt_path X`` builds the default network first. :meth:`ResAD.on_load_checkpoint`
then rebuilds the network the checkpoint holds (:data:`TRAINED_SETTINGS`, read from the checkpoint's saved
hyper-parameters - Lightning loads it with ``weights_only=True``, so no code in it runs), and the state dict fills
it. Nothing is read before that: constructing a ``ResAD`` never looks at the command line or a file.

Example:
    >>> normalize_value(("layer1", "layer2")) == normalize_value(["layer1", "layer2"])
    True
"""

# Hyper-parameters that define the network's structure: a checkpoint only fits a network built with the same ones.
ARCHITECTURE_HPARAMS = ("backbone", "layers", "coupling_layers", "pos_embed_dim", "residual")
# What a checkpoint brings with it when restored into a model built otherwise: its network and the input size its
# flows and references saw.
TRAINED_SETTINGS = (*ARCHITECTURE_HPARAMS, "image_size")
# ResAD arguments that change how a trained model scores, not what it learned: they stay as the model was built
# (command line or defaults), and ``resad evaluate`` applies them to a given checkpoint too.
SCORING_OPTIONS = ("scoring", "sensitivity")


def normalize_value(value: object) -> object:
    """Lists and tuples of names compare equal (YAML gives lists, defaults are tuples)."""
    return [str(item) for item in value] if isinstance(value, list | tuple) else value
