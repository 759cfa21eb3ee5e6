"""Training stages: losses fall, the flow stays frozen, checkpoints round-trip, bad inputs."""

import functools
import hashlib

import lightning as L
import pytest
import torch

from gpsr import ops
from gpsr.data import GPSRDataModule
from gpsr.models.conditioning import CoarseConditioned
from gpsr.models.gpsr import GPSR
from gpsr.stages import FlowModule, NonFiniteLossError, flow_loss_terms
from gpsr.stages.ddpm import ema_avg_fn
from gpsr.utils.checkpoint import CheckpointError, load_checkpoint
from tests.helpers import SMALL_FLOW, SMALL_UNET, stage_module


def _trainer(steps: int, **kwargs) -> L.Trainer:
    return L.Trainer(
        **kwargs,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )


def _dm() -> GPSRDataModule:
    return GPSRDataModule(size=32, scale=8, batch_size=8, demo_count=64, demo_val=16)


def _fixed_batch(dm):
    ds = dm.dataset("val")
    return torch.stack([ds[i]["hr"] for i in range(8)])


def test_flow_training_lowers_loss_and_coarse_fit():
    torch.manual_seed(0)
    dm = _dm()
    module = stage_module(
        "flow", scale=8, flow=SMALL_FLOW, optimizer=functools.partial(torch.optim.AdamW, lr=2e-3)
    )
    hr = _fixed_batch(dm)
    x = ops.dequantize(hr, torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = flow_loss_terms(module.flow, x, module.sigma)
    _trainer(100).fit(module, datamodule=dm)
    with torch.no_grad():
        after = flow_loss_terms(module.flow, x, module.sigma)
    assert after["loss"] < 0.6 * before["loss"]
    assert after["coarse"] < 0.6 * before["coarse"]


def _state_hash(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def test_ddpm_training_lowers_loss_and_keeps_flow_unchanged(flow_ckpt):
    torch.manual_seed(0)
    dm = _dm()
    module = stage_module(
        "ddpm",
        flow_ckpt=str(flow_ckpt),
        scale=8,
        unet=SMALL_UNET,
        optimizer=functools.partial(torch.optim.Adam, lr=1e-3),
    )
    flow_hash = _state_hash(module.flow)
    ckpt_flow = {
        k[5:]: v
        for k, v in load_checkpoint(flow_ckpt)["state_dict"].items()
        if k.startswith("flow.")
    }
    assert all(torch.equal(ckpt_flow[k], v) for k, v in module.flow.state_dict().items())
    hr = _fixed_batch(dm)
    module.fit_latent_stats([{"hr": hr}])

    def eval_loss():
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            c, z, _ = module.flow(hr)
            zhat = module.stats.normalise(z)
            t = torch.randint(0, 1000, (64,), generator=g)
            noise = torch.randn((64, *zhat.shape[1:]), generator=g)
            model = CoarseConditioned(module.unet.eval(), c.repeat(8, 1, 1, 1))
            return module.diffusion.training_loss(model, zhat.repeat(8, 1, 1, 1), t, noise).item()

    module.stats.ready.fill_(False)  # recomputed over the training split by on_fit_start
    before = eval_loss()
    key = "input_blocks.0.0.weight"
    after_each_step = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            after_each_step.append(pl_module.unet.state_dict()[key].clone())

    _trainer(40, callbacks=[Record()]).fit(module, datamodule=dm)
    assert bool(module.stats.ready)
    assert eval_loss() < 0.8 * before
    assert _state_hash(module.flow) == flow_hash
    # The EMA, recomputed by hand from the raw weights after every optimiser step: the
    # first update copies, then decay min(0.9999, (1 + n) / (10 + n)) with n updates so far.
    ema = after_each_step[0]
    for n, w in enumerate(after_each_step[1:], start=1):
        d = min(0.9999, (1 + n) / (10 + n))
        ema = d * ema + (1 - d) * w
    got = module.ema.module.state_dict()[key]
    assert torch.allclose(got, ema, atol=1e-6)
    assert not torch.allclose(got, after_each_step[-1], atol=1e-4)  # lags the raw weights


def test_latent_statistics_normalise_training_latents(flow_ckpt):
    module = stage_module("ddpm", flow_ckpt=str(flow_ckpt), scale=8, unet=SMALL_UNET)
    dm = _dm()
    module.fit_latent_stats(dm.stats_dataloader())
    zs = torch.cat([module.flow(b["hr"])[1] for b in dm.stats_dataloader()])
    zhat = module.stats.normalise(zs)
    assert torch.allclose(zhat.mean((0, 2, 3)), torch.zeros(9), atol=1e-4)
    assert torch.allclose(zhat.std((0, 2, 3)), torch.full((9,), 0.5), atol=1e-3)
    lo, hi = module.stats.bounds()
    assert (zhat >= lo - 1e-6).all() and (zhat <= hi + 1e-6).all()
    assert torch.allclose(module.stats.denormalise(zhat), zs, atol=1e-5)


def test_ema_warmup_and_decay():
    avg = ema_avg_fn(0.9999, warmup=True)
    a, c = torch.zeros(1), torch.ones(1)
    assert avg(a, c, torch.tensor(0)).item() == pytest.approx(1 - 0.1)
    assert ema_avg_fn(0.9, warmup=False)(a, c, torch.tensor(10**6)).item() == pytest.approx(0.1)


def test_ddpm_refuses_bad_flow_checkpoints(tmp_path, flow_ckpt, ddpm_ckpt):
    with pytest.raises(ValueError, match="set flow_ckpt="):
        stage_module("ddpm", flow_ckpt=None, scale=8, unet=SMALL_UNET)
    with pytest.raises(CheckpointError, match="does not exist"):
        stage_module("ddpm", flow_ckpt=str(tmp_path / "nope.ckpt"), scale=8, unet=SMALL_UNET)
    with pytest.raises(CheckpointError, match="is a 'ddpm' checkpoint, but a 'flow' checkpoint"):
        stage_module("ddpm", flow_ckpt=str(ddpm_ckpt), scale=8, unet=SMALL_UNET)
    with pytest.raises(CheckpointError, match="trained for scale 8, but this run uses scale=4"):
        stage_module("ddpm", flow_ckpt=str(flow_ckpt), scale=4, unet=SMALL_UNET)
    bad_unet = dict(SMALL_UNET, in_channels=9)
    with pytest.raises(ValueError, match="in_channels / out_channels must be 12 / 9"):
        stage_module("ddpm", flow_ckpt=str(flow_ckpt), scale=8, unet=bad_unet)


def test_tampered_and_truncated_checkpoints(tmp_path, flow_ckpt):

    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    evil = tmp_path / "evil.ckpt"
    torch.save({"gpsr": {"stage": "flow"}, "payload": Evil()}, evil)
    with pytest.raises(CheckpointError, match="refused by the safe loader"):
        GPSR.load(evil)
    data = flow_ckpt.read_bytes()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated, damaged or not a checkpoint"):
        GPSR.load(cut)
    notgpsr = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {}}, notgpsr)
    with pytest.raises(CheckpointError, match="not a gpsr checkpoint"):
        GPSR.load(notgpsr)


