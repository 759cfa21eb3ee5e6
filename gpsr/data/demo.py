"""The bundled demo data: seeded crops of the colour photos that scikit-image ships offline."""

from __future__ import annotations

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF

__all__ = ["DEMO_PHOTOS", "demo_crops"]

DEMO_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "immunohistochemistry",
    "retina",
    "colorwheel",
    "hubble_deep_field",
)


def demo_crops(size: int = 64, count: int = 96, seed: int = 0, zoom: float = 3.0) -> torch.Tensor:
    """Fixed crops of the bundled photos: -> (count, 3, size, size) uint8.

    Each photo is first reduced (antialiased bicubic) so its shorter side is `zoom * size`,
    then `count` crops are cut round-robin over the photos at positions drawn from `seed`.
    """
    import skimage.data  # imported here: only the demo needs it

    rng = np.random.default_rng(seed)
    photos = []
    for name in DEMO_PHOTOS:
        img = torch.from_numpy(np.ascontiguousarray(getattr(skimage.data, name)())).permute(2, 0, 1)
        short = int(round(zoom * size))
        if min(img.shape[-2:]) > short:
            img = TF.resize(img, short, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        photos.append(img)
    crops = []
    for i in range(count):
        img = photos[i % len(photos)]
        h, w = img.shape[-2:]
        top = int(rng.integers(0, h - size + 1))
        left = int(rng.integers(0, w - size + 1))
        crops.append(img[:, top : top + size, left : left + size])
    return torch.stack(crops).contiguous()
