# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""The quickstart notebook runs top to bottom, offline, and its results say what the notebook claims."""

import os
import re
import shutil
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow
NOTEBOOK = REPO_ROOT / "notebooks" / "quickstart.ipynb"


def cell_text(cell: dict) -> str:
    """Everything a code cell printed or displayed as text."""
    parts = [output.get("text", "") or output.get("data", {}).get("text/plain", "") for output in cell["outputs"]]
    return "".join(parts)


def test_quickstart_notebook_executes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nbformat = pytest.importorskip("nbformat", reason="pip install -e '.[test]' (nbformat, nbclient, ipykernel)")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    shutil.copy(NOTEBOOK, tmp_path / NOTEBOOK.name)
    monkeypatch.setenv("RESAD_CACHE", str(tmp_path / "cache"))  # the kernel inherits it: nothing outside tmp_path
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    notebook = nbformat.read(tmp_path / NOTEBOOK.name, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=1200, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute(env=dict(os.environ))  # raises CellExecutionError, with the cell and its traceback, on any error

    outputs = [cell_text(cell) for cell in notebook.cells if cell.cell_type == "code"]
    table = next(text for text in outputs if "image_AUROC" in text)
    resad_rows = [line for line in table.splitlines() if "ResAD" in line]
    assert len(resad_rows) == 2, table  # one row per unseen class
    image_aurocs = [float(re.split(r"\s+", line.strip())[3]) for line in resad_rows]
    assert min(image_aurocs) > 0.7, table  # clearly above chance on classes never seen in training
    verdicts = re.findall(r"(\w+)/\S+: score \S+\s+anomalous (True|False)", "".join(outputs))
    normal = [flag == "True" for folder, flag in verdicts if folder == "good"]
    defective = [flag == "True" for folder, flag in verdicts if folder != "good"]
    assert normal and not any(normal), verdicts  # the deployed model passes the new class's good images ...
    assert defective and sum(defective) >= 0.5 * len(defective), verdicts  # ... and flags most of its defects
    assert (tmp_path / "results" / "quickstart" / "deploy" / "retina.npz").is_file()
