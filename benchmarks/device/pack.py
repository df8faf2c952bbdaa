# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""Pack what a GPU run needs into ``.gpu/`` (git-ignored; carried by the device tool, 64 MiB in all).

``../shared/data`` (55 MiB of PNG) plus the offline Lite0 weights (18 MiB) exceed the transfer limit, so the images
travel as 224-px lossless WebP (the model resizes to 224 anyway; PatchCore's AUROC on the copies equals the
originals', docs/benchmark.md "Longer training on a GPU"); ``unpack.py`` turns them back into PNG on the device.
Wheels of the packages the device image lacks (anomalib, FrEIA, jsonargparse, kornia, omegaconf, ...) go to
``.gpu/whl`` (``pip download --no-deps``, see /work/.library/device/README.md); ``.gpu/stubs`` holds empty
``kornia_rs`` / ``imagecodecs`` modules (imported by kornia / anomalib, unused here).

    python benchmarks/device/pack.py   # then: device run "bash benchmarks/device/run_epochs.sh", carry [".gpu"]
"""

import shutil
from pathlib import Path

from PIL import Image

from anomalib_resad.offline_weights import efficientnet_lite0_weights

SOURCE, TARGET = Path("../shared/data"), Path(".gpu/data")

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
    print(sum(f.stat().st_size for f in Path(".gpu").rglob("*") if f.is_file()) / 2**20, "MiB in .gpu")
