# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""Quiet exports: the ONNX libraries' per-node logging is held back, the files written are named on one line."""

import logging
from pathlib import Path

import pytest
import torch

from anomalib_resad.export_output import EXPORT_LOGGERS, announce_written, quiet_export, written_files
from anomalib_resad.feature_converter import FeatureConverter, ReferenceBank


def test_quiet_export_holds_back_info_keeps_warnings_and_restores_levels(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)  # what anomalib's command line does to the root logger
    onnx_ir_level = logging.getLogger("onnx_ir").level
    with quiet_export() as outermost:
        logging.getLogger("onnxscript.optimizer._constant_folding").info("Skipping constant folding for node")
        logging.getLogger("onnx_ir.passes.common").info("Replaced initializer")
        logging.getLogger("onnxscript.version_converter").warning("conversion failed")
    assert outermost
    assert [record.getMessage() for record in caplog.records] == ["conversion failed"]
    assert logging.getLogger("onnx_ir").level == onnx_ir_level
    logging.getLogger("onnx_ir.passes.common").info("after the export")
    assert caplog.records[-1].getMessage() == "after the export"


def test_nested_export_leaves_announcing_to_the_outermost() -> None:
    """``to_openvino`` exports to ONNX in a temporary folder first: only the OpenVINO files are announced."""
    with quiet_export() as outer, quiet_export() as inner:
        assert logging.getLogger(EXPORT_LOGGERS[0]).getEffectiveLevel() >= logging.WARNING
    assert outer
    assert not inner


def test_written_files_include_external_data_and_weights(tmp_path: Path) -> None:
    for name in ("model.onnx", "model.onnx.data", "reference_encoder.onnx", "model.xml", "model.bin"):
        (tmp_path / name).write_text("x")
    assert written_files(tmp_path / "model.onnx") == [
        tmp_path / "model.onnx",
        tmp_path / "model.bin",
        tmp_path / "model.onnx.data",
        tmp_path / "model.xml",
    ]
    (tmp_path / "onnx").mkdir()
    (tmp_path / "onnx" / "model.onnx").write_text("x")
    (tmp_path / "onnx" / "model.onnx.data").write_text("x")
    assert written_files(tmp_path / "onnx" / "model.onnx") == [
        tmp_path / "onnx" / "model.onnx",
        tmp_path / "onnx" / "model.onnx.data",
    ]


def test_announce_written_is_one_unwrapped_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / ("a_rather_long_folder_name_that_a_console_of_eighty_columns_would_wrap" * 2)
    folder.mkdir()
    (folder / "model.xml").write_text("x")
    (folder / "model.bin").write_text("x")
    announce_written("OpenVINO", folder / "model.xml")
    assert capsys.readouterr().out == f"ResAD OpenVINO export wrote {folder / 'model.xml'}, {folder / 'model.bin'}\n"


def test_stored_bank_traces_without_data_dependent_shapes() -> None:
    """``torch.export`` (non-strict) traces the stored bank: reading its grid into ints failed there and made the
    exporter print the partial graph (~500 lines, twice) before retrying in strict mode."""
    converter = FeatureConverter(num_levels=2).eval()
    features = [torch.randn(2, 4, 3, 3), torch.randn(2, 6, 2, 2)]
    converter.set_bank(ReferenceBank.from_features(features))
    torch.export.export(converter, (features,), strict=False)  # raised GuardOnDataDependentSymNode
