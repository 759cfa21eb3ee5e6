"""Reliability: no user file is ever overwritten, resume takes the newest good checkpoint,
logs continue, and every bad input or setting is one line naming it."""

import contextlib
import logging
import os
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from gpsr.utils.checkpoint import atomic_save, checkpoint_digest, find_last_checkpoint
from gpsr.utils.errors import ConfigError, GPSRError, OutputError
from tests.helpers import compose_cfg, run_cli


def _png(path: Path, size=(4, 4), seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype("uint8")).save(path)


def _bomb(path: Path, side: int = 60000):
    """A PNG whose header claims side x side pixels (no pixel data is needed to open it)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def _sample_cfg(**kw):
    base = {
        "ckpt": "/nonexistent/model.ckpt",  # planning must fail before the model loads
        "input": None,
        "output": None,
        "sampler": {
            "steps": 2,
            "eta": 1.0,
            "samples": 1,
            "project": False,
            "spacing": "linspace",
        },  # fmt: skip
        "save_float": False,
        "overwrite": False,
        "seed": 0,
        "device": "cpu",
        "ema": True,
    }
    base.update(kw)
    return OmegaConf.create(base)


# ------------------------------------------------------------------ gpsr.sample: no data loss
def test_sample_never_overwrites_collides_or_reads_its_own_output(tmp_path):
    from gpsr.sample import check_plan, plan_outputs, sample_images

    d = tmp_path / "d"
    d.mkdir()
    for name in ("cat.png", "cat.jpg", "dog.png"):
        _png(d / name)
    _png(d / "dog_sr.png", seed=9)
    before = (d / "dog_sr.png").read_bytes()
    # Same folder: dog.png's output is the user's dog_sr.png -> refused before loading.
    with pytest.raises(ConfigError, match="dog_sr.png already exists.*overwrite=true"):
        sample_images(_sample_cfg(input=str(d), output=str(d)))
    # Even with overwrite=true an input is never replaced by an output.
    with pytest.raises(ConfigError, match="dog_sr.png of .*dog.png is itself an input"):
        sample_images(_sample_cfg(input=str(d), output=str(d), overwrite=True))
    assert (d / "dog_sr.png").read_bytes() == before
    # cat.png and cat.jpg get distinct names; nothing collides.
    plan = plan_outputs(sorted(d.iterdir()), tmp_path / "out", samples=2, save_float=True)
    names = [o.name for outs in plan.values() for o in outs]
    assert len(names) == len(set(names))
    assert "cat_png_sr0.png" in names and "cat_jpg_sr1.npy" in names and "dog_std.png" in names
    check_plan(plan, overwrite=False)  # a fresh folder: fine
    (tmp_path / "out").mkdir()
    _png(tmp_path / "out" / "cat_jpg_sr1.png")
    with pytest.raises(ConfigError, match="cat_jpg_sr1.png already exists"):
        check_plan(plan, overwrite=False)
    check_plan(plan, overwrite=True)


def test_sample_checks_the_output_before_loading(tmp_path):
    from gpsr.sample import sample_images

    _png(tmp_path / "a.png")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        sample_images(_sample_cfg(input=str(tmp_path / "a.png"), output=str(tmp_path / "file")))
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(OutputError, match="not writable"):
            sample_images(_sample_cfg(input=str(tmp_path / "a.png"), output=str(ro / "x")))


@pytest.mark.slow
def test_sample_folder_goes_on_past_bad_files(tmp_path, ddpm_ckpt):
    lr = tmp_path / "lr"
    lr.mkdir()
    _png(lr / "good.png", size=(4, 4))
    _png(lr / "tiny.png", size=(1, 1))  # fine for this 8x model: its latent is 4 x 4
    _bomb(lr / "bomb.png")
    (lr / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (lr / "notes.txt").write_text("not an image")
    proc = run_cli(
        "sample",
        f"ckpt={ddpm_ckpt}",
        f"input={lr}",
        f"output={tmp_path / 'sr'}",
        "sampler.steps=2",
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    err = [line for line in proc.stderr.splitlines() if line.startswith("skipped:")]
    assert len(err) == 3, err
    assert any("bomb.png" in line and "decompression bomb" in line for line in err)
    assert any("broken.png" in line for line in err) and any("notes.txt" in line for line in err)
    assert "Traceback" not in proc.stderr
    assert (tmp_path / "sr" / "good_sr.png").is_file() and (
        tmp_path / "sr" / "tiny_sr.png"
    ).is_file()


def test_too_small_lr_images_are_refused_by_name_for_a_4x_model():
    """The 4x demo model: a 1 x 1 LR image would leave its UNet a 1 x 1 map (GroupNorm fails
    deep in torch); the size rule refuses it with the size and the minimum instead."""
    from gpsr.diffusion import GaussianDiffusion
    from gpsr.inference import GPSR
    from gpsr.models.stats import LatentStats
    from gpsr.models.unet import UNet
    from tests.helpers import SMALL_UNET, tiny_flow

    flow = tiny_flow(scale=4)
    unet = UNet(**{**SMALL_UNET, "in_channels": 12, "out_channels": 9})
    stats = LatentStats(9)
    stats.ready.fill_(True)
    model = GPSR(flow, unet, GaussianDiffusion(), stats)
    assert model.lr_size_rule() == (1, 2)
    with pytest.raises(ConfigError, match="LR images of 1x1: this model needs sides of at least 2"):
        model.super_resolve(torch.rand(1, 3, 1, 1), steps=2)
    assert model.super_resolve(torch.rand(1, 3, 2, 2), steps=2).shape == (1, 3, 8, 8)


# ------------------------------------------------------------------ data: decompression bomb
def test_decompression_bomb_is_one_line_or_skipped(tmp_path, caplog):
    from gpsr.data import GPSRDataModule, ImageFileError

    for i in range(3):
        _png(tmp_path / f"ok{i}.png", size=(40, 40), seed=i)
    _bomb(tmp_path / "bomb.png")
    with pytest.raises(ImageFileError, match="bomb.png: refused as a decompression bomb"):
        GPSRDataModule(source="folder", root=str(tmp_path), size=32, scale=4).setup()
    dm = GPSRDataModule(
        source="folder",
        root=str(tmp_path),
        size=32,
        scale=4,
        skip_corrupt=True,
        val_fraction=0,
        test_fraction=0,
        batch_size=1,
    )
    assert len(dm.dataset("train")) == 3 and "bomb.png" in caplog.text


# ------------------------------------------------------------------ resume
def _sealed(path: Path, step: int):
    ckpt = {"gpsr": {"stage": "flow", "scale": 8, "version": 2}, "global_step": step}
    ckpt["gpsr"]["sha256"] = checkpoint_digest(ckpt)
    atomic_save(ckpt, path)


def test_resume_takes_the_newest_checkpoint_that_verifies(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    _sealed(folder / "step0000100.ckpt", 100)
    _sealed(folder / "last.ckpt", 100)
    _sealed(folder / "step0000150.ckpt", 150)  # then kill -9 while last.ckpt was rewritten:
    (folder / ".last.ckpt.abc123.tmp").write_bytes(b"")
    t = 1_700_000_000
    for name, age in (("step0000100.ckpt", 0), ("last.ckpt", 1), ("step0000150.ckpt", 2)):
        os.utime(folder / name, (t + age, t + age))
    assert find_last_checkpoint(tmp_path) == folder / "step0000150.ckpt"
    assert not list(folder.glob("*.tmp"))  # leftovers of the killed save are gone
    # A damaged newest file is passed over.
    (folder / "step0000200.ckpt").write_bytes(b"truncated")
    os.utime(folder / "step0000200.ckpt", (t + 3, t + 3))
    assert find_last_checkpoint(tmp_path) == folder / "step0000150.ckpt"
    assert find_last_checkpoint(tmp_path / "nothing") is None


def test_csv_history_continues_after_resume(tmp_path):
    import csv

    from gpsr.utils.loggers import ResumableCSVLogger

    first = ResumableCSVLogger(str(tmp_path), name="csv", version="")
    first.log_metrics({"train/loss": 1.0}, step=0)
    first.save()
    second = ResumableCSVLogger(str(tmp_path), name="csv", version="")
    second.log_metrics({"train/loss": 0.5, "val/psnr": 20.0}, step=10)
    second.save()
    rows = list(csv.DictReader(open(tmp_path / "csv" / "metrics.csv")))
    assert [r["step"] for r in rows] == ["0", "10"]
    assert rows[0]["train/loss"] == "1.0" and rows[1]["val/psnr"] == "20.0"
    # Resumed from a checkpoint at step 5: the rows the stopped run logged from step 5 on
    # (here step 10) are dropped; earlier ones stay.
    third = ResumableCSVLogger(str(tmp_path), name="csv", version="")
    third.log_metrics({"train/loss": 0.7}, step=7)  # buffered, not yet written
    third.resume_at(5)
    third.log_metrics({"train/loss": 0.6}, step=5)
    third.save()
    rows = list(csv.DictReader(open(tmp_path / "csv" / "metrics.csv")))
    assert [r["step"] for r in rows] == ["0", "5"] and rows[1]["train/loss"] == "0.6"
    assert "val/psnr" in rows[0]  # the header keeps every column


def test_a_fresh_start_begins_a_fresh_history(tmp_path):
    """A run killed before its first checkpoint left rows in metrics.csv and a W&B run id;
    started again with ckpt_path=auto there is nothing to resume, so the new run is a new
    history: none of the killed run's rows stay (they would repeat its first steps), and the
    W&B run id is not reused."""
    import csv

    from gpsr.train import train
    from tests.helpers import FAST

    out = tmp_path / "run"
    (out / "csv").mkdir(parents=True)
    with open(out / "csv" / "metrics.csv", "w", newline="") as fh:
        fh.write("step,train/loss\n0,12345.0\n1,12345.0\n")
    (out / "wandb_run_id.txt").write_text("killedrun01")
    train(compose_cfg(["stage=flow", "logger=csv", "ckpt_path=auto", *FAST], output_dir=out))
    rows = list(csv.DictReader(open(out / "csv" / "metrics.csv")))
    assert rows and all(r["train/loss"] != "12345.0" for r in rows)
    steps = [int(r["step"]) for r in rows if r.get("train/loss")]
    assert steps == sorted(set(steps))  # one row per logged step
    assert not (out / "wandb_run_id.txt").exists()


# ------------------------------------------------------------------ errors: by type, not path
def test_errors_are_classified_by_type_not_by_path(tmp_path, monkeypatch, capsys, caplog):
    from gpsr.utils.cli import report_errors

    fake = tmp_path / "clone" / "gpsr" / ".venv" / "site-packages"
    fake.mkdir(parents=True)
    (fake / "thirdparty.py").write_text("def boom():\n    raise ValueError('deep inside torch')\n")
    monkeypatch.syspath_prepend(str(fake))
    import thirdparty

    @report_errors
    def entry(kind):
        if kind == "ours":
            raise ConfigError("data.batch_size must be a positive integer, got -1")
        if kind == "wrapped":
            try:
                raise ConfigError("data.size=31 is not a multiple of scale=8")
            except ConfigError as err:
                raise RuntimeError("hydra wrapped it") from err
        thirdparty.boom()

    for kind, line in (("ours", "data.batch_size"), ("wrapped", "data.size=31")):
        with pytest.raises(SystemExit) as exit_info:
            entry(kind)
        assert exit_info.value.code == 1
        assert capsys.readouterr().err.strip() == f"gpsr: error: {line}" + (
            " must be a positive integer, got -1"
            if kind == "ours"
            else " is not a multiple of scale=8"
        )
    # Not ours: the traceback, logged once (Hydra, which would print it again, never sees
    # it), then exit status 1; GPSR_DEBUG=1 hands the exception itself to Hydra instead.
    with caplog.at_level(logging.ERROR, logger="gpsr"):
        with pytest.raises(SystemExit) as exit_info:
            entry("theirs")
    assert exit_info.value.code == 1
    tracebacks = [r.getMessage() for r in caplog.records if "Traceback" in r.getMessage()]
    assert len(tracebacks) == 1 and "deep inside torch" in tracebacks[0]
    assert "Traceback" not in capsys.readouterr().err
    monkeypatch.setenv("GPSR_DEBUG", "1")
    with pytest.raises(ValueError, match="deep inside torch"):
        entry("theirs")
    assert issubclass(ConfigError, ValueError) and issubclass(OutputError, GPSRError)


def test_bad_batch_sizes_name_the_setting():
    from gpsr.data import GPSRDataModule

    for kw, name in (
        ({"batch_size": -1}, "data.batch_size"),
        ({"eval_batch_size": 0}, "data.eval_batch_size"),
        ({"num_workers": -2}, "data.num_workers"),
    ):
        with pytest.raises(ConfigError, match=name):
            GPSRDataModule(size=32, scale=4, **kw)


# ------------------------------------------------------------------ the paper's configs
def test_paper_ddpm_keeps_bf16_and_its_global_batch_under_ddp_and_slurm():
    for extra, per_device in (
        (["trainer=ddp", "trainer.devices=8"], 32),
        (["trainer=slurm", "trainer.devices=8", "trainer.num_nodes=2"], 16),
        (["trainer.accumulate_grad_batches=4"], 64),
    ):
        cfg = compose_cfg(["experiment=ffhq128_8x_ddpm", *extra], output_dir="/tmp/x")
        assert cfg.trainer.precision == "bf16-mixed"
        assert cfg.data.batch_size == per_device
        world = cfg.trainer.devices * cfg.trainer.num_nodes * cfg.trainer.accumulate_grad_batches
        assert cfg.data.batch_size * world == cfg.global_batch_size == 256
    cfg = compose_cfg(
        ["experiment=ffhq128_8x_flow", "trainer=ddp", "trainer.devices=2"], output_dir="/tmp/x"
    )
    assert cfg.trainer.precision == "bf16-mixed" and cfg.data.batch_size == 8
    cfg = compose_cfg(
        ["experiment=ffhq128_8x_ddpm", "trainer=ddp", "trainer.devices=3"], output_dir="/tmp/x"
    )
    with pytest.raises(Exception) as info:
        _ = cfg.data.batch_size
    assert "does not split evenly over 3 device(s)" in str(info.value)


@pytest.mark.slow
def test_paper_flow_experiment_without_test_split_exits_cleanly(tmp_path):
    data = tmp_path / "ffhq"
    data.mkdir()
    for i in range(6):
        _png(data / f"{i}.png", size=(40, 40), seed=i)
    proc = run_cli(
        "train",
        "experiment=ffhq128_8x_flow",
        f"data.root={data}",
        "data.size=32",
        "data.val_fraction=0.34",
        "data.num_workers=0",
        "data.pin_memory=false",
        "data.cache=false",
        "model/flow=small",
        "trainer.accelerator=cpu",
        "trainer.precision=32-true",
        "global_batch_size=2",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "speed=auto",
        "stage.module.optimizer.fused=false",
        "logger=csv",
        "trainer.enable_progress_bar=false",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert "no test split" in proc.stdout + proc.stderr
    assert (tmp_path / "run" / "metrics.json").is_file()


# ------------------------------------------------------------------ evaluation corner cases
@pytest.mark.slow
def test_evaluate_projects_flow_samples_when_steps_is_zero(tmp_path, ddpm_ckpt, flow_ckpt):
    import json

    run_cli(
        "evaluate",
        f"ckpt={ddpm_ckpt}",
        "sampler.project=true",
        "sampler.steps=0",
        "baselines=[bicubic]",
        "data.demo_test=2",
        "progress=false",
        f"hydra.run.dir={tmp_path / 'e'}",
        cwd=tmp_path,
    )
    methods = json.loads((tmp_path / "e" / "metrics.json").read_text())["methods"]
    assert set(methods) == {"bicubic", "flow", "flow_projected"}
    proc = run_cli(
        "train",
        "stage=ddpm",
        f"flow_ckpt={flow_ckpt}",
        f"ckpt_path={flow_ckpt}",
        "logger=none",
        "trainer.max_steps=1",
        f"hydra.run.dir={tmp_path / 't'}",
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 1 and f"checkpoint {flow_ckpt} is a 'flow' checkpoint" in proc.stderr


# ------------------------------------------------------------------ round 3
@contextlib.contextmanager
def _run_lock_held_elsewhere(path: Path):
    """Another process holds `path`'s run lock (`lock_run_dir`) while the block runs; it is
    killed with SIGKILL at the end (the kernel frees the lock)."""
    import subprocess
    import sys

    from tests.helpers import REPO

    holder = subprocess.Popen(
        [
            sys.executable, "-c",
            "import sys, time; from gpsr.utils.cli import lock_run_dir; "
            "lock_run_dir(sys.argv[1]); print('locked', flush=True); time.sleep(120)",
            str(path),
        ],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield
    finally:
        holder.kill()
        holder.wait()


def test_a_run_folder_is_held_by_one_run_and_freed_when_it_dies(tmp_path):
    """A second run into the same folder is refused in one line while the first lives; a
    SIGKILLed run leaves nothing locked."""
    import time

    from gpsr.train import train
    from gpsr.utils.cli import lock_run_dir
    from tests.helpers import FAST, compose_cfg

    with _run_lock_held_elsewhere(tmp_path):
        cfg = compose_cfg(["stage=flow", "logger=csv", *FAST], output_dir=tmp_path)
        with pytest.raises(OutputError, match=r"in use by another gpsr run \(pid \d+\)"):
            train(cfg)
        assert not (tmp_path / "checkpoints").exists()
        # From the command line it is refused before Hydra writes the run's record, so the
        # running run's .hydra/config.yaml survives.
        (tmp_path / ".hydra").mkdir()
        (tmp_path / ".hydra" / "config.yaml").write_text("the running run's settings\n")
        proc = run_cli(
            "train", "stage=flow", "logger=csv", f"hydra.run.dir={tmp_path}", cwd=tmp_path,
            check=False,
        )  # fmt: skip
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert "in use by another gpsr run (pid" in proc.stderr
        assert (tmp_path / ".hydra" / "config.yaml").read_text() == "the running run's settings\n"
    time.sleep(0.1)
    lock_run_dir(tmp_path)  # free again


def test_preflight_leaves_a_runs_other_processes_to_it(tmp_path, monkeypatch):
    """DDP ranks start with the run's own command and hydra.run.dir while its first process
    holds the lock: preflight refuses a second run, never the run's other ranks."""
    from gpsr.utils.cli import preflight

    with _run_lock_held_elsewhere(tmp_path):
        with pytest.raises(SystemExit):
            preflight([f"hydra.run.dir={tmp_path}"])  # a second run
        monkeypatch.setenv("LOCAL_RANK", "1")
        preflight([f"hydra.run.dir={tmp_path}"])  # the run's rank 1: goes on


