# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""Pack what a GPU run needs into ``.gpu/`` (git-ignored; carried by the device tool, 64 MiB in all).

``../shared/data`` (55 MiB of PNG) plus the offline Lite0 weights (18 MiB) exceed the transfer limit, so the images
travel as 224-px lossless WebP (the model resizes to 224 anyway; PatchCore's AUROC on the copies equals the
originals', docs/benchmark.md "Longer training on a GPU"); ``unpack.py`` turns them back into PNG on the device.
Wheels of the packages the device image lacks (anomalib, FrEIA, jsonargparse, kornia, omegaconf, ...), at the
versions installed here, go to ``.gpu/whl`` (``pip download --no-deps`` for the device's Python 3.12; FrEIA has no
wheel on PyPI and is built here); ``.gpu/stubs`` holds empty ``kornia_rs`` (with ``kornia_rs.io``, which kornia 0.9
imports) and ``imagecodecs`` modules (imported by kornia / anomalib, unused here). About 58 MiB in all: the repo
beside it must stay under the tool's 64 MiB.

    python benchmarks/device/pack.py   # then: device run "bash benchmarks/device/run_flow_steps.sh", carry [".gpu"]
"""

import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

from PIL import Image

from anomalib_resad.offline_weights import efficientnet_lite0_weights

SOURCE, TARGET = Path("../shared/data"), Path(".gpu/data")
DEVICE_LACKS = ("anomalib", "jsonargparse", "omegaconf", "kornia", "docstring_parser", "typeshed_client",
                "rich-argparse", "platformdirs")  # fmt: skip
DEVICE_PLATFORM = ["--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
                   "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64"]  # fmt: skip


def pack_wheels(folder: Path) -> None:
    """The device image's missing packages as wheels, pinned to the versions this environment runs."""
    shutil.rmtree(folder, ignore_errors=True)  # two versions of one package would stop the device's install
    folder.mkdir(parents=True)
    pins = [f"{name}=={version(name)}" for name in DEVICE_LACKS]
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run([*pip, "download", "--no-deps", "--only-binary=:all:", *DEVICE_PLATFORM, "-d", folder, *pins],
                   check=True)  # fmt: skip
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", folder, f"FrEIA=={version('FrEIA')}"],
                   check=True)  # fmt: skip
    for module in ("kornia_rs/__init__.py", "kornia_rs/io.py", "imagecodecs/__init__.py"):
        stub = folder.parent / "stubs" / module
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.touch()


if __name__ == "__main__":
    for path in SOURCE.rglob("*"):
        if not path.is_file():
            continue
        out = TARGET / path.relative_to(SOURCE)
        out.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix.lower() == ".png":
            image = Image.open(path).convert("RGB")
            mask = "ground_truth" in path.parts
            image.resize((224, 224), Image.NEAREST if mask else Image.BILINEAR).save(
                out.with_suffix(".webp"), lossless=True
            )
        else:
            shutil.copy(path, out)
    cache = Path(".gpu/cache")
    cache.mkdir(parents=True, exist_ok=True)
    shutil.copy(efficientnet_lite0_weights(), cache)
    pack_wheels(Path(".gpu/whl"))
    print(sum(f.stat().st_size for f in Path(".gpu").rglob("*") if f.is_file()) / 2**20, "MiB in .gpu")
