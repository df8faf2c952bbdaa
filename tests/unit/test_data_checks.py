# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""Missing ``Folder`` paths are named in one line before anomalib's datamodule reads them."""

import re
from pathlib import Path

import pytest
from anomalib.data import Folder

from anomalib_resad import ResADInputError
from anomalib_resad.data.checks import check_folder_paths


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    for folder in ("good", "bad", "masks"):
        (tmp_path / folder).mkdir()
    return tmp_path


def test_existing_folders_pass(dataset: Path) -> None:
    check_folder_paths(Folder(name="part", root=dataset, normal_dir="good", abnormal_dir="bad", mask_dir="masks"))
    check_folder_paths(Folder(name="part", normal_dir=dataset / "good"))  # absolute folders, no root


def test_missing_root_is_named_with_the_argument_to_set(tmp_path: Path) -> None:
    root = tmp_path / "no_such_dataset"
    with pytest.raises(ResADInputError, match=re.escape(f"Folder root '{root}' does not exist. Set --data.root")):
        check_folder_paths(Folder(name="part", root=root, normal_dir="good"))


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"normal_dir": "normal"}, "Folder normal_dir 'normal' does not exist: {root}/normal. Set --data.normal_dir"),
        ({"normal_dir": "good", "abnormal_dir": ["bad", "scratch"]}, "abnormal_dir 'scratch' does not exist"),
        ({"normal_dir": "good", "mask_dir": "mask"}, "mask_dir 'mask' does not exist: {root}/mask"),
        ({"normal_dir": "good", "normal_test_dir": "good_test"}, "normal_test_dir 'good_test' does not exist"),
    ],
)
def test_missing_folder_inside_root_is_named_with_its_full_path(
    dataset: Path, arguments: dict[str, object], message: str
) -> None:
    with pytest.raises(ResADInputError, match=re.escape(message.format(root=dataset))):
        check_folder_paths(Folder(name="part", root=dataset, **arguments))


def test_other_datamodules_are_left_alone(tmp_path: Path) -> None:
    """MVTecAD & co. download a missing dataset in their own ``prepare_data``: not ours to refuse."""
    from anomalib.data import MVTecAD

    check_folder_paths(MVTecAD(root=tmp_path / "not_downloaded_yet"))
    check_folder_paths(None)
