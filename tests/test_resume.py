"""Runs are resumable: SIGKILL mid-run, then resume; exact data order; EMA and W&B run id."""

import functools
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from gpsr.data import GPSRDataModule
from gpsr.utils.checkpoint import AtomicCheckpointIO, load_checkpoint
from gpsr.utils.loggers import wandb_logger
from tests.helpers import REPO, SMALL_FLOW, SMALL_UNET, run_cli, stage_module


class Recorder(Callback):
    """The image indices of every training batch, with the step they were used at."""

    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append((trainer.global_step, batch["index"].tolist()))


def _fit(module, dm, steps, dirpath, ckpt_path=None, every=None, extra=()):
    rec = Recorder()
    cbs = [rec, *extra]
    if every:
        cbs.append(
            ModelCheckpoint(
                dirpath=dirpath,
                every_n_train_steps=every,
                save_top_k=-1,
                filename="s{step}",
                auto_insert_metric_name=False,
                save_last=True,
            )
        )
    trainer = L.Trainer(
        max_steps=steps,
        logger=False,
        limit_val_batches=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        callbacks=cbs,
        plugins=[AtomicCheckpointIO()],
        enable_checkpointing=bool(every),
    )
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return trainer, rec.seen


def test_resume_continues_data_order_optimizer_and_schedule(tmp_path):
    """6 batches per epoch; stop at step 10 (mid-epoch 2), resume: batches 11-20 are the same."""

    def make():
        torch.manual_seed(0)
        opt = functools.partial(torch.optim.AdamW, lr=1e-3)
        sched = functools.partial(torch.optim.lr_scheduler.StepLR, step_size=4, gamma=0.5)
        return stage_module("flow", scale=8, flow=SMALL_FLOW, optimizer=opt, scheduler=sched)

    def dm():
        return GPSRDataModule(size=32, scale=8, batch_size=8, demo_count=64, seed=3)

    _, full = _fit(make(), dm(), 20, tmp_path / "a", every=10)
    ckpt = tmp_path / "a" / "s10.ckpt"
    assert ckpt.is_file()
    trainer, resumed = _fit(make(), dm(), 20, tmp_path / "b", ckpt_path=str(ckpt))
    assert trainer.global_step == 20
    assert resumed == full[10:]  # same steps, same images, same order
    opt = trainer.optimizers[0]
    assert opt.state_dict()["state"][0]["step"].item() == 20
    assert trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0] == pytest.approx(
        1e-3 * 0.5**5
    )


def test_resume_from_an_epochs_last_batch_shuffles_the_next_epoch_as_the_run_did(tmp_path):
    """Lightning resumes a checkpoint written at the last batch of an epoch with its epoch
    number one ahead; the training sampler keeps its own count, so the next epoch's order
    is the uninterrupted run's, and so are the random draws after it."""

    def make():
        torch.manual_seed(0)
        return stage_module("flow", scale=8, flow=SMALL_FLOW)

    def dm():
        return GPSRDataModule(size=32, scale=8, batch_size=8, demo_count=48, seed=3)

    per_epoch = 48 // 8
    _, full = _fit(make(), dm(), 2 * per_epoch + 2, tmp_path / "a", every=per_epoch)
    assert [i for _, i in full[:per_epoch]] != [i for _, i in full[per_epoch : 2 * per_epoch]]
    ckpt = tmp_path / "a" / f"s{per_epoch}.ckpt"
    trainer, resumed = _fit(make(), dm(), 2 * per_epoch + 2, tmp_path / "b", ckpt_path=str(ckpt))
    assert resumed == full[per_epoch:]


@pytest.mark.slow
def test_resume_with_loader_workers_draws_what_the_workers_would_have(tmp_path):
    """With worker processes each worker's generator is saved with the loader's state (the
    dataset's state) and handed back on resume: the flips after a resume mid-epoch and at
    an epoch's end are the uninterrupted run's, so are the weights, bit for bit."""
    from gpsr.callbacks import RandomState

    def make():
        torch.manual_seed(0)
        return stage_module("flow", scale=8, flow=SMALL_FLOW)

    def dm():
        return GPSRDataModule(size=32, scale=8, batch_size=8, demo_count=48, seed=3, num_workers=2)

    def fit(path, ckpt=None):
        trainer, seen = _fit(make(), dm(), 14, path, ckpt, every=4, extra=[RandomState()])
        return trainer.lightning_module.state_dict(), seen

    whole, order = fit(tmp_path / "a")
    for step in (4, 12):  # mid-epoch; the last batch of epoch 2 (6 batches per epoch)
        resumed, rest = fit(tmp_path / f"b{step}", str(tmp_path / "a" / f"s{step}.ckpt"))
        assert rest == order[step:]
        for k, v in whole.items():
            assert torch.equal(v, resumed[k]), (step, k)


