# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""The entry-point hook makes ResAD visible to anomalib without importing anomalib_resad by hand."""

import os
import subprocess
import sys

import pytest

CHECK = """
import sys
from anomalib.models import get_model
assert "anomalib_resad" in sys.modules, "importing anomalib.models should have loaded the plugin"
import anomalib.models
assert anomalib.models.ResAD.__module__ == "anomalib_resad.lightning_model"
kwargs = dict(backbone="resnet18", layers=["layer1"], pre_trained=False, coupling_layers=2, pos_embed_dim=8)
print(type(get_model("ResAD", **kwargs)).__name__, type(get_model("resad", **kwargs)).__name__,
      type(get_model({"class_path": "ResAD", "init_args": kwargs})).__name__)
"""


def run_python(code: str, **environment: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **environment}
    command = [sys.executable, "-c", code]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)


def test_anomalib_get_model_finds_resad_in_a_fresh_interpreter() -> None:
    result = run_python(CHECK)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["ResAD", "ResAD", "ResAD"]
    assert "Could not load the anomalib model plugin" not in result.stderr


def test_importing_anomalib_resad_first_registers_it_too() -> None:
    result = run_python("import anomalib_resad, anomalib.models; print(anomalib.models.ResAD.__name__)")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ResAD"
    assert "circular import" not in result.stderr


def test_hook_can_be_switched_off() -> None:
    result = run_python("import sys, anomalib.models; print('anomalib_resad' in sys.modules)", ANOMALIB_PLUGINS="0")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "False"


def test_python_without_anomalib_does_not_import_the_plugin() -> None:
    result = run_python("import sys; print(bool({'anomalib', 'anomalib_resad', 'torch'} & set(sys.modules)))")
    if "anomalib_resad_hook" not in run_python("import sys; print(list(sys.modules))").stdout:
        pytest.skip("the .pth hook is not installed in this environment (pip install the project)")
    assert result.stdout.strip() == "False"


def test_finder_leaves_sys_meta_path_once_it_has_fired() -> None:
    code = (
        "import sys\n"
        "names = lambda: [type(f).__name__ for f in sys.meta_path]\n"
        "before = 'AnomalibModelsFinder' in names()\n"
        "import anomalib.models\n"
        "print(before, 'AnomalibModelsFinder' in names())\n"
    )
    if "anomalib_resad_hook" not in run_python("import sys; print(list(sys.modules))").stdout:
        pytest.skip("the .pth hook is not installed in this environment (pip install the project)")
    result = run_python(code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["True", "False"]


def test_the_hook_leaves_error_reports_to_anomalib() -> None:
    """A ResAD error on the anomalib command line is an ordinary exception: anomalib's report ends with its message."""
    code = (
        "import sys; sys.argv[0] = '/usr/bin/anomalib'\n"
        "import anomalib.cli.cli\n"
        "from anomalib_resad import ResADInputError\n"
        "print(sys.excepthook.__module__)\n"
        "raise ResADInputError('Reference folder x holds no images.')\n"
    )
    result = run_python(code, COLUMNS="200")
    assert result.returncode == 1
    assert "anomalib_resad" not in result.stdout  # no excepthook of ours
    assert result.stderr.strip().splitlines()[-1] == "ResADInputError: Reference folder x holds no images."