def test_inference_object(ddpm_ckpt, flow_ckpt):
    model = GPSR.load(ddpm_ckpt)
    dm = _dm()
    batch = next(iter(dm.eval_dataloader("val")))
    lr01 = ops.to_unit(batch["lr"][:3])
    out = model.super_resolve(lr01, steps=3, seed=0)
    assert out.shape == (3, 3, 32, 32) and out.min() >= 0 and out.max() <= 1
    again = model.super_resolve(lr01, steps=3, seed=0)
    assert torch.equal(out, again)
    # Per-image seeding: the same image gives the same sample in any batch position.
    solo = model.super_resolve(lr01[1:2], steps=3, seed=0, indices=[1])
    assert torch.allclose(solo[0], out[1], atol=1e-5)
    many = model.super_resolve(lr01, steps=2, samples=4, eta=1.0, seed=0)
    assert many.shape == (3, 4, 3, 32, 32) and many.std(1).mean() > 0
    proj = model.super_resolve(lr01, steps=2, project=True, seed=0)
    cons = ((ops.degrade(proj.double(), 8) - lr01.double()) ** 2).flatten(1).mean(1)
    assert (cons < 1e-9).all() and proj.min() >= 0 and proj.max() <= 1
    g = torch.Generator().manual_seed(3)
    assert model.super_resolve(lr01, steps=2, generator=g).shape == (3, 3, 32, 32)
    flow_only = GPSR.load(flow_ckpt)
    assert flow_only.super_resolve(lr01, steps=0).shape == (3, 3, 32, 32)
    with pytest.raises(ValueError, match="use steps=0"):
        flow_only.super_resolve(lr01, steps=7)