def test_ddpm_resume_restores_ema(tmp_path, flow_ckpt):

    def make():
        return stage_module(
            "ddpm", flow_ckpt=str(flow_ckpt), scale=8, unet=SMALL_UNET, ema_decay=0.99
        )

    dm = GPSRDataModule(size=32, scale=8, batch_size=8, demo_count=64)
    _fit(make(), dm, 6, tmp_path / "a", every=3)
    first = load_checkpoint(tmp_path / "a" / "s3.ckpt")["state_dict"]
    assert int(first["ema.n_averaged"]) == 3
    module = make()
    fresh_ema = {k: v.clone() for k, v in module.ema.module.state_dict().items()}
    seen = {}
    real_update = module.ema.update_parameters

    def update_and_record(model):
        if "first" not in seen:  # the EMA as the resumed run found it, before its 1st update
            seen["first"] = {k: v.clone() for k, v in module.ema.module.state_dict().items()}
        real_update(model)

    module.ema.update_parameters = update_and_record
    _fit(
        module,
        GPSRDataModule(size=32, scale=8, batch_size=8, demo_count=64),
        6,
        tmp_path / "b",
        ckpt_path=str(tmp_path / "a" / "s3.ckpt"),
    )
    assert int(module.ema.n_averaged) == 6
    # The resumed run started from the checkpoint's EMA weights, not from a fresh copy.
    for k, v in seen["first"].items():
        assert torch.equal(v, first[f"ema.module.{k}"]), k
    assert any(not torch.equal(seen["first"][k], fresh_ema[k]) for k in fresh_ema)
    final = load_checkpoint(tmp_path / "a" / "last.ckpt")["state_dict"]
    for k in final:
        if k.startswith("stats."):
            assert torch.equal(final[k], module.state_dict()[k]), k


def test_wandb_run_id_is_kept_for_resume(tmp_path):
    a = wandb_logger(str(tmp_path), offline=True)
    b = wandb_logger(str(tmp_path), offline=True)
    assert a.version == b.version and (tmp_path / "wandb_run_id.txt").read_text() == a.version
    assert wandb_logger(str(tmp_path / "other"), offline=True).version != a.version


def test_wandb_is_offline_unless_a_key_or_an_explicit_setting(monkeypatch):
    from gpsr.utils.loggers import wandb_offline

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert wandb_offline(None) is True
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef")
    assert wandb_offline(None) is False
    assert wandb_offline(True) is True
    monkeypatch.delenv("WANDB_API_KEY")
    assert wandb_offline(False) is False


def test_a_finished_run_saves_its_final_step(tmp_path):
    """Training that ends between two periodic saves still leaves last.ckpt at its final
    step (Lightning alone keeps the periodic step 3 of 5 here)."""
    from gpsr.train import train
    from tests.helpers import FAST, compose_cfg

    overrides = [
        "stage=flow", "logger=csv", *FAST, "trainer.max_steps=5",
        "callbacks.model_checkpoint.every_n_train_steps=3", "test_after_fit=false",
    ]  # fmt: skip
    train(compose_cfg(overrides, output_dir=tmp_path))
    last = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 5
    assert load_checkpoint(tmp_path / "checkpoints" / "step0000003.ckpt")["global_step"] == 3


def test_resume_auto_ranks_checkpoints_by_their_step_not_their_file_time(tmp_path, flow_ckpt):
    """After `cp -r` (or any touch) file times say nothing; the step inside does."""
    import shutil

    from gpsr.utils.checkpoint import find_last_checkpoint

    run = tmp_path / "copy"
    shutil.copytree(flow_ckpt.parent, run / "checkpoints")
    folder = run / "checkpoints"
    steps = {p.name: load_checkpoint(p)["global_step"] for p in folder.glob("*.ckpt")}
    assert steps["last.ckpt"] == 24 and steps["step0000012.ckpt"] == 12
    now = time.time()
    for i, name in enumerate(sorted(steps, key=steps.get)):  # oldest file = furthest step
        os.utime(folder / name, (now - 100 * i, now - 100 * i))
    assert steps[find_last_checkpoint(run).name] == 24
    (folder / "step0000024.ckpt").unlink()
    assert find_last_checkpoint(run).name == "last.ckpt"  # the only step-24 file left
    (folder / "last.ckpt").write_bytes(b"damaged")
    assert find_last_checkpoint(run).name == "step0000012.ckpt"