@pytest.mark.parametrize(
    "setting,value,message",
    [
        ("samples", 0, "sampler.samples must be an integer >= 1, got 0"),
        ("steps", -3, "sampler.steps must be an integer >= 0, got -3"),
        ("eta", -1.0, "sampler.eta must be a number >= 0"),
        ("spacing", "log", "sampler.spacing must be one of linspace, trailing"),
        ("tile_overlap", -1, "sampler.tile_overlap must be 0 or more"),
        ("tile_final_overlap", "half", "sampler.tile_final_overlap must be 0 or more"),
        ("sigma_y", -2, "sampler.sigma_y must be the LR noise std >= 0"),
        ("sigma_y", "guess", "sampler.sigma_y must be the LR noise std >= 0"),
    ],
)
def test_sample_checks_its_settings_by_name_before_loading(tmp_path, setting, value, message):
    from gpsr.sample import sample_images

    _png(tmp_path / "a.png")
    sampler = {"steps": 2, "eta": 1.0, "samples": 1, "project": False, "spacing": "linspace"}
    sampler[setting] = value
    cfg = _sample_cfg(input=str(tmp_path / "a.png"), output=str(tmp_path / "o"), sampler=sampler)
    with pytest.raises(ConfigError, match=re.escape(message)):
        sample_images(cfg)  # the checkpoint does not exist: refused before loading


