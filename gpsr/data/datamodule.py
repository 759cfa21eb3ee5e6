"""GPSRDataModule: FFHQ / CelebA-HQ / any image folder / the bundled demo, as HR-LR batches.

Every batch is a dict:
- "hr": (N, 3, S, S) float32 in [-1, 1] on 8-bit levels (randomly flipped in training);
- "lr": (N, 3, S/s, S/s) float32 = `gpsr.ops.degrade(hr, s)`, never clamped or rounded;
  with `lr_noise` / `lr_quantize` the noisy measurement instead
  (`gpsr.ops.noisy_measurement`: Gaussian noise seeded by the image's index, clamped to the
  pixel range, optionally rounded to 8 bits);
- "lr_clean": (N, 3, S/s, S/s), the noise-free `degrade(hr, s)`, only with noise or rounding;
- "index": (N,) long, the image's index within its split.
Dequantization is not applied here: the training steps call `gpsr.ops.dequantize`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

from gpsr import ops
from gpsr.data.demo import RandomPatches, demo_splits
from gpsr.data.images import (
    CROPS,
    ImageFileError,
    crop_square,
    decode_rgb,
    find_images,
    load_image,
    read_header,
    too_small_message,
)
from gpsr.diffusion.noise import measurement_noise
from gpsr.utils.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["GPSRDataModule", "ImageDataset", "split_indices"]

SPLITS = ("train", "val", "test")


class EpochCountingSampler(StatefulDistributedSampler):
    """The training shuffle: a permutation of (seed, epoch) per epoch, sharded over processes,
    resumable mid-epoch, that counts its own epochs and keeps the count in its state.

    Lightning tells samplers its epoch number (`set_epoch`), and after a resume from a
    checkpoint written at the last batch of an epoch that number runs one ahead of the
    interrupted run's (Lightning 2.6 runs an empty epoch first), which would shuffle the
    next epoch differently. Here each new pass over the data (an iteration that does not
    continue a loaded mid-epoch state) is the next epoch, and the number is saved with the
    loader's state, so a resumed run shuffles as the uninterrupted run did. `set_epoch` is
    honoured only before a fresh sampler's first pass (a loader Lightning rebuilt); a loaded
    state takes precedence.
    """

    _EPOCH = "epoch"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._fresh = True

    def set_epoch(self, epoch: int) -> None:
        if self._fresh:
            self.epoch = epoch

    def __iter__(self):
        if self.next_yielded is None and not self._fresh:
            self.epoch += 1  # a new pass, not the rest of a loaded one
        self._fresh = False
        return super().__iter__()

    def state_dict(self) -> dict:
        return {**super().state_dict(), self._EPOCH: self.epoch}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        if self._EPOCH in state_dict:  # older checkpoints hold none: Lightning's number
            self.epoch, self._fresh = int(state_dict[self._EPOCH]), False


def load_or_skip(
    path: Path, size: int, skip_corrupt: bool, crop: str = "resize", max_pixels: int | None = None
) -> torch.Tensor | None:
    """`load_image`, or None with a warning for a bad file when `skip_corrupt` (else raise).
    crop="full" decodes the whole image (no crop)."""
    try:
        if crop == "full":
            return decode_rgb(path, max_pixels)
        return load_image(path, size, crop, max_pixels)
    except ImageFileError as err:
        if not skip_corrupt:
            raise ImageFileError(f"{err}; remove it or set data.skip_corrupt=true") from None
        log.warning("skipping %s", err)
        return None


def split_indices(
    n: int, val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[int]]:
    """Deterministic train / val / test partition of range(n) from `seed`."""
    if not (
        0 <= val_fraction <= 1 and 0 <= test_fraction <= 1 and val_fraction + test_fraction <= 1
    ):
        raise ConfigError(
            f"data.val_fraction={val_fraction} and data.test_fraction={test_fraction} must be in "
            f"[0, 1] and sum to at most 1"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val, n_test = round(n * val_fraction), round(n * test_fraction)
    return {
        "test": sorted(perm[:n_test]),
        "val": sorted(perm[n_test : n_test + n_val]),
        "train": sorted(perm[n_test + n_val :]),
    }


class ImageDataset(Dataset):
    """HR/LR pairs from a list of files or from in-memory uint8 images.

    Args:
        items: a list of file paths, a list of decoded uint8 images (3, H, W), or any
            indexable of prepared (3, S, S) uint8 images (a tensor (N, 3, S, S), or the
            demo's `RandomPatches`).
        size: side S of the square HR images.
        scale: SR factor; `size` must be divisible by it.
        flip: random horizontal flips (training).
        skip_corrupt: replace an undecodable file by the next good one, with a warning.
        crop: how a file or a decoded image larger than S becomes S x S
            (`gpsr.data.images.crop_square`: "resize", "random" or "center").
        lr_noise: std of Gaussian noise added to the LR image, in [0, 1] pixel units, drawn
            from (noise_seed, index) so it does not depend on batching; 0 = none.
        lr_quantize: round the (noisy) LR image to 8-bit levels.
        noise_seed: seed of the LR noise.
        max_pixels: the decompression-bomb limit of a file (None: Pillow's).
    """

    def __init__(
        self,
        items: Sequence[Path] | Sequence[torch.Tensor] | torch.Tensor | RandomPatches,
        size: int,
        scale: int,
        flip: bool = False,
        skip_corrupt: bool = False,
        crop: str = "resize",
        lr_noise: float = 0.0,
        lr_quantize: bool = False,
        noise_seed: int = 0,
        max_pixels: int | None = None,
    ):
        ops.check_divisible(size, size, scale, what=f"data.size={size}")
        self.items = items
        self.max_pixels = max_pixels
        self.size, self.scale, self.flip, self.skip_corrupt = size, scale, flip, skip_corrupt
        self.crop = crop
        self.lr_noise, self.lr_quantize, self.noise_seed = lr_noise, lr_quantize, noise_seed

    def __len__(self) -> int:
        return len(self.items)

    # Random crops and flips draw from torch's generator of the process that loads: the
    # main process (data.num_workers=0), whose generators every checkpoint saves
    # (`gpsr.callbacks.RandomState`), or a worker. In a worker, the dataset's state (which
    # StatefulDataLoader snapshots with each batch and hands back to the worker on resume)
    # is that worker's generator, so a resumed worker draws what it would have drawn next.
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"torch": torch.get_rng_state()} if get_worker_info() is not None else {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if "torch" in state and get_worker_info() is not None:
            torch.set_rng_state(state["torch"])

    def _uint8(self, index: int) -> torch.Tensor:
        if not isinstance(self.items, (list, tuple)):
            return self.items[index]
        for attempt in range(len(self.items)):
            item = self.items[(index + attempt) % len(self.items)]
            if isinstance(item, torch.Tensor):
                if item.shape[-2:] == (self.size, self.size):
                    return item
                return crop_square(item, self.size, self.crop)
            img = load_or_skip(item, self.size, self.skip_corrupt, self.crop, self.max_pixels)
            if img is not None:
                return img
        raise ImageFileError("no decodable image left in this split")

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        img = self._uint8(index)
        if self.flip and torch.rand(()) < 0.5:
            img = img.flip(-1)
        hr = img.float() / 127.5 - 1.0  # 8-bit levels to [-1, 1]
        lr = ops.degrade(hr[None], self.scale)
        if not (self.lr_noise > 0 or self.lr_quantize):
            return {"hr": hr, "lr": lr[0], "index": index}
        noise = measurement_noise(lr.shape[1:], [index], self.noise_seed) if self.lr_noise else None
        noisy = ops.noisy_measurement(ops.to_unit(lr), self.lr_noise, noise, self.lr_quantize)
        return {"hr": hr, "lr": ops.to_signed(noisy)[0], "lr_clean": lr[0], "index": index}


class GPSRDataModule(L.LightningDataModule):
    """Train / val / test loaders for one data source.

    Args:
        source: "demo" (bundled photos, no download) or "folder" (FFHQ, CelebA-HQ, any tree).
        root: image folder split by `val_fraction` / `test_fraction` with `split_seed`
            (source="folder").
        train_root, val_root, test_root: explicit per-split folders (override `root`).
        size: HR side; larger images are resized and centre-cropped (crop="resize").
        crop: "resize" (shorter side to `size`, centre crop) or "random" (photos of any
            size at full resolution: a random `size` patch, flipped, at every draw in
            training; the centre patch in validation and testing).
        scale: SR factor.
        batch_size, eval_batch_size, num_workers, pin_memory: loader settings.
        cache: decode every image once at setup and keep the uint8 tensors in RAM.
        skip_corrupt, skip_small: leave undecodable / too small files out instead of failing
            (validation and test files are decoded once at setup, so a bad one is left out
            and the image count says so; in training the next good image is drawn).
        demo_count: training patches per epoch of the demo, each cut at a random position
            of a training region (see `gpsr.data.demo`).
        demo_val, demo_test: held-out demo tiles for validation and testing (they share no
            pixel with any training region).
        demo_zoom: demo photos are reduced to a shorter side of demo_zoom x size.
        demo_heldout_zoom: null, or take the validation and test tiles from the held-out
            strips seen at this larger zoom (e.g. 8: 96 validation and 32 test tiles, enough
            to calibrate intervals, docs/uncertainty.md); the training regions are unchanged.
        lr_noise: std of Gaussian noise on every LR image, in [0, 1] pixel units (seeded by
            `seed` and the image's index: every method and run sees the same noisy LR), then
            clamped to [0, 1]; batches then also hold "lr_clean". 0 (default): the paper's
            noise-free LR. Training steps use the HR images only, so this changes what
            validation and evaluation are given (docs/method.md §10).
        lr_quantize: round the LR images to 8 bits (what a saved PNG does), after the noise.
        max_pixels: files whose header claims more pixels are refused as decompression bombs
            (None: Pillow's limit, 89,478,485); raise it for real photos this large.
    """

    def __init__(
        self,
        source: str = "demo",
        root: str | None = None,
        train_root: str | None = None,
        val_root: str | None = None,
        test_root: str | None = None,
        size: int = 128,
        scale: int = 8,
        crop: str = "resize",
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        split_seed: int = 0,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        cache: bool = False,
        skip_corrupt: bool = False,
        skip_small: bool = False,
        demo_count: int = 1024,
        demo_val: int = 8,
        demo_test: int = 16,
        demo_zoom: float = 4.0,
        demo_heldout_zoom: float | None = None,
        lr_noise: float = 0.0,
        lr_quantize: bool = False,
        max_pixels: int | None = None,
        seed: int = 0,
    ):
        super().__init__()
        if max_pixels is not None and (
            isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1
        ):
            raise ConfigError(
                f"data.max_pixels must be a positive number of pixels or null, got {max_pixels!r}"
            )
        if (
            isinstance(lr_noise, bool)
            or not isinstance(lr_noise, (int, float))
            or not (0 <= lr_noise <= 1)
        ):
            raise ConfigError(
                f"data.lr_noise must be a noise std in [0, 1] pixel units, got {lr_noise!r}"
            )
        if not isinstance(lr_quantize, bool):
            raise ConfigError(f"data.lr_quantize must be true or false, got {lr_quantize!r}")
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"data.{name} must be a positive integer, got {value!r}")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ConfigError(f"data.num_workers must be 0 or more, got {num_workers!r}")
        if crop not in CROPS[:2]:
            raise ConfigError(f"data.crop must be 'resize' or 'random', got {crop!r}")
        if source not in ("demo", "folder"):
            raise ConfigError(f"data.source must be 'demo' or 'folder', got {source!r}")
        ops.check_divisible(size, size, scale, what=f"data.size={size}")
        if source == "folder" and not (root or train_root or val_root or test_root):
            raise ConfigError("data.root is not set: point it at a folder of images (docs/data.md)")
        self.source, self.root, self.size, self.scale = source, root, size, scale
        self.crop = crop
        self.roots = {"train": train_root, "val": val_root, "test": test_root}
        self.val_fraction, self.test_fraction, self.split_seed = (
            val_fraction,
            test_fraction,
            split_seed,
        )
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers, self.pin_memory, self.cache = num_workers, pin_memory, cache
        self.skip_corrupt, self.skip_small = skip_corrupt, skip_small
        self.demo_count, self.demo_val, self.demo_test = demo_count, demo_val, demo_test
        self.demo_zoom, self.seed = demo_zoom, seed
        self.demo_heldout_zoom = demo_heldout_zoom
        self.lr_noise, self.lr_quantize = float(lr_noise), lr_quantize
        self.max_pixels = max_pixels
        self.items: dict[str, Sequence[Path] | torch.Tensor] = {}
        self.train_patches: RandomPatches | None = None

    # ------------------------------------------------------------------ items per split
    def _checked_files(self, files: list[Path]) -> list[Path]:
        """Header scan: drop or refuse unreadable and too-small files before training starts."""
        kept = []
        for path in files:
            try:
                w, h = read_header(path, self.max_pixels)
            except ImageFileError as err:
                if not self.skip_corrupt:
                    raise ImageFileError(f"{err}; remove it or set data.skip_corrupt=true") from err
                log.warning("skipping %s", err)
                continue
            if min(w, h) < self.size:
                if not self.skip_small:
                    raise ImageFileError(too_small_message(str(path), w, h, self.size))
                log.warning(
                    "skipping %s: %dx%d is smaller than data.size=%d", path, w, h, self.size
                )
                continue
            kept.append(path)
        return kept

    def _decodes(self, path: Path) -> bool:
        """Whether a file decodes in full (warns and returns False if not)."""
        try:
            decode_rgb(path, self.max_pixels)
        except ImageFileError as err:
            log.warning("skipping %s", err)
            return False
        return True

    def _decode_all(self, files: Sequence[Path]) -> torch.Tensor | list[torch.Tensor]:
        """Every file decoded once: (N, 3, S, S) resized squares, or with crop="random" the
        whole images (a list), cropped at each draw."""
        mode = "full" if self.crop == "random" else "resize"
        out = [
            img
            for p in files
            if (img := load_or_skip(p, self.size, self.skip_corrupt, mode, self.max_pixels))
            is not None
        ]
        if not out:
            raise ImageFileError("data.cache: no decodable images")
        return out if mode == "full" else torch.stack(out)

    def _build_items(self) -> dict[str, Sequence[Path] | torch.Tensor]:
        if self.source == "demo":
            demo = demo_splits(
                self.size, self.demo_zoom, self.demo_val, self.demo_test, self.demo_heldout_zoom
            )
            self.train_patches = RandomPatches(demo.regions, self.size, self.demo_count)
            return {"train": demo.train, "val": demo.val, "test": demo.test}
        items: dict[str, Sequence[Path] | torch.Tensor] = {}
        if self.root:
            files = self._checked_files(find_images(self.root, "data.root"))
            idx = split_indices(len(files), self.val_fraction, self.test_fraction, self.split_seed)
            items = {k: [files[i] for i in v] for k, v in idx.items()}
        for split, root in self.roots.items():
            if root:
                items[split] = self._checked_files(find_images(root, f"data.{split}_root"))
        if self.skip_corrupt:  # evaluation leaves a bad file out (training draws the next)
            for split in ("val", "test"):
                items[split] = [p for p in items.get(split, []) if self._decodes(p)]
        if self.cache:
            items = {k: self._decode_all(v) if len(v) else v for k, v in items.items()}
        return items

    def setup(self, stage: str | None = None) -> None:
        if not self.items:
            self.items = self._build_items()

    def has_split(self, split: str) -> bool:
        """Whether `split` has any image (e.g. FFHQ training keeps no test split)."""
        self.setup()
        return len(self.items.get(split, [])) > 0

    def dataset(self, split: str, flip: bool | None = None) -> ImageDataset:
        """The dataset of one split; training flips by default, evaluation never.

        The demo's training split is random patches when flipped (training) and the fixed
        grid tiles of the training regions otherwise (latent statistics).
        """
        self.setup()
        if split not in SPLITS:
            raise ConfigError(f"unknown split {split!r}; use one of {SPLITS}")
        flip = (split == "train") if flip is None else flip
        items = self.items.get(split, [])
        if split == "train" and flip and self.train_patches is not None:
            items = self.train_patches
        if len(items) == 0:
            hint = {
                "train": "lower data.val_fraction / data.test_fraction or set data.train_root",
                "val": "raise data.val_fraction or set data.val_root",
                "test": "raise data.test_fraction or set data.test_root",
            }[split]
            if self.source == "demo":
                hint = f"raise data.demo_{split}"
            raise ConfigError(f"the {split} split is empty: {hint}")
        crop = self.crop if self.crop == "resize" or split == "train" and flip else "center"
        return ImageDataset(
            items,
            self.size,
            self.scale,
            flip=flip,
            skip_corrupt=self.skip_corrupt,
            crop=crop,
            lr_noise=self.lr_noise,
            lr_quantize=self.lr_quantize,
            noise_seed=self.seed,
            max_pixels=self.max_pixels,
        )

    # ------------------------------------------------------------------ loaders
    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            return trainer.world_size, trainer.global_rank
        return 1, 0

    def _loader_kwargs(self) -> dict:
        return {
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory,
            "persistent_workers": self.num_workers > 0,
        }

    def train_dataloader(self) -> StatefulDataLoader:
        """Shuffled, flipped, drop-last batches; resumable mid-epoch (state saved in checkpoints)."""
        ds = self.dataset("train")
        world, rank = self._world()
        if len(ds) < self.batch_size * world:
            raise ConfigError(
                f"the train split has {len(ds)} images, fewer than data.batch_size={self.batch_size} "
                f"x {world} processes; lower data.batch_size"
            )
        # The shuffle is a function of (seed, epoch) only, also for one process, so a
        # resumed run replays the same order; StatefulDataLoader skips what was consumed.
        sampler = EpochCountingSampler(
            ds, world, rank, shuffle=True, seed=self.seed, drop_last=True
        )
        return StatefulDataLoader(
            ds, self.batch_size, sampler=sampler, drop_last=True, **self._loader_kwargs()
        )

    def eval_dataloader(self, split: str) -> DataLoader:
        """In-order, never flipped batches of a split; under DDP each rank gets a disjoint,
        unpadded shard."""
        ds = self.dataset(split, flip=False)
        world, rank = self._world()
        sampler = (
            UnrepeatedDistributedSampler(ds, world, rank, shuffle=False) if world > 1 else None
        )
        return DataLoader(
            ds, self.eval_batch_size, sampler=sampler, shuffle=False, **self._loader_kwargs()
        )

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self.eval_dataloader("test")

    def stats_dataloader(self) -> DataLoader:
        """Clean training images (no flip), sharded without padding: for latent statistics."""
        return self.eval_dataloader("train")
