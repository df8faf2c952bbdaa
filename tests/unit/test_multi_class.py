# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""MultiClassDataModule over generated replicas of each benchmark layout."""

from pathlib import Path

import pytest
import torch

from anomalib_resad import ResADConfigurationError
from anomalib_resad.data.multi_class import CATEGORY_COLUMN, MultiClassDataModule, known_categories
from tests.helpers.replicas import LAYOUTS, make_replica


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sources_train_and_targets_test(layout: str, tmp_path: Path) -> None:
    root = make_replica(layout, tmp_path / layout, ["alpha", "beta", "gamma"], train=4, good=2, bad=3)
    datamodule = MultiClassDataModule(
        sources=[{"datamodule": layout, "root": str(root), "categories": ["alpha", "beta"]}],
        targets=[{"datamodule": layout, "root": str(root), "categories": ["gamma"]}],
        val_split_ratio=0.3,
        num_workers=0,
    )
    datamodule.setup()
    train, val, test = datamodule.train_data.samples, datamodule.val_data.samples, datamodule.test_data.samples
    assert set(train[CATEGORY_COLUMN]) == {"alpha", "beta"} == set(val[CATEGORY_COLUMN])
    assert set(test[CATEGORY_COLUMN]) == {"gamma"}
    for category in ("alpha", "beta"):  # 4 normal + (2 good + 3 bad) test images, one of each label held out
        in_train = train[train[CATEGORY_COLUMN] == category]
        in_val = val[val[CATEGORY_COLUMN] == category]
        assert len(in_train) + len(in_val) == 9
        assert sorted(in_val.label_index) == [0, 1]
        assert (in_train.label_index == 1).sum() == 2
        assert not set(in_train.image_path) & set(in_val.image_path)
    assert len(test) == 5
    assert (test.label_index == 1).sum() == 3
    assert len(datamodule.reference_pool("gamma")) == 4
    assert all("/train/" in path for path in datamodule.reference_pool("gamma"))
    anomalous = datamodule.train_data[int((train.label_index == 1).to_numpy().argmax())]
    assert anomalous.gt_mask is not None and int(anomalous.gt_mask.sum()) > 0
    assert anomalous.image.shape[0] == 3


def test_overlapping_target_is_refused_unless_allowed(tmp_path: Path) -> None:
    root = str(make_replica("MVTecAD", tmp_path, ["alpha", "beta"]))
    arguments = {
        "sources": [{"datamodule": "MVTecAD", "root": root, "categories": ["alpha", "beta"]}],
        "targets": [{"datamodule": "MVTecAD", "root": root, "categories": ["beta"], "domain": "widgets"}],
    }
    with pytest.raises(ResADConfigurationError, match=r"Target categories \['beta'\] are also source"):
        MultiClassDataModule(**arguments)
    datamodule = MultiClassDataModule(**arguments, allow_overlap=True)
    datamodule.setup()
    # results are reported for targets: an overlapping category takes its target entry's domain
    assert datamodule.domain_of("beta") == "widgets"
    assert datamodule.domain_of("alpha") == "alpha"


def test_duplicate_and_unknown_entries_are_refused(tmp_path: Path) -> None:
    root = str(make_replica("MVTecAD", tmp_path, ["alpha"]))
    with pytest.raises(ResADConfigurationError, match="Duplicate source categories"):
        MultiClassDataModule(sources=[{"datamodule": "MVTecAD", "root": root, "categories": ["alpha", "alpha"]}])
    with pytest.raises(ResADConfigurationError, match="not an anomalib datamodule"):
        MultiClassDataModule(sources=[{"datamodule": "NotADataset", "categories": ["alpha"]}])
    with pytest.raises(ResADConfigurationError, match="needs a 'datamodule' key"):
        MultiClassDataModule(sources=[{"root": root}])


def test_missing_category_folder_is_named(tmp_path: Path) -> None:
    datamodule = MultiClassDataModule(
        sources=[{"datamodule": "MPDD", "root": str(tmp_path / "nowhere"), "categories": ["alpha"]}],
    )
    with pytest.raises(ValueError, match="Cannot read category 'alpha' of MPDD"):
        datamodule.setup()


