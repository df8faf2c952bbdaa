# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""The shipped settings: the held-out-domain folds hold out whole domains, each once."""

from pathlib import Path

import pytest
import yaml

from anomalib_resad.data.multi_class import CategorySource
from tests.conftest import REPO_ROOT

FOLDS = sorted((REPO_ROOT / "configs" / "settings").glob("shared_domains_fold*.yaml"))
# ../shared/data/<dataset>: a dataset is a domain, except the two chest sets, which are one (its README)
SAME_DOMAIN = {"chest_xray": "chest", "lung_ct": "chest"}


def data_domain(entry: dict) -> str:
    """The domain of a config entry, from the data folder it reads (not from its own ``domain`` label)."""
    parts = Path(entry["root"]).parts
    dataset = parts[parts.index("data") + 1]
    return SAME_DOMAIN.get(dataset, dataset)


def test_three_folds_hold_out_every_domain_once() -> None:
    assert len(FOLDS) == 3
    held_out = []
    for path in FOLDS:
        config = yaml.safe_load(path.read_text())
        sources = {data_domain(entry) for entry in config["sources"]}
        targets = {data_domain(entry) for entry in config["targets"]}
        assert not sources & targets, f"{path.name}: a held-out domain has categories in the sources"
        assert len(sources | targets) == 8  # every domain of ../shared/data (chest X-ray and CT are one)
        held_out += sorted(targets)
    assert len(held_out) == len(set(held_out)) == 8


@pytest.mark.parametrize("path", FOLDS, ids=lambda path: path.stem)
def test_fold_entries_parse_and_name_their_domain(path: Path) -> None:
    config = yaml.safe_load(path.read_text())
    folders_of_label: dict[str, set[str]] = {}
    for entry in config["sources"] + config["targets"]:
        source = CategorySource.parse(entry)
        assert source.domain, f"{path.name}: every entry names its domain (results are averaged per domain)"
        folders_of_label.setdefault(source.domain, set()).add(data_domain(entry))
    # a label names one data domain: a mislabelled entry would average one domain's results into another's
    assert all(len(folders) == 1 for folders in folders_of_label.values()), folders_of_label
