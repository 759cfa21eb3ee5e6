"""Data: image files and the bundled demo photos served as HR / LR batches."""

from gpsr.data.datamodule import GPSRDataModule, ImageDataset, split_indices
from gpsr.data.demo import RandomPatches, demo_splits
from gpsr.data.images import ImageFileError, decode_rgb, find_images, load_image

__all__ = [
    "GPSRDataModule",
    "ImageDataset",
    "ImageFileError",
    "decode_rgb",
    "RandomPatches",
    "demo_splits",
    "find_images",
    "load_image",
    "split_indices",
]
