# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""Reading images as RGB in ``[0, 1]``, whatever their bit depth.

anomalib's ``read_image`` converts every image with PIL's ``convert("RGB")``, which clips 16-bit grayscale (X-ray,
thermal and many industrial cameras write them) to 8 bits: nearly every pixel becomes white. Here an image is scaled
by its bit depth instead (16-bit by 65535, 32-bit integer by its type's maximum, float images taken as they are) and
grey is repeated over three channels; 8-bit images are read exactly as anomalib reads them.

Example:
    >>> import numpy as np
    >>> from PIL import Image
    >>> deep = Image.fromarray(np.full((2, 3), 32768, dtype=np.uint16))
    >>> rgb = pil_to_rgb(deep)
    >>> rgb.shape, round(float(rgb.max()), 3)
    ((2, 3, 3), 0.5)
"""

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2.functional import to_dtype, to_image

# PIL modes of more than 8 bits per channel, and the value that is full scale in each
_FULL_SCALE = {"I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I;16N": 65535.0, "I": 65535.0}


def is_high_bit_depth(path: str | Path) -> bool:
    """Whether an image file holds more than 8 bits per channel (reads the header only)."""
    with Image.open(path) as image:
        return image.mode in _FULL_SCALE or image.mode == "F"


def pil_to_rgb(image: Image.Image) -> np.ndarray:
    """A PIL image as an ``(H, W, 3)`` array in ``[0, 1]``, scaled by its bit depth (never clipped).

    8-bit images come back exactly as anomalib's ``read_image(path)`` returns them (float64); deeper ones as float32.
    """
    if image.mode in _FULL_SCALE or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if image.mode == "I" and values.max(initial=0) > 65535:  # 32-bit integers beyond 16 bits
            full_scale = float(np.iinfo(np.int32).max)
        else:
            full_scale = 1.0 if image.mode == "F" else _FULL_SCALE[image.mode]
        grey = np.clip(values / full_scale, 0.0, 1.0).astype(np.float32)
        return np.repeat(grey[..., None], 3, axis=2)
    return np.array(image.convert("RGB")) / 255.0


def read_rgb(path: str | Path, as_tensor: bool = True) -> torch.Tensor | np.ndarray:
    """An image file in ``[0, 1]`` (see the module docstring), like anomalib's ``read_image`` for 8-bit images.

    Args:
        path (str | Path): The image file.
        as_tensor (bool): A ``(3, H, W)`` float32 tensor (default), else an ``(H, W, 3)`` array.

    Returns:
        torch.Tensor | np.ndarray: The image.
    """
    with Image.open(path) as image:
        if image.mode in _FULL_SCALE or image.mode == "F":
            rgb = pil_to_rgb(image)
            return torch.from_numpy(rgb).permute(2, 0, 1).contiguous() if as_tensor else rgb
        if not as_tensor:
            return pil_to_rgb(image)
        return to_dtype(to_image(image.convert("RGB")), torch.float32, scale=True)