def test_a_flow_checkpoint_given_to_sample_says_so(tmp_path, flow_ckpt, caplog):
    from gpsr.sample import sample_images

    _png(tmp_path / "a.png", size=(8, 8))
    sampler = {"steps": 2, "eta": 1.0, "samples": 1, "project": False, "spacing": "linspace"}
    cfg = _sample_cfg(
        ckpt=str(flow_ckpt), input=str(tmp_path / "a.png"), output=str(tmp_path / "o"),
        sampler=sampler,
    )  # fmt: skip
    with caplog.at_level("WARNING"):
        assert sample_images(cfg) == 0
    notes = [r.message for r in caplog.records if "flow-stage checkpoint" in r.message]
    assert len(notes) == 1 and "sampler.steps=2 ignored" in notes[0]
    assert (tmp_path / "o" / "a_sr.png").is_file()


def test_truncated_jpeg_is_found_before_training_and_worker_errors_are_one_line(tmp_path):
    from torch.utils.data import DataLoader, Dataset

    from gpsr.data import GPSRDataModule
    from gpsr.data.images import ImageFileError
    from gpsr.utils.cli import one_line

    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(3):
        Image.fromarray((np.random.default_rng(i).random((40, 40, 3)) * 255).astype(np.uint8)).save(
            root / f"ok{i}.jpg"
        )
    whole = (root / "ok0.jpg").read_bytes()
    (root / "cut.jpg").write_bytes(whole[: len(whole) * 2 // 3])
    dm = GPSRDataModule(source="folder", root=str(root), size=32, scale=4, num_workers=2)
    with pytest.raises(ImageFileError, match=r"cut\.jpg: truncated.*data.skip_corrupt=true"):
        dm.setup()

    class Bad(Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            raise ImageFileError(f"{root / 'cut.jpg'}: cannot be decoded (image file is truncated)")

    with pytest.raises(ImageFileError) as info:
        next(iter(DataLoader(Bad(), num_workers=1)))
    assert "Original Traceback" in str(info.value)  # what torch hands back from a worker
    assert (
        one_line(info.value) == f"{root / 'cut.jpg'}: cannot be decoded (image file is truncated)"
    )


def _raised_while_handling(outer: Exception, inner: OSError) -> Exception:
    """`outer` raised while `inner` was handled (it sits in outer's __context__), as torch's
    zip writer reports a full disk: "unexpected pos ..." with the ENOSPC behind it."""
    try:
        try:
            raise inner
        except OSError:
            raise outer  # noqa: B904 - the OSError stays in outer's __context__
    except Exception as err:  # noqa: BLE001
        return err


@pytest.mark.parametrize(
    "failure,message",
    [
        (OSError(28, "No space left on device"), "no space left"),
        (RuntimeError("[enforce fail] file write failed"), "no space left"),
        (
            _raised_while_handling(
                RuntimeError("unexpected pos 64 vs 0"), OSError(28, "No space left on device")
            ),
            "no space left",
        ),
        (
            _raised_while_handling(
                RuntimeError("unexpected pos 0 vs 8"), OSError(30, "Read-only file system")
            ),
            "Read-only file system",
        ),
    ],
    ids=["enospc", "write-failed", "enospc-in-context", "read-only-in-context"],
)
def test_disk_full_while_saving_is_one_line_and_leaves_no_partial_file(
    tmp_path, monkeypatch, failure, message
):
    def full(obj, fh):
        fh.write(b"partial")
        raise failure

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OutputError, match=rf"cannot write checkpoint .*last.ckpt: {message}"):
        atomic_save({"x": 1}, tmp_path / "last.ckpt")
    assert list(tmp_path.iterdir()) == []


def test_sample_writes_each_image_whole_or_not_at_all(tmp_path, ddpm_ckpt, monkeypatch, capsys):
    """A full disk in the middle of an image's outputs (its third file): nothing of that
    image is left (no partial file, no temporary file, no complete sibling that would block
    a rerun), one line names it, and the next image is written once space is back."""
    from PIL import Image as PILImage

    from gpsr.sample import sample_images

    src = tmp_path / "in"
    src.mkdir()
    _png(src / "a.png", size=(4, 4))
    _png(src / "b.png", size=(4, 4), seed=1)
    save, calls = PILImage.Image.save, []

    def flaky(self, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) == 3:  # a.png's std map, after its two samples
            fp.write(b"partial")
            raise _raised_while_handling(OSError("write error"), OSError(28, "No space left"))
        return save(self, fp, *args, **kwargs)

    monkeypatch.setattr(PILImage.Image, "save", flaky)
    sampler = {"steps": 1, "eta": 1.0, "samples": 2, "project": False, "spacing": "linspace"}
    out = tmp_path / "o"
    cfg = _sample_cfg(
        ckpt=str(ddpm_ckpt), input=str(src), output=str(out), sampler=sampler, save_float=True
    )
    assert sample_images(cfg) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a.png" in err[0] and "no space left" in err[0]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"b_{kind}" for kind in ("sr0.png", "sr1.png", "std.png", "sr0.npy", "sr1.npy", "std.npy")
    )
    assert np.load(out / "b_sr1.npy").shape == (32, 32, 3)
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "b_sr0.png").stat().st_mode & 0o777 == 0o666 & ~umask  # as open() makes it


