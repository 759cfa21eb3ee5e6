"""Data pipeline: demo crops, folders of real files, splits, and every kind of bad input."""

import logging

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from gpsr import ops
from gpsr.data import (
    GPSRDataModule,
    ImageDataset,
    ImageFileError,
    RandomPatches,
    decode_rgb,
    demo_splits,
    split_indices,
)


def _write_photos(folder, n=6, size=80):
    folder.mkdir(parents=True, exist_ok=True)
    photo = skimage.data.astronaut()
    for i in range(n):
        crop = photo[i * 40 : i * 40 + size, i * 30 : i * 30 + size + 10]  # not square
        ext = [".png", ".jpg", ".webp"][i % 3]
        Image.fromarray(crop).save(folder / f"img{i}{ext}")
    return folder


_SIGNATURES: list[tuple[list, torch.Size, list[torch.Tensor]]] = []


def _locate(tile: torch.Tensor, photos: list[torch.Tensor]) -> list[tuple[int, int, int]]:
    """Every (photo, top, left) where `tile` occurs exactly: candidates by a random linear
    signature of every window (one conv2d per photo and tile shape, kept for the next tile),
    each confirmed pixel by pixel."""
    size = tile.shape[-1]
    proj = torch.rand(1, *tile.shape, generator=torch.Generator().manual_seed(0)).double()
    want = (tile.double() * proj[0]).sum()
    cached = [s for held, shape, s in _SIGNATURES if held is photos and shape == tile.shape]
    if not cached:  # the list is held with its signatures, so its id cannot be reused
        cached = [[torch.nn.functional.conv2d(img[None].double(), proj)[0, 0] for img in photos]]
        _SIGNATURES.append((photos, tile.shape, cached[0]))
    hits = []
    for p, (img, sig) in enumerate(zip(photos, cached[0])):
        for top, left in ((sig - want).abs() < 1e-6 * want).nonzero().tolist():
            if torch.equal(img[:, top : top + size, left : left + size], tile):
                hits.append((p, top, left))
    return hits


def test_demo_holds_out_val_and_test_pixels_from_training():
    from gpsr.data.demo import demo_photos

    size, zoom = 32, 4.0
    d = demo_splits(size, zoom, n_val=8, n_test=16)
    photos = demo_photos(size, zoom)
    assert d.val.shape == (8, 3, 32, 32) and d.test.shape == (16, 3, 32, 32)
    assert d.test.float().std() > 20  # real photo content, not a constant
    used = set()
    for split, tiles in (("val", d.val), ("test", d.test)):
        for tile in tiles:
            hits = _locate(tile, photos)
            assert hits, f"a {split} tile is not cut from any photo"
            p, top, left = hits[0]
            h, w = photos[p].shape[-2:]
            # Wholly inside the held-out strip: right edge (landscape) or bottom (portrait).
            assert (left >= w - size) if w >= h else (top >= h - size)
            used.add((p, top, left))
    assert len(used) == 24  # val and test tiles are distinct
    assert {p for p, _, _ in used} == set(range(len(photos)))  # every photo is tested
    for region, img in zip(d.regions, photos):
        h, w = img.shape[-2:]
        expect = img[:, :, : w - size] if w >= h else img[:, : h - size, :]
        assert torch.equal(region, expect)  # training regions end where the strip begins


def test_demo_training_patches_are_random_windows_of_training_regions():
    d = demo_splits(32, 4.0, n_val=8, n_test=16)
    patches = RandomPatches(d.regions, 32, length=64)
    torch.manual_seed(0)
    first = torch.stack([patches[i] for i in range(64)])
    second = torch.stack([patches[i] for i in range(64)])
    assert not torch.equal(first, second)  # a new position every draw
    for i in (0, 1, 9):
        region = d.regions[i % len(d.regions)]
        assert _locate(first[i], [region])  # a window of photo i % 8's training region
    with pytest.raises(ValueError, match="data.demo_count"):
        RandomPatches(d.regions, 32, length=0)


