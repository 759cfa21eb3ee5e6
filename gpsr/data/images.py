"""Reading image files into uint8 RGB tensors, with one documented rule per odd input.

Rules (docs/data.md):
- greyscale (L, I, I;16) is replicated to RGB; 16-bit and 32-bit integer images are scaled to
  8 bits (top byte), never clipped;
- RGBA / LA / palette images are converted to RGB with the alpha channel dropped;
- CMYK and other colour modes go through Pillow's RGB conversion;
- an image larger than the target is resized (shorter side to the target, antialiased
  bicubic) and centre-cropped, or with `data.crop=random` cropped at full resolution
  (random patches in training, the centre in evaluation); a smaller one is an error naming
  the file (or skipped with `data.skip_small=true`);
- a file that cannot be decoded (corrupt, truncated, not an image, or a header claiming
  more pixels than the decompression-bomb limit) is an error naming the file (or skipped
  with a warning with `data.skip_corrupt=true`). The limit is Pillow's
  `Image.MAX_IMAGE_PIXELS` (89,478,485 pixels, about 9459 x 9459) unless `data.max_pixels`
  (or `max_pixels=` for `gpsr.sample`) says otherwise; it is refused at the limit itself
  (Pillow alone only warns up to twice it).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, UnidentifiedImageError

from gpsr.utils.errors import GPSRError, InputNotFoundError

__all__ = [
    "IMAGE_SUFFIXES",
    "ImageFileError",
    "find_images",
    "read_header",
    "decode_rgb",
    "fit_to_square",
    "CROPS",
    "crop_square",
    "too_small_message",
    "load_image",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class ImageFileError(GPSRError, ValueError):
    """An image file that cannot be used; the message names the file and the setting to change."""


def find_images(root: str | Path, setting: str = "data.root") -> list[Path]:
    """All image files under `root` (recursive), sorted; clear errors for missing or empty roots."""
    root = Path(root).expanduser()
    if not root.exists():
        raise InputNotFoundError(
            f"{setting}={root} does not exist; point {setting} at a folder of images"
        )
    if root.is_file():
        return [root]
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise InputNotFoundError(
            f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {setting}={root}"
        )
    return files


@contextlib.contextmanager
def _opened(path: Path, max_pixels: int | None):
    """`Image.open(path)`, refused as a decompression bomb when its header claims more than
    `max_pixels` pixels (None: Pillow's `Image.MAX_IMAGE_PIXELS`). Pillow's own guard is held
    off while the file is opened here, so the limit is exactly this one."""
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        img = Image.open(path)
    finally:
        Image.MAX_IMAGE_PIXELS = saved
    with img:
        w, h = img.size
        if limit and w * h > limit:
            raise ImageFileError(
                f"{path}: refused as a decompression bomb: its header claims {w}x{h} = "
                f"{w * h:,} pixels, more than the limit of {limit:,} (for a real image this "
                f"large raise data.max_pixels, or max_pixels= for gpsr.sample)"
            )
        yield img


def _ends_whole(path: Path, fmt: str | None) -> bool:
    """Whether the file ends where its format says it does (a truncated download or copy
    does not): PNG's IEND chunk, JPEG's end-of-image marker (entropy-coded data never holds
    one), the RIFF size of WebP, the file size stored by BMP. Other formats pass."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(12)
        f.seek(max(0, size - 4096))
        tail = f.read()
    if fmt == "PNG":
        return b"IEND" in tail[-12:]
    if fmt == "JPEG":
        return b"\xff\xd9" in tail
    if fmt == "WEBP":
        return size >= 8 + int.from_bytes(head[4:8], "little")
    if fmt == "BMP":
        return size >= int.from_bytes(head[2:6], "little")
    return True


def read_header(path: Path, max_pixels: int | None = None) -> tuple[int, int]:
    """(width, height) from the file header, without decoding pixels; a file cut short
    (`_ends_whole`) or claiming more than `max_pixels` pixels (`_opened`) is refused here
    too, so it is found before any training."""
    try:
        with _opened(path, max_pixels) as img:
            if not _ends_whole(path, img.format):
                raise ImageFileError(f"{path}: truncated (the file ends before its image does)")
            return img.size
    except ImageFileError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageFileError(f"{path}: not a readable image ({err})") from err


def decode_rgb(path: Path, max_pixels: int | None = None) -> torch.Tensor:
    """Decode a file to uint8 RGB: -> (3, H, W) uint8, following the module's rules (at
    most `max_pixels` pixels, `_opened`)."""
    try:
        with _opened(path, max_pixels) as img:
            img.load()
            mode = img.mode
            if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
                arr = np.asarray(img).astype(np.int64)
                # Pillow reads 16-bit greyscale as I;16 or I; scale the 16-bit range to 8 bits.
                arr = np.clip(arr, 0, 65535) >> 8
                arr = np.repeat(arr.astype(np.uint8)[..., None], 3, axis=-1)
            elif mode == "F":
                raise ImageFileError(
                    f"{path}: floating-point images are not supported; save as 8/16-bit"
                )
            else:
                if mode in ("RGBA", "LA", "PA"):
                    img = img.convert(mode[:-1] if mode != "PA" else "P")
                arr = np.asarray(img.convert("RGB"))
    except ImageFileError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageFileError(f"{path}: cannot be decoded ({err})") from err
    return torch.from_numpy(np.array(arr, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()


def too_small_message(name: str, width: int, height: int, size: int) -> str:
    return (
        f"{name} is {width}x{height}, smaller than data.size={size}; lower data.size, "
        f"remove it, or set data.skip_small=true"
    )


def fit_to_square(img: torch.Tensor, size: int, name: str = "image") -> torch.Tensor:
    """Resize and centre-crop to a square: (3, H, W) uint8 -> (3, size, size) uint8.

    Larger images: shorter side to `size` with antialiased bicubic, then centre crop.
    Smaller images raise ImageFileError naming `name`.
    """
    h, w = img.shape[-2:]
    if min(h, w) < size:
        raise ImageFileError(too_small_message(name, w, h, size))
    if min(h, w) > size:
        img = TF.resize(img, size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    return TF.center_crop(img, [size, size])


CROPS = ("resize", "random", "center")


def crop_square(img: torch.Tensor, size: int, mode: str, name: str = "image") -> torch.Tensor:
    """(3, H, W) uint8 -> (3, size, size) uint8 by `mode`:
    "resize": `fit_to_square` (shorter side to `size`, centre crop);
    "random": a crop at a random position (torch's global generator), pixels untouched;
    "center": the centre crop, pixels untouched.
    A side smaller than `size` raises ImageFileError naming `name`."""
    if mode == "resize":
        return fit_to_square(img, size, name)
    h, w = img.shape[-2:]
    if min(h, w) < size:
        raise ImageFileError(too_small_message(name, w, h, size))
    if mode == "center":
        return TF.center_crop(img, [size, size])
    top = int(torch.randint(0, h - size + 1, ()))
    left = int(torch.randint(0, w - size + 1, ()))
    return img[:, top : top + size, left : left + size]


def load_image(
    path: Path, size: int, crop: str = "resize", max_pixels: int | None = None
) -> torch.Tensor:
    """Decode, convert and crop one file (`crop_square`): -> (3, size, size) uint8."""
    return crop_square(decode_rgb(path, max_pixels), size, crop, name=str(path))
