# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""Checks of a datamodule's folders before anomalib reads them, with one-line errors that name the path.

anomalib's ``Folder`` datamodule resolves its folders only when Lightning sets it up, and a folder that does not exist
then surfaces as a ``FileNotFoundError`` under some forty frames of Lightning and anomalib internals.
:func:`check_folder_paths` runs earlier (from :meth:`ResAD.prepare_data <anomalib_resad.ResAD.prepare_data>`, the only
model hook Lightning calls before the datamodule's ``setup``) and says which path is missing and what to set.

Example:
    >>> from anomalib.data import Folder
    >>> check_folder_paths(Folder(name="bottle", root="/no/such/dataset", normal_dir="good"))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    anomalib_resad.errors.ResADInputError: Folder root '/no/such/dataset' does not exist. Set --data.root ...
"""

from collections.abc import Sequence
from pathlib import Path

from anomalib_resad.errors import ResADInputError

# Folder arguments that name image (or mask) folders, resolved inside ``root`` unless absolute.
FOLDER_DIRECTORIES = ("normal_dir", "abnormal_dir", "normal_test_dir", "mask_dir")


def _directories(value: str | Path | Sequence[str | Path] | None) -> list[str | Path]:
    if value is None:
        return []
    return list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value]


def check_folder_paths(datamodule: object) -> None:
    """Raise a :class:`ResADInputError` naming the first folder of an anomalib ``Folder`` datamodule that is missing.

    Other datamodules are left alone (anomalib's MVTecAD, VisA ... download a missing dataset in ``prepare_data``).
    Paths are resolved as anomalib resolves them: a relative folder lies inside ``root``.

    Args:
        datamodule (object): The trainer's datamodule (anything; only ``anomalib.data.Folder`` is checked).

    Raises:
        ResADInputError: ``root`` or one of ``normal_dir``, ``abnormal_dir``, ``normal_test_dir``, ``mask_dir`` is
            not an existing folder.
    """
    from anomalib.data import Folder

    if not isinstance(datamodule, Folder):
        return
    root = Path(datamodule.root) if datamodule.root is not None else None
    if root is not None and not root.is_dir():
        msg = (
            f"Folder root '{root}' does not exist. Set --data.root (Folder(root=...)) to the dataset folder that "
            f"holds the normal images folder '{datamodule.normal_dir}'."
        )
        raise ResADInputError(msg)
    for argument in FOLDER_DIRECTORIES:
        for directory in _directories(getattr(datamodule, argument, None)):
            path = Path(directory)
            path = path if path.is_absolute() or root is None else root / path
            if not path.is_dir():
                inside = f" inside --data.root '{root}'" if root is not None else " (or set --data.root)"
                msg = (
                    f"Folder {argument} '{directory}' does not exist: {path}. Set --data.{argument} to an existing "
                    f"folder of images{inside}."
                )
                raise ResADInputError(msg)