def test_splits_are_deterministic_and_disjoint():
    s = split_indices(100, 0.1, 0.2, seed=3)
    assert len(s["val"]) == 10 and len(s["test"]) == 20 and len(s["train"]) == 70
    assert set(s["train"]).isdisjoint(s["val"]) and set(s["val"]).isdisjoint(s["test"])
    assert s == split_indices(100, 0.1, 0.2, seed=3) and s != split_indices(100, 0.1, 0.2, seed=4)
    with pytest.raises(ValueError, match="data.val_fraction"):
        split_indices(10, 0.7, 0.6, 0)


def test_demo_batches_carry_float_lr():
    dm = GPSRDataModule(size=32, scale=4, batch_size=4, demo_count=24)
    batch = next(iter(dm.train_dataloader()))
    hr, lr = batch["hr"], batch["lr"]
    assert hr.shape == (4, 3, 32, 32) and lr.shape == (4, 3, 8, 8)
    assert hr.min() >= -1 and hr.max() <= 1
    # HR lies on 8-bit levels; LR is the exact float degradation (not rounded).
    levels = (hr + 1) * 127.5
    assert torch.allclose(levels, levels.round(), atol=1e-4)
    assert torch.allclose(lr, ops.degrade(hr, 4), atol=1e-6)
    assert not torch.allclose(lr * 127.5, (lr * 127.5).round(), atol=1e-3)


def test_training_flips_and_evaluation_does_not():
    tiles = demo_splits(32, 4.0, n_val=2, n_test=2).test
    train = ImageDataset(tiles, 32, 4, flip=True)
    torch.manual_seed(0)
    views = {tuple(train[0]["hr"][0, 0, :4].tolist()) for _ in range(20)}
    assert len(views) == 2
    dm = GPSRDataModule(size=32, scale=4, batch_size=4, demo_count=24)
    test = dm.dataset("test")
    for i in range(len(test)):  # evaluation images are exactly the held-out tiles, unflipped
        assert torch.equal(test[i]["hr"], dm.items["test"][i].float() / 127.5 - 1)
    # The training split without flips (latent statistics) is the fixed grid of tiles.
    stats = dm.dataset("train", flip=False)
    assert len(stats) == len(dm.items["train"])
    assert torch.equal(stats[3]["hr"], dm.items["train"][3].float() / 127.5 - 1)


def test_folder_resizes_crops_and_splits(tmp_path):
    root = _write_photos(tmp_path / "imgs", n=10)
    dm = GPSRDataModule(
        source="folder",
        root=str(root),
        size=64,
        scale=8,
        batch_size=2,
        val_fraction=0.2,
        test_fraction=0.2,
    )
    dm.setup()
    assert [len(dm.items[k]) for k in ("train", "val", "test")] == [6, 2, 2]
    item = dm.dataset("test")[0]
    assert item["hr"].shape == (3, 64, 64) and item["lr"].shape == (3, 8, 8)
    # Explicit per-split roots override the fractions.
    dm2 = GPSRDataModule(
        source="folder", train_root=str(root), test_root=str(root), size=64, scale=8
    )
    dm2.setup()
    assert len(dm2.items["test"]) == 10 and len(dm2.items["train"]) == 10


def test_cache_gives_identical_items(tmp_path):
    root = _write_photos(tmp_path / "imgs", n=4)
    kw = dict(
        source="folder", root=str(root), size=64, scale=8, val_fraction=0.0, test_fraction=0.5
    )
    a, b = GPSRDataModule(**kw), GPSRDataModule(cache=True, **kw)
    assert torch.equal(a.dataset("test")[1]["hr"], b.dataset("test")[1]["hr"])