def test_nonfinite_loss_stops_or_skips():
    dm = _dm()

    class Exploding(FlowModule):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            if loss is not None and batch_idx == 2:
                return self.guard_loss(loss * float("nan"))
            return loss

    with pytest.raises(NonFiniteLossError, match="became nan at step 2.*nonfinite=skip"):
        _trainer(5).fit(stage_module("flow", Exploding, scale=8, flow=SMALL_FLOW), datamodule=dm)
    module = stage_module("flow", Exploding, scale=8, flow=SMALL_FLOW, nonfinite="skip")
    _trainer(5).fit(module, datamodule=dm)
    assert module.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_a_diverged_run_stops_after_consecutive_skips():
    class Diverged(FlowModule):
        def training_step(self, batch, batch_idx):
            if batch_idx == 1:  # the weights blow up: every later loss is NaN
                with torch.no_grad():
                    next(iter(self.flow.parameters())).fill_(float("nan"))
            return super().training_step(batch, batch_idx)

    module = stage_module(
        "flow", Diverged, scale=8, flow=SMALL_FLOW, nonfinite="skip", max_skipped_steps=3
    )
    with pytest.raises(NonFiniteLossError, match="not finite for 3 steps in a row"):
        _trainer(20).fit(module, datamodule=_dm())
    assert module.skipped_steps == 3


def test_checkpoint_digest_detects_any_change(tmp_path, flow_ckpt):
    from gpsr.utils.checkpoint import AtomicCheckpointIO, checkpoint_digest

    ckpt = load_checkpoint(flow_ckpt)  # verified on load
    assert len(ckpt["gpsr"]["sha256"]) == 64
    io = AtomicCheckpointIO()
    path = tmp_path / "copy.ckpt"
    io.save_checkpoint(ckpt, path)
    assert io.load_checkpoint(path)["gpsr"]["sha256"] == checkpoint_digest(ckpt)
    for change in ("weights", "optimizer", "step"):
        bad = load_checkpoint(path)
        if change == "weights":
            next(iter(bad["state_dict"].values())).view(-1)[0] += 1e-3
        elif change == "optimizer":
            state = bad["optimizer_states"][0]["state"]
            next(iter(state.values()))["exp_avg"].view(-1)[0] += 1e-3
        else:
            bad["global_step"] += 1
        torch.save(bad, tmp_path / "bad.ckpt")  # re-saved without re-sealing
        with pytest.raises(CheckpointError, match="failed its integrity check"):
            load_checkpoint(tmp_path / "bad.ckpt")
    unsealed = load_checkpoint(path)
    del unsealed["gpsr"]["sha256"]
    torch.save(unsealed, tmp_path / "unsealed.ckpt")
    with pytest.raises(CheckpointError, match="has no integrity seal"):
        load_checkpoint(tmp_path / "unsealed.ckpt")