def test_convert_checks_its_output_folder_before_converting(tmp_path, monkeypatch, capsys):
    from gpsr import convert as convert_module
    from gpsr.convert import convert
    from gpsr.utils.cli import report_errors

    monkeypatch.setattr(convert_module.torch, "load", lambda *a, **k: pytest.fail("read first"))
    (tmp_path / "release.pt").write_bytes(b"x")
    (tmp_path / "afile").write_text("in the way")
    cfg = compose_cfg(
        [f"release={tmp_path / 'release.pt'}", f"out={tmp_path / 'afile' / 'x.ckpt'}"],
        name="convert",
    )
    with pytest.raises(SystemExit):
        report_errors(convert)(cfg)
    err = capsys.readouterr().err
    assert "not writable" in err and "set out= to a writable place" in err


def test_an_image_too_large_without_tiling_is_one_line_and_the_rest_go_on(
    tmp_path, ddpm_ckpt, monkeypatch, capsys
):
    from gpsr.sample import sample_images

    src = tmp_path / "in"
    src.mkdir()
    _png(src / "big.png", size=(64, 64))  # 8x model: latent 256 x 256, global attention
    _png(src / "small.png", size=(4, 4))
    monkeypatch.setattr("gpsr.models.gpsr.available_memory", lambda device: 64 * 2**20)
    sampler = {
        "steps": 1, "eta": 1.0, "samples": 1, "project": False, "spacing": "linspace",
        "tile": None,
    }  # fmt: skip
    cfg = _sample_cfg(
        ckpt=str(ddpm_ckpt), input=str(src), output=str(tmp_path / "o"), sampler=sampler
    )
    assert sample_images(cfg) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"skipped: {src / 'big.png'}: ")
    assert "sampler.tile=auto" in err[0] and "GiB" in err[0]
    assert (tmp_path / "o" / "small_sr.png").is_file()