def test_missing_and_empty_roots(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data.root=.*nowhere does not exist"):
        GPSRDataModule(source="folder", root=str(tmp_path / "nowhere"), size=64, scale=8).setup()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    with pytest.raises(FileNotFoundError, match="no images"):
        GPSRDataModule(source="folder", root=str(tmp_path / "empty"), size=64, scale=8).setup()
    with pytest.raises(ValueError, match="data.root is not set"):
        GPSRDataModule(source="folder", size=64, scale=8)


def test_bad_size_for_scale():
    with pytest.raises(ValueError, match="data.size=60"):
        GPSRDataModule(size=60, scale=8)


def test_corrupt_and_truncated_files(tmp_path, caplog):
    root = _write_photos(tmp_path / "imgs", n=4)
    (root / "garbage.png").write_bytes(b"this is not a png at all")
    good = (root / "img0.png").read_bytes()
    (root / "truncated.png").write_bytes(good[: len(good) // 2])
    kw = dict(
        source="folder", root=str(root), size=64, scale=8, val_fraction=0.0, test_fraction=1.0
    )
    with pytest.raises(ImageFileError, match=r"garbage\.png.*data.skip_corrupt=true"):
        GPSRDataModule(**kw).setup()
    # Skipping: the garbage and the truncated file (valid header, cut short) are both left
    # out at the scan before any training, with a warning each, and the split counts the rest.
    dm = GPSRDataModule(skip_corrupt=True, **kw)
    with caplog.at_level(logging.WARNING):
        dm.setup()
    names = [p.name for p in dm.items["test"]]
    assert "garbage.png" not in names and "truncated.png" not in names and len(names) == 4
    assert "garbage.png" in caplog.text and "truncated.png: truncated" in caplog.text
    (root / "garbage.png").unlink()
    with pytest.raises(ImageFileError, match=r"truncated\.png: truncated.*skip_corrupt=true"):
        GPSRDataModule(**kw).setup()
    # A file whose pixels are damaged but whose ending is intact is found when decoded.
    data = bytearray(good)
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    (root / "truncated.png").write_bytes(bytes(data))
    strict = GPSRDataModule(**kw)
    strict.setup()
    index = [p.name for p in strict.items["test"]].index("truncated.png")
    with pytest.raises(ImageFileError, match=r"truncated\.png.*cannot be decoded"):
        strict.dataset("test")[index]


def test_too_small_image(tmp_path):
    root = _write_photos(tmp_path / "imgs", n=2)
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(root / "tiny.png")
    kw = dict(
        source="folder", root=str(root), size=64, scale=8, val_fraction=0.0, test_fraction=1.0
    )
    with pytest.raises(ImageFileError, match=r"tiny\.png is 50x40, smaller than data.size=64"):
        GPSRDataModule(**kw).setup()
    dm = GPSRDataModule(skip_small=True, **kw)
    dm.setup()
    assert len(dm.items["test"]) == 2


def test_mode_conversions(tmp_path):
    rgb = skimage.data.astronaut()[:70, :70]
    grey = skimage.data.camera()[:70, :70]
    Image.fromarray(grey).save(tmp_path / "grey.png")
    Image.fromarray(np.dstack([rgb, np.full((70, 70), 7, np.uint8)])).save(tmp_path / "rgba.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "grey16.png")
    Image.fromarray(rgb).convert("P").save(tmp_path / "palette.png")
    g = decode_rgb(tmp_path / "grey.png")
    assert (
        g.shape == (3, 70, 70)
        and torch.equal(g[0], g[2])
        and torch.equal(g[0], torch.from_numpy(grey))
    )
    a = decode_rgb(tmp_path / "rgba.png")
    assert torch.equal(a, torch.from_numpy(rgb).permute(2, 0, 1))  # alpha dropped, colour kept
    g16 = decode_rgb(tmp_path / "grey16.png")
    assert torch.equal(g16[1], torch.from_numpy(grey))  # 16-bit scaled, not clipped to 255
    assert decode_rgb(tmp_path / "palette.png").shape == (3, 70, 70)
    dm = GPSRDataModule(
        source="folder", root=str(tmp_path), size=64, scale=8, val_fraction=0, test_fraction=1.0
    )
    assert len(dm.dataset("test")) == 4


def test_empty_split_and_too_few_for_a_batch():
    dm = GPSRDataModule(size=32, scale=4, demo_count=10, demo_val=0, batch_size=64)
    with pytest.raises(ValueError, match="the val split is empty: raise data.demo_val"):
        dm.dataset("val")
    with pytest.raises(ValueError, match="lower data.batch_size"):
        dm.train_dataloader()


def test_random_crop_serves_full_resolution_patches_of_large_photos(tmp_path):
    """data.crop=random: training patches are windows of the original pixels (never
    resized; flipped or not), different at every draw; evaluation takes the centre window."""
    folder = tmp_path / "large"
    folder.mkdir()
    photos = [skimage.data.astronaut()[100:196, 100:228], skimage.data.coffee()[:88, :120]]
    for i, p in enumerate(photos):
        Image.fromarray(p).save(folder / f"p{i}.png")
    full = [torch.from_numpy(p.copy()).permute(2, 0, 1) for p in photos]
    for cache in (False, True):
        dm = GPSRDataModule(
            source="folder", root=str(folder), size=32, scale=4, crop="random",
            val_fraction=0.0, test_fraction=0.5, split_seed=0, batch_size=1, cache=cache,
        )  # fmt: skip
        train = dm.dataset("train")
        torch.manual_seed(0)
        seen = set()
        for _ in range(4):
            item = train[0]
            hr = ((item["hr"] + 1) * 127.5).round().to(torch.uint8)
            hits = _locate(hr, full) + _locate(hr, [f.flip(-1) for f in full])
            assert hits, "a training patch is not a window of a photo at full resolution"
            seen.add(hits[0])
            assert torch.allclose(item["lr"], ops.degrade(item["hr"][None], 4)[0])
        assert len(seen) > 1  # a new position at every draw
        test = dm.dataset("test")
        item = ((test[0]["hr"] + 1) * 127.5).round().to(torch.uint8)
        centres = [
            f[:, (f.shape[1] - 32) // 2 :][:, :32, (f.shape[2] - 32) // 2 :][:, :, :32]
            for f in full
        ]
        assert any(torch.equal(item, c) for c in centres)


def test_crop_setting_is_checked():
    with pytest.raises(ValueError, match="data.crop"):
        GPSRDataModule(source="demo", size=32, scale=4, crop="zoom")


def test_skip_corrupt_leaves_bad_files_out_of_evaluation(tmp_path):
    """A file whose pixels are damaged (its ending intact) is left out of the test split,
    not replaced by a copy of another image: the count is the number of good files."""
    root = _write_photos(tmp_path / "imgs", n=4)
    data = bytearray((root / "img0.png").read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    (root / "damaged.png").write_bytes(bytes(data))
    dm = GPSRDataModule(
        source="folder", root=str(root), size=64, scale=8, val_fraction=0.0, test_fraction=1.0,
        skip_corrupt=True,
    )  # fmt: skip
    names = sorted(p.name for p in dm.dataset("test").items)
    assert names == ["img0.png", "img1.jpg", "img2.webp", "img3.png"]
    assert len(dm.test_dataloader().dataset) == 4


def test_the_heldout_pool_at_a_larger_zoom_shows_only_the_held_out_strip():
    """data.demo_heldout_zoom: every pool tile lies inside the fraction of its photo that the
    zoom-4 strip holds out (so no tile shows a training pixel), the tiles are the photo's
    own pixels there, and validation and test share no tile."""
    from gpsr.data.demo import demo_photos, demo_splits, heldout_pool

    small, big = demo_photos(32, 4.0), demo_photos(32, 8.0)
    pool = heldout_pool(32, 4.0, 8.0)
    for s, b, tiles in zip(small, big, pool):
        axis = -1 if s.shape[-1] >= s.shape[-2] else -2
        m = tiles.shape[0] // (b.shape[-2 if axis == -1 else -1] // 32)
        start = b.shape[axis] - m * 32
        assert start / b.shape[axis] >= 1 - 32 / s.shape[axis]  # inside the held-out fraction
        assert m >= 1
        first = b[:, :32, start : start + 32] if axis == -1 else b[:, start : start + 32, :32]
        assert torch.equal(tiles[0], first)
    splits = demo_splits(32, 4.0, n_val=96, n_test=32, heldout_zoom=8.0)
    assert len(splits.val) == 96 and len(splits.test) == 32
    # Every pool tile in exactly one split (as multisets: two tiles of black sky are equal).
    flat = lambda tiles: sorted(x.numpy().tobytes() for x in tiles)  # noqa: E731
    assert sorted(flat(splits.val) + flat(splits.test)) == flat(torch.cat(pool))
    default = demo_splits(32, 4.0)
    assert all(torch.equal(a, b) for a, b in zip(default.regions, splits.regions))