def test_checkpoints_follow_the_umask(tmp_path):
    import os

    from gpsr.utils.checkpoint import atomic_save

    old = os.umask(0o022)
    try:
        atomic_save({"a": torch.zeros(1)}, tmp_path / "x.ckpt")
        os.umask(0o077)
        atomic_save({"a": torch.zeros(1)}, tmp_path / "y.ckpt")
    finally:
        os.umask(old)
    assert (tmp_path / "x.ckpt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "y.ckpt").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("stage", ["flow", "ddpm"])
def test_bf16_mixed_precision_and_gradient_accumulation(stage, flow_ckpt):
    dm = _dm()
    if stage == "flow":
        module = stage_module("flow", scale=8, flow=SMALL_FLOW)
    else:
        module = stage_module("ddpm", flow_ckpt=str(flow_ckpt), scale=8, unet=SMALL_UNET)
    trainer = _trainer(3, precision="bf16-mixed", accumulate_grad_batches=2)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 3  # optimiser steps, each over two batches
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for p in module.parameters())
    if stage == "ddpm":
        assert int(module.ema.n_averaged) == 3  # the EMA follows optimiser steps, not batches
    else:
        x = _fixed_batch(dm)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            terms = flow_loss_terms(module.flow, ops.dequantize(x), module.sigma)
            coarse, latent, logdet = module.flow(x)
        # Subnets ran in bf16, but the couplings, log-det and coarse loss stayed float32.
        assert logdet.dtype == coarse.dtype == latent.dtype == torch.float32
        assert terms["coarse"].dtype == torch.float32 and torch.isfinite(terms["loss"])


def test_ddpm_step_trains_on_the_normalised_latent_of_the_dequantized_image(flow_ckpt, monkeypatch):
    """The training step feeds the diffusion `stats.normalise(z)` of the dequantized image and
    the flow's own coarse output (Algorithm 2), not the raw latent."""
    from gpsr import ops

    module = stage_module("ddpm", flow_ckpt=str(flow_ckpt), scale=8, unet=SMALL_UNET)
    hr = _fixed_batch(_dm())
    module.stats.mean.copy_(torch.linspace(-0.2, 0.2, 9))
    module.stats.var.copy_(torch.linspace(0.5, 3.0, 9))
    noise = torch.rand_like(hr) / 127.5
    monkeypatch.setattr(ops, "dequantize", lambda x: x + noise)
    seen = {}

    def spy(model, x0, *args, **kwargs):
        seen["x0"], seen["cond"] = x0, model.coarse
        return torch.zeros((), requires_grad=True)

    monkeypatch.setattr(module.diffusion, "training_loss", spy)
    module.log = lambda *a, **k: None
    module.guard_loss = lambda loss: loss
    module.training_step({"hr": hr}, 0)
    with torch.no_grad():
        c, z, _ = module.flow(hr + noise)
    assert torch.allclose(
        seen["x0"],
        (z - module.stats.mean[None, :, None, None])
        / (2 * module.stats.var.sqrt()[None, :, None, None]),
        atol=1e-6,
    )
    assert torch.allclose(seen["cond"], c, atol=1e-6)


def test_noise_stage_learns_to_denoise_and_estimate():
    """A short run of stage=noise: on held-out LR tiles with noise of 0.05 the denoiser
    removes noise (its MSE against the clean LR well below the noise's), and the estimator
    learns to tell the tiles' own detail from noise: its reading of clean tiles (the
    high-pass RMS before training) falls, and noisy ones read near 0.05 (a target in the
    wrong units, or one blind to the level, fails one of these)."""
    from gpsr.diffusion import measurement_noise

    torch.manual_seed(0)
    dm = GPSRDataModule(size=32, scale=4, batch_size=32, demo_count=512, demo_val=16)
    small = {"width": 32, "depth": 5, "estimator_width": 16, "estimator_depth": 4}
    module = stage_module(
        "noise", scale=4, noise=small, optimizer=functools.partial(torch.optim.Adam, lr=2e-3)
    )
    module.scheduler_factory = None
    clean = ops.to_unit(torch.stack([dm.dataset("val")[i]["lr"] for i in range(16)]))
    noisy = ops.noisy_measurement(clean, 0.05, measurement_noise(clean.shape[1:], range(16), 0))
    sigma = torch.full((16,), 0.05)

    def measure():
        with torch.no_grad():
            den = module.noise.denoise(noisy, sigma)
            est = module.noise.estimate(torch.cat([clean, noisy])).reshape(2, 16).mean(1)
        return ((den - clean) ** 2).mean().item(), est.tolist()

    _, (clean_before, _) = measure()
    _trainer(200).fit(module, datamodule=dm)
    mse_after, (clean_after, noisy_after) = measure()
    assert mse_after < 0.6 * ((noisy - clean) ** 2).mean().item()
    assert clean_after < 0.5 * clean_before
    assert abs(noisy_after / 0.05 - 1) < 0.5