# ------------------------------------------------------------------ no silent garbage
def test_degradation_range_is_attained_by_the_image_that_follows_the_kernel_sign():
    """The largest (smallest) value D_s gives an image in [0, 1] comes from the image that is
    1 where an LR pixel's 2-D kernel is positive (negative) and 0 elsewhere: built here from
    F.interpolate's own weights, it reaches the range's ends, and random images stay inside."""
    from gpsr import ops

    for scale in (2, 8):
        low, high = ops.degradation_range(scale)
        n = 12 * scale
        eye = torch.eye(n, dtype=torch.float64)[:, None, None, :]  # rows of the 1-D factor
        a = torch.nn.functional.interpolate(
            eye.reshape(n, 1, 1, n), size=(1, n // scale), mode="bicubic", antialias=True,
            align_corners=False,
        )[:, 0, 0, :].T  # (n/s, n)  # fmt: skip
        kernel = a[5][:, None] * a[5][None, :]  # an interior LR pixel's weights over the HR
        ends = []
        for sign in (1, -1):
            x = (sign * kernel > 0).double()[None, None]
            ends.append(float(ops.degrade(x, scale)[0, 0, 5, 5]))
        assert abs(ends[0] - high) < 0.02 and abs(ends[1] - low) < 0.02
        assert ends[0] <= high + 1e-9 and ends[1] >= low - 1e-9
        rand = ops.degrade(torch.rand(4, 3, n, n, dtype=torch.float64), scale)
        assert low <= float(rand.min()) and float(rand.max()) <= high


def _tiny_gpsr():
    from gpsr.diffusion import GaussianDiffusion
    from gpsr.models.gpsr import GPSR
    from gpsr.models.stats import LatentStats
    from gpsr.models.unet import UNet
    from tests.helpers import SMALL_UNET, randomize_, tiny_flow

    unet = randomize_(UNet(in_channels=12, out_channels=9, **SMALL_UNET), std=0.02).eval()
    return GPSR(tiny_flow(scale=4), unet, GaussianDiffusion(1000, prediction="x0"), LatentStats(9))


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda lr: lr * 255, "max 2"),  # 0..255 pixels (a common mistake)
        (lambda lr: lr * 2 - 1, "min -0.89"),  # [-1, 1] pixels
        (lambda lr: lr.index_put_((torch.tensor([0]),) * 4, torch.tensor(float("nan"))), "NaN"),
    ],
    ids=["0-255", "signed", "nan"],
)
def test_super_resolve_refuses_values_no_image_can_give(make, message):
    model = _tiny_gpsr()
    lr = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.9 + 0.05
    model.super_resolve(lr, steps=1)  # in range: fine
    with pytest.raises(ConfigError, match="pass (finite )?images in \\[0, 1\\]") as err:
        model.super_resolve(make(lr.clone()), steps=1)
    assert message in str(err.value)


