"""Data: image files and the bundled demo photos served as HR / LR batches."""

from gpsr.data.datamodule import GPSRDataModule, ImageDataset, split_indices
from gpsr.data.demo import demo_crops
from gpsr.data.images import ImageFileError, decode_rgb, find_images, load_image

__all__ = [
    "GPSRDataModule",
    "ImageDataset",
    "ImageFileError",
    "decode_rgb",
    "demo_crops",
    "find_images",
    "load_image",
    "split_indices",
]
