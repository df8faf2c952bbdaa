# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""Baseline weights are looked up on disk only; WinCLIP gets exactly the selected images and the category name."""

import importlib.util
from pathlib import Path

import pytest
import torch
from anomalib.models.image.winclip import lightning_model as winclip_lightning

from anomalib_resad.experiments import baselines
from anomalib_resad.experiments.baselines import MissingWeights, build_baselines, find_weights
from anomalib_resad.references import ReferenceSelection, load_images


@pytest.fixture
def empty_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def test_missing_anomaly_dino_weights_name_the_cache_and_the_fetch_command(empty_caches: Path) -> None:
    missing = find_weights("anomaly_dino")
    assert isinstance(missing, MissingWeights)
    assert str(empty_caches / "hub") in missing.missing
    assert missing.fetch == "hf download timm/vit_small_patch14_dinov2.lvd142m"
    line = missing.message()
    assert "\n" not in line and "skipped: no weights" in line and missing.fetch in line


def test_weights_in_the_hugging_face_cache_are_found(empty_caches: Path) -> None:
    snapshot = empty_caches / "hub" / "models--timm--vit_small_patch14_dinov2.lvd142m" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").write_bytes(b"weights")
    refs = snapshot.parents[1] / "refs"
    refs.mkdir()
    (refs / "main").write_text("abc")
    assert find_weights("anomaly_dino") == snapshot / "model.safetensors"


def test_a_given_weights_file_is_used_and_a_wrong_path_is_reported(empty_caches: Path) -> None:
    weights = empty_caches / "dino.pth"
    weights.write_bytes(b"weights")
    assert find_weights("anomaly_dino", weights) == weights
    missing = find_weights("anomaly_dino", empty_caches / "absent.pth")
    assert isinstance(missing, MissingWeights) and "absent.pth" in missing.missing


def test_winclip_without_open_clip_is_skipped_with_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "open_clip" else find_spec(name))
    built, skipped = build_baselines(["winclip"], patchcore=lambda: pytest.fail("not requested"))
    assert built == {}
    assert "open-clip-torch" in skipped["WinCLIP"].missing
    assert "pip install 'anomalib-resad[baselines]'" in skipped["WinCLIP"].fetch


def test_winclip_without_weights_names_both_caches(empty_caches: Path) -> None:
    pytest.importorskip("open_clip")
    missing = find_weights("winclip")
    assert isinstance(missing, MissingWeights)
    assert "timm/vit_base_patch16_plus_clip_240.laion400m_e31" in missing.missing
    assert str(empty_caches / ".cache" / "clip" / "vit_b_16_plus_240-laion400m_e31-8fb26589.pt") in missing.missing
    assert "pretrained='laion400m_e31'" in missing.fetch


class RecordingWinClipModel(torch.nn.Module):
    """Stands in for anomalib's WinClipModel (no CLIP weights here): records what ``setup`` receives."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__()
        self.calls: list[tuple[str, torch.Tensor]] = []

    def setup(self, class_name: str, reference_images: torch.Tensor) -> None:
        self.calls.append((class_name, reference_images))


def test_winclip_gets_exactly_the_selected_images_and_the_category(
    texture_root: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(winclip_lightning, "WinClipModel", RecordingWinClipModel)
    weights = tmp_path / "clip.pt"
    baseline = baselines.FewShotWinClip(weights)
    pool = sorted((texture_root / "brick" / "train" / "good").glob("*.png"))
    for paths in ([pool[3], pool[0], pool[5]], [pool[1], pool[2]]):
        selection = ReferenceSelection("brick", [str(path) for path in paths], seed=1)
        baseline.set_references(selection)
        class_name, images = baseline.model.model.calls[-1]
        assert class_name == "brick" and baseline.model.k_shot == len(paths)
        expected = load_images(selection.paths, baseline.model.pre_processor.transform)
        assert images.shape == (len(paths), 3, 240, 240)  # WinCLIP's fixed input
        # the same images (the folder's order may differ from the selection's)
        assert sorted(images.sum(dim=(1, 2, 3)).tolist()) == pytest.approx(sorted(expected.sum(dim=(1, 2, 3)).tolist()))
        assert sorted(path.name for path in baseline.model.few_shot_source.iterdir()) == [
            f"{index:03d}_{path.name}" for index, path in enumerate(paths)
        ]


def test_patchcore_with_views_holds_the_views_and_scores_a_flipped_reference_as_normal(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for index in range(2):
        path = tmp_path / f"ref{index}.png"
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    selection = ReferenceSelection("widget", paths)

    def patchcore(with_views: bool = False) -> baselines.FewShotPatchcore:
        torch.manual_seed(0)  # the same random backbone for both
        views = "dihedral" if with_views else "none"
        return baselines.FewShotPatchcore("resnet18", ["layer1", "layer2"], False, 64, reference_views=views)

    built, _ = build_baselines(["patchcore", "patchcore_views"], patchcore)
    plain, with_views = built["PatchCore"], built["PatchCore+views"]
    for baseline in (plain, with_views):
        baseline.set_references(selection)
    plain_bank, views_bank = plain.model.model.memory_bank, with_views.model.model.memory_bank
    assert views_bank.shape == (8 * plain_bank.shape[0], plain_bank.shape[1])
    per_image = plain_bank.shape[0] // 2  # image i's own view leads its 8 views
    torch.testing.assert_close(views_bank[8 * per_image : 9 * per_image], plain_bank[per_image:])

    flipped = load_images(paths[:1], plain.model.pre_processor.transform).flip(-1)  # a mirror image of a reference
    scores = {name: float(baseline.model.model(flipped).pred_score) for name, baseline in built.items()}
    # the mirror image's patches are in the bank with views (float noise of batch 1 vs 16 only), not without
    assert scores["PatchCore+views"] < 0.02 * scores["PatchCore"]


def test_the_protocol_gives_patchcore_the_views_resads_banks_hold() -> None:
    from anomalib_resad.experiments.protocol import patchcore_baseline
    from tests.helpers.models import tiny_resad

    square = tiny_resad()  # a square input: dihedral views on the deepest levels
    assert patchcore_baseline(square, False, with_views=True).reference_views == "dihedral"
    assert patchcore_baseline(square, False).reference_views == "none"
    assert patchcore_baseline(square, False).model.model.layers == ["layer1", "layer2"]  # ResAD's two deepest
    assert patchcore_baseline(tiny_resad(image_size=(64, 96)), False, with_views=True).reference_views == "flips"