def test_non_finite_samples_are_never_returned():
    from gpsr.utils.errors import NonFiniteOutputError

    model = _tiny_gpsr()
    with torch.no_grad():
        next(model.unet.parameters()).fill_(float("nan"))
    with pytest.raises(NonFiniteOutputError, match=r"image\(s\) \[0, 1\]"):
        model.super_resolve(torch.rand(2, 3, 8, 8), steps=2)


@pytest.mark.slow
def test_sample_writes_no_image_for_a_model_that_gives_nan(tmp_path, ddpm_ckpt):
    """A checkpoint whose UNet yields NaN (re-sealed, so it loads): gpsr.sample writes no
    image, says so in one line naming the file, and exits with status 1."""
    ckpt = torch.load(ddpm_ckpt, map_location="cpu", weights_only=True)
    key = next(k for k in ckpt["state_dict"] if k.startswith("ema.module.") and "weight" in k)
    ckpt["state_dict"][key] = torch.full_like(ckpt["state_dict"][key], float("nan"))
    ckpt["gpsr"]["sha256"] = checkpoint_digest(ckpt)
    bad = tmp_path / "nan.ckpt"
    atomic_save(ckpt, bad)
    src = tmp_path / "in"
    src.mkdir()
    _png(src / "a.png", size=(8, 8))
    out = tmp_path / "out"
    proc = run_cli(
        "sample", f"ckpt={bad}", f"input={src}", f"output={out}", "sampler.steps=2",
        f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, check=False,
    )  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "a.png" in proc.stderr and "NaN or infinite values" in proc.stderr
    assert not list(out.glob("*")) if out.exists() else True