def test_folder_sources_with_category_template(tmp_path: Path) -> None:
    root = make_replica("MVTecAD", tmp_path, ["alpha", "beta"])
    datamodule = MultiClassDataModule(
        sources=[
            {
                "datamodule": "Folder",
                "root": str(root / "{category}"),
                "categories": ["alpha", "beta"],
                "normal_dir": "train/good",
                "abnormal_dir": "test/scratch",
                "normal_test_dir": "test/good",
                "mask_dir": "ground_truth/scratch",
            }
        ],
        num_workers=0,
    )
    datamodule.setup()
    assert set(datamodule.train_data.samples[CATEGORY_COLUMN]) == {"alpha", "beta"}


def test_validation_split_is_seeded(tmp_path: Path) -> None:
    root = str(make_replica("MVTecAD", tmp_path, ["alpha"], good=6, bad=6))

    def held_out(seed: int) -> list[str]:
        datamodule = MultiClassDataModule(
            sources=[{"datamodule": "MVTecAD", "root": root, "categories": ["alpha"]}], val_split_ratio=0.34, seed=seed
        )
        datamodule.setup()
        return sorted(datamodule.val_data.samples.image_path)

    assert held_out(1) == held_out(1)
    assert held_out(1) != held_out(2)


def test_all_categories_of_a_benchmark() -> None:
    assert len(known_categories("MVTecAD")) == 15
    assert "candle" in known_categories("Visa")
    assert known_categories("BTech") == ("01", "02", "03")


def test_batches_carry_masks_for_training(tmp_path: Path) -> None:
    root = str(make_replica("MVTecAD", tmp_path, ["alpha"], bad=4))
    datamodule = MultiClassDataModule(
        sources=[{"datamodule": "MVTecAD", "root": root, "categories": ["alpha"]}], train_batch_size=16, num_workers=0
    )
    datamodule.setup()
    batch = next(iter(datamodule.train_dataloader()))
    assert batch.gt_mask is not None
    assert torch.equal(batch.gt_label.bool(), batch.gt_mask.flatten(1).any(1))


def test_anomalies_without_masks_are_validated_and_tested_but_never_trained_on(tmp_path: Path) -> None:
    """A Folder category with image-level labels beside MVTec-style ones with masks (the shared domain folds)."""
    masked = make_replica("MVTecAD", tmp_path / "masked", ["alpha", "gamma"], train=4, good=2, bad=3)
    plain = make_replica("MVTecAD", tmp_path / "plain", ["beta", "delta"], train=4, good=2, bad=3)
    for category in ("beta", "delta"):  # no ground truth: only image-level labels
        for mask in (plain / category / "ground_truth").rglob("*.png"):
            mask.unlink()

    def folder(category: str, domain: str) -> dict:
        defects = sorted(path.name for path in (plain / category / "test").iterdir() if path.name != "good")
        return {
            "domain": domain, "datamodule": "Folder", "root": str(plain / category), "categories": [category],
            "normal_dir": "train/good", "normal_test_dir": "test/good",
            "abnormal_dir": [f"test/{name}" for name in defects],
        }  # fmt: skip

    datamodule = MultiClassDataModule(
        sources=[{"domain": "parts", "datamodule": "MVTecAD", "root": str(masked), "categories": ["alpha"]},
                 folder("beta", "walls")],
        targets=[{"domain": "parts", "datamodule": "MVTecAD", "root": str(masked), "categories": ["gamma"]},
                 folder("delta", "walls")],
        val_split_ratio=0.3,
        num_workers=0,
    )  # fmt: skip
    datamodule.setup()
    train = datamodule.train_data.samples
    beta = train[train[CATEGORY_COLUMN] == "beta"]
    assert (beta.label_index == 1).sum() == 0  # its anomalies have no mask: the flows would learn them as normal
    assert ((train[CATEGORY_COLUMN] == "alpha") & (train.label_index == 1)).sum() == 2
    # every image stays available per category (validation of the sources, test of the targets)
    validation, targets = datamodule.validation_samples, datamodule.target_samples
    assert ((validation[CATEGORY_COLUMN] == "beta") & (validation.label_index == 1)).sum() == 1
    assert ((targets[CATEGORY_COLUMN] == "delta") & (targets.label_index == 1)).sum() == 3
    # Lightning's pixel-level sets hold only what they can read: every item loads, masks where anomalous
    for dataset in (datamodule.val_data, datamodule.test_data):
        assert all(dataset[index].gt_mask is not None for index in range(len(dataset)))
    assert {name: datamodule.domain_of(name) for name in ("alpha", "beta", "gamma", "delta")} == {
        "alpha": "parts", "beta": "walls", "gamma": "parts", "delta": "walls",
    }  # fmt: skip
