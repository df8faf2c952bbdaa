# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""Odd frames against real circuit-board references (../shared/data DeepPCB), every board group.

A board image is mostly uniform background, so a black or white frame matches it *better* than the board's references
match each other: the forward dissimilarity alone passed such frames (ratios 0.05-1.3, docs/history.md). The
reverse dissimilarity - what of the references the frame lacks - flags them. The flows play no part in the check, so
an untrained ResAD on the offline ImageNet backbone at the settings' 224 px is the real case here. The exported
graphs score odd frames as eager PyTorch does, with references made in OpenVINO equal to eager ones:
tests/e2e/test_export.py (not repeated here on the boards).
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomalib_resad import ResAD
from anomalib_resad.calibration import DISSIMILARITY_MARGIN, REVERSE_DISSIMILARITY_MARGIN, odd_frame_statistics
from anomalib_resad.offline_weights import LITE0_BACKBONE, LITE0_LAYERS
from anomalib_resad.references import select_folder_references

pytestmark = pytest.mark.slow
SIZE = 224
K = 4


def odd_frames(size: int = SIZE) -> dict[str, torch.Tensor]:
    """Dead camera, blown exposure, lens cap off in grey light, a colour cast, noise: ``(3, H, W)`` in ``[0, 1]``."""
    generator = torch.Generator().manual_seed(0)
    red = torch.zeros(3, size, size)
    red[0] = 1.0
    return {
        "black": torch.zeros(3, size, size),
        "white": torch.ones(3, size, size),
        "grey": torch.full((3, size, size), 0.5),
        "saturated red": red,
        "noise": (0.5 + 0.25 * torch.randn(3, size, size, generator=generator)).clamp(0, 1),
    }


@pytest.fixture(scope="module")
def board_groups(shared_data: Path) -> list[Path]:
    return sorted(path for path in (shared_data / "deeppcb").iterdir() if (path / "train" / "good").is_dir())


@pytest.fixture(scope="module")
def untrained(lite0_weights: Path) -> ResAD:
    model = ResAD(backbone=LITE0_BACKBONE, layers=list(LITE0_LAYERS), pre_trained=str(lite0_weights), image_size=SIZE,
                  coupling_layers=2, pos_embed_dim=16, visualizer=False)  # fmt: skip
    return model.eval()


def nearly_uniform_references(folder: Path, k: int) -> dict[str, bool]:
    """Whether one of the first k images of a folder is itself >= 95 % white / black (a near-empty board tile)."""
    shares = {"white": 0.0, "black": 0.0}
    for path in sorted(folder.glob("*.png"))[:k]:
        grey = np.asarray(Image.open(path).convert("L"))
        shares["white"] = max(shares["white"], float((grey >= 250).mean()))
        shares["black"] = max(shares["black"], float((grey <= 5).mean()))
    return {kind: share >= 0.95 for kind, share in shares.items()}


@pytest.fixture(scope="module")
def verdicts_per_group(untrained: ResAD, board_groups: list[Path]) -> dict[str, dict]:
    """For each group, its class set once from its first k training images (about 10 s a group on one core, the
    leave-one-out calibration with the references' synthetic defects): the odd frames' verdicts and the check's
    two statistics on the group's normal test images, over their thresholds."""
    frames = torch.stack(list(odd_frames().values()))
    results = {}
    for group in board_groups:
        folder = group / "train" / "good"
        untrained.set_references(select_folder_references(folder, K, group.name))
        model = untrained.model
        scoring = model.anomaly_map_generator.stored.get()
        paths = sorted((group / "test" / "good").glob("*.png"))
        images = torch.stack([torch.from_numpy(np.asarray(read(path), dtype=np.float32) / 255).permute(2, 0, 1)
                              for path in paths])  # fmt: skip
        with torch.no_grad():
            labels = untrained(frames).pred_label.tolist()
            features = model.feature_extractor(untrained.pre_processor.transform(images))
            # the check reads the matching alone: no flows' or averaged map is computed for it
            _, similarities, coverage = model.level_outputs(features, model.feature_converter.reference_levels, False)
        dissimilarity, reverse_dissimilarity = odd_frame_statistics(similarities, coverage)
        forward = dissimilarity / (DISSIMILARITY_MARGIN * scoring.dissimilarity_max)
        reverse = reverse_dissimilarity / (REVERSE_DISSIMILARITY_MARGIN * scoring.reverse_dissimilarity_max)
        results[group.name] = {
            "frames": dict(zip(odd_frames(), labels, strict=True)),
            "uniform": nearly_uniform_references(folder, K),
            "normal_check": torch.maximum(forward, reverse),
        }
    return results


def test_blank_and_noise_frames_are_flagged_against_every_board_group(verdicts_per_group: dict[str, dict]) -> None:
    """Every odd frame against every group's first k training images - except a white (black) frame where one of
    those references is itself a near-empty, >= 95 % white (black) tile: there the class's own normal range reaches
    a blank frame (pcb_20085's 002.png is 98 % white), and the check rightly follows its references."""
    passed, expected = {}, {}
    for group, result in verdicts_per_group.items():
        for kind, label in result["frames"].items():
            passed[f"{kind} vs {group}"] = label
            expected[f"{kind} vs {group}"] = not result["uniform"].get(kind, False)
    assert len(passed) == 5 * len(verdicts_per_group) >= 5 * 11
    missed = [name for name, label in passed.items() if expected[name] and not label]
    assert not missed, missed
    assert sum(expected.values()) >= len(expected) - 2  # the exception is rare: one pair on the team's data


def test_the_check_rarely_fires_on_normal_board_images(verdicts_per_group: dict[str, dict]) -> None:
    """The two statistics of the check, on every normal test image of every group, against its class's threshold.

    Bound: the verdict issue's false-positive budget, 10 % of normal images, for the check alone. Measured at the
    commit that added the reverse statistic (k = 4, first 4 training images, 238 images): 13 (5.5 %); the forward
    statistic alone 12, the reverse alone 10. Over ablation's reference draws see docs/history.md.
    """
    checks = torch.cat([result["normal_check"] for result in verdicts_per_group.values()])
    fired = int((checks > 1).sum())
    assert len(checks) >= 200
    assert fired / len(checks) <= 0.10, f"the odd-frame check fired on {fired} of {len(checks)} normal board images"


def read(path: Path) -> Image.Image:
    return Image.open(path).convert("RGB").resize((SIZE, SIZE), Image.BILINEAR)