def _bad_checkpoints(folder: Path, marker: Path, good: Path) -> dict[str, Path]:
    """Files a user may pass as a checkpoint by mistake or malice: empty, text, random
    bytes, a truncated real checkpoint, a pickle whose loading would run code (it touches
    `marker`), a folder."""
    import os

    class Hostile:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    files = {
        name: folder / f"{name}.ckpt" for name in ("empty", "text", "random", "cut", "hostile")
    }
    files["empty"].write_bytes(b"")
    files["text"].write_text("step=4\n")
    files["random"].write_bytes(np.random.default_rng(0).bytes(4096))
    data = good.read_bytes()
    files["cut"].write_bytes(data[: len(data) // 2])
    torch.save({"global_step": 8, "payload": Hostile()}, files["hostile"])
    (folder / "a_folder.ckpt").mkdir()
    files["folder"] = folder / "a_folder.ckpt"
    return files


@pytest.mark.parametrize("kind", ["empty", "text", "random", "cut", "hostile", "folder"])
def test_train_refuses_a_bad_resume_checkpoint_in_one_line(tmp_path, flow_ckpt, kind):
    """`gpsr.train ckpt_path=<file>` reads the step before Lightning loads the file: a bad
    file is one CheckpointError saying what it is (never torch's advice to load it unsafely),
    and a hostile pickle's code never runs."""
    from gpsr.train import train
    from gpsr.utils.checkpoint import CheckpointError

    marker = tmp_path / "ran"
    bad = _bad_checkpoints(tmp_path, marker, flow_ckpt)[kind]
    cfg = compose_cfg(["stage=flow", "logger=none", f"ckpt_path={bad}"], output_dir=tmp_path / "r")
    with pytest.raises(GPSRError) as err:
        train(cfg)
    text = str(err.value)
    assert str(bad) in text and "weights_only` set to `False" not in text
    expect = {
        "hostile": "refused by the safe loader",
        "random": "not a readable checkpoint",
        "folder": "is a folder",
    }.get(kind, "truncated, damaged or not a checkpoint")
    assert expect in text
    assert isinstance(err.value, CheckpointError) or kind == "folder"
    assert not marker.exists()


def test_decompression_bomb_is_refused_at_the_stated_limit_and_the_limit_can_be_raised(tmp_path):
    """Pillow alone only warns between its limit and twice it: a 9500 x 9500 header (1.01x
    the limit) is refused by name; `max_pixels` moves the limit (both ways)."""
    from PIL import Image as PILImage

    from gpsr.data import GPSRDataModule
    from gpsr.data.images import ImageFileError, decode_rgb, read_header

    _bomb(tmp_path / "big.png", side=9500)
    limit = PILImage.MAX_IMAGE_PIXELS
    assert limit < 9500**2 < 2 * limit
    for fn in (read_header, decode_rgb):
        with pytest.raises(ImageFileError, match=f"more than the limit of {limit:,}"):
            fn(tmp_path / "big.png")
    assert read_header(tmp_path / "big.png", max_pixels=10**8) == (9500, 9500)
    assert PILImage.MAX_IMAGE_PIXELS == limit  # Pillow's own setting is left as it was
    _png(tmp_path / "small.png", size=(8, 4))
    assert decode_rgb(tmp_path / "small.png", max_pixels=32).shape == (3, 4, 8)
    with pytest.raises(ImageFileError, match="32 pixels, more than the limit of 31"):
        decode_rgb(tmp_path / "small.png", max_pixels=31)
    with pytest.raises(ConfigError, match="data.max_pixels"):
        GPSRDataModule(source="folder", root=str(tmp_path), max_pixels=0)


def test_sample_refuses_an_input_folder_without_files_and_says_where_images_are(tmp_path):
    from gpsr.sample import sample_images
    from gpsr.utils.errors import InputNotFoundError

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputNotFoundError, match="input=.*empty holds no files$"):
        sample_images(_sample_cfg(input=str(empty), output=str(tmp_path / "o")))
    (empty / "sub").mkdir()
    _png(empty / "sub" / "a.png")
    with pytest.raises(InputNotFoundError, match="subfolders hold 1 image"):
        sample_images(_sample_cfg(input=str(empty), output=str(tmp_path / "o")))


def test_sample_warns_when_the_projection_stops_short(tmp_path, ddpm_ckpt, capsys):
    """A black-and-white checkerboard LR image at 8x: no image in [0, 1] degrades to it, so
    the projection cannot reach it; gpsr.sample writes the closest image and says so."""
    from gpsr.sample import sample_images

    src = tmp_path / "in"
    src.mkdir()
    board = ((np.arange(4)[:, None] + np.arange(4)[None]) % 2 * 255).astype("uint8")
    Image.fromarray(np.repeat(board[..., None], 3, axis=-1)).save(src / "board.png")
    _png(src / "fine.png", size=(4, 4))
    sampler = {"steps": 1, "eta": 1.0, "samples": 1, "project": True, "spacing": "linspace"}
    cfg = _sample_cfg(
        ckpt=str(ddpm_ckpt), input=str(src), output=str(tmp_path / "o"), sampler=sampler
    )
    assert sample_images(cfg) == 0
    err = capsys.readouterr().err
    assert "warning: board.png: the projection stopped short" in err and "fine.png" not in err
    assert (tmp_path / "o" / "board_sr.png").is_file()