def _train_until_killed(args: list[str], run_dir: Path, cwd: Path, kill_after: str) -> None:
    """Start `gpsr.train args`, SIGKILL it as soon as `checkpoints/<kill_after>` exists."""
    env = {**os.environ, "GPSR_ROOT": str(cwd), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpsr.train", *args, f"hydra.run.dir={run_dir}"],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    target = run_dir / "checkpoints" / kill_after
    deadline = time.time() + 300
    while time.time() < deadline and not target.exists() and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert target.exists(), "the run ended or stalled before its checkpoint"


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["flow", "ddpm"])
def test_sigkill_mid_epoch_then_resume_is_bit_exact(tmp_path, stage, request):
    """A run killed with SIGKILL mid-epoch and resumed with ckpt_path=auto ends with the
    weights, optimiser state and losses of the uninterrupted run, bit for bit: the data order,
    the random crops and flips, the dequantization noise (and the DDPM's timesteps and noise)
    continue where they stopped, across an epoch boundary (8 batches per epoch, 10 steps)
    and a validation after the checkpoint the resume starts from. Also: the kill may land
    in a checkpoint save, and resume=auto takes the newest checkpoint that loads (every
    file left is whole), redoes no step (no -v1 file) and keeps one metrics history."""
    extra = [f"flow_ckpt={request.getfixturevalue('flow_ckpt')}"] if stage == "ddpm" else []
    args = [
        f"stage={stage}", *extra, "logger=csv", "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false", "trainer.max_steps=10",
        "trainer.val_check_interval=6", "+trainer.limit_val_batches=1",
        "trainer.log_every_n_steps=1", "data.batch_size=8", "data.demo_count=64",
        "callbacks.model_checkpoint.every_n_train_steps=3", "test_after_fit=false",
    ]  # fmt: skip
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    run_cli("train", *args, f"hydra.run.dir={whole}", cwd=tmp_path)
    _train_until_killed(args, killed, tmp_path, "step0000006.ckpt")
    found = {p.name: load_checkpoint(p)["global_step"] for p in killed.glob("checkpoints/*.ckpt")}
    run_cli("train", *args, "ckpt_path=auto", f"hydra.run.dir={killed}", cwd=tmp_path)
    start = re.search(r"resume=auto: (\S+\.ckpt)", (killed / "train.log").read_text()).group(1)
    assert 6 <= found[Path(start).name] < 10  # a real resume, mid-way
    assert found[Path(start).name] == max(found.values())  # the newest good checkpoint
    assert not list(killed.glob("checkpoints/*-v1.ckpt"))  # no step was redone

    a = load_checkpoint(whole / "checkpoints" / "last.ckpt")
    b = load_checkpoint(killed / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 10
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    moments_a = a["optimizer_states"][0]["state"]
    moments_b = b["optimizer_states"][0]["state"]
    for i in moments_a:
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(moments_a[i][name], moments_b[i][name]), (i, name)

    import csv

    def losses(run):
        rows = csv.DictReader(open(run / "csv" / "metrics.csv"))
        return [(int(float(r["step"])), r["train/loss"]) for r in rows if r.get("train/loss")]

    assert losses(killed) == losses(whole)  # one history: every step once, the same losses
    assert [step for step, _ in losses(whole)] == list(range(10))


def test_random_state_restores_every_generator():
    """torch, numpy and Python draw after a restore what they drew after the capture."""
    import random

    import numpy as np

    from gpsr.callbacks import RandomState

    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.standard_normal()  # numpy's cached Gaussian half-pair is part of its state
    state = RandomState.capture()

    def draws():
        return torch.rand(4).tolist(), np.random.standard_normal(3).tolist(), random.random()

    first = draws()
    draws()
    RandomState.restore(state)
    assert draws() == first
