# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""On the device: ``pack.py``'s WebP copies back to PNG in ../shared/data, the layout the configs read."""

from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image

SOURCE, TARGET = Path(".gpu/data"), Path("../shared/data")


def convert(path: Path) -> int:
    out = TARGET / path.relative_to(SOURCE).with_suffix(".png")
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.open(path).save(out)
    return 1


if __name__ == "__main__":
    files = list(SOURCE.rglob("*.webp"))
    with ProcessPoolExecutor(16) as pool:
        print(sum(pool.map(convert, files, chunksize=64)), "images")
    for other in SOURCE.rglob("*"):
        if other.is_file() and other.suffix != ".webp":
            out = TARGET / other.relative_to(SOURCE)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(other.read_bytes())
