"""Speed and memory benchmark: `python -m gpsr.benchmark` (paper configs by default).

Every row is measured twice in one run on one device: the straightforward path
("reference": fp32, eager, plain modules and optimiser, as the authors' release runs) and the
optimised default ("optimized": bf16 autocast for the subnets and UNet, channels-last,
torch.compile, fused AdamW, TF32, activation checkpointing of the flow). Writes
`benchmark.json` (rows: name, mode, batch, img_per_s, tflops, peak_gib, device) and
`benchmark.md`. With `trust.ckpt=<trained DDPM ckpt>` it also reports, per precision, the
consistency and invertibility error of that model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from gpsr import ops
from gpsr.diffusion import GaussianDiffusion
from gpsr.models.flow import DegradationFlow, flow_loss_terms
from gpsr.models.unet import UNet
from gpsr.pipeline import LatentStats, super_resolve_signed
from gpsr.utils.cli import CONFIG_DIR, check_output_dir, preflight, report_errors
from gpsr.utils.device import pick_device, synchronize
from gpsr.utils.speed import apply_speedups, set_tf32

log = logging.getLogger("gpsr.benchmark")

__all__ = ["run_benchmark", "main"]

MODES = ("reference", "optimized")


class Setup:
    """Models, optimiser and precision of one mode on one device."""

    def __init__(self, cfg: DictConfig, mode: str, device: torch.device):
        self.mode, self.device = mode, device
        opt = mode == "optimized"
        cuda = device.type == "cuda"
        set_tf32(opt and cuda)
        torch.manual_seed(0)
        self.flow = DegradationFlow(scale=cfg.scale, **cfg.model.flow).to(device)
        self.unet = UNet(**cfg.model.unet).to(device)
        # Random but non-trivial weights, so no coupling is the identity.
        with torch.no_grad():
            for p in list(self.flow.parameters()) + list(self.unet.parameters()):
                if p.abs().sum() == 0:
                    p.normal_(0, 1e-3)
        self.diffusion = GaussianDiffusion()
        self.stats = LatentStats(3 * self.flow.channels).to(device)
        self.stats.ready.fill_(True)
        self.autocast = (
            torch.autocast(device.type, dtype=torch.bfloat16) if opt else contextlib.nullcontext()
        )
        self.compile = opt and cuda and cfg.compile
        apply_speedups(
            self.flow,
            self.unet,
            checkpointing=opt,
            channels_last=opt and cuda,
            compile=self.compile,
        )
        fused = {"fused": True} if opt and cuda else {}
        self.flow_opt = torch.optim.AdamW(
            self.flow.parameters(), lr=1e-4, weight_decay=1e-5, **fused
        )
        self.unet_opt = torch.optim.Adam(self.unet.parameters(), lr=1e-4, **fused)

    def images(self, n: int, size: int) -> torch.Tensor:
        x = torch.rand(n, self.flow.channels, size, size, device=self.device) * 2 - 1
        return x.contiguous(memory_format=torch.channels_last) if self.mode == "optimized" else x

    # -- the measured operations -------------------------------------------------------
    def flow_train(self, x: torch.Tensor) -> None:
        with self.autocast:
            loss = flow_loss_terms(self.flow, ops.dequantize(x), ops.QUANT_STEP)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.flow.parameters(), 10.0)
        self.flow_opt.step()
        self.flow_opt.zero_grad(set_to_none=True)

    def ddpm_train(self, x: torch.Tensor) -> None:
        with torch.no_grad(), self.autocast:
            coarse, z, _ = self.flow(ops.dequantize(x))
        with self.autocast:
            loss = self.diffusion.training_loss(
                self.unet, self.stats.normalise(z.float()), coarse.float()
            )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), 1.0)
        self.unet_opt.step()
        self.unet_opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def flow_inverse(self, x: torch.Tensor) -> None:
        # The inverse keeps its couplings in float32; only subnets follow the autocast.
        coarse, latent = ops.haar2d(x)
        with self.autocast:
            self.flow.inverse(coarse, latent)

    @torch.no_grad()
    def sample(self, x: torch.Tensor, steps: int) -> torch.Tensor:
        lr = ops.degrade(x, self.flow.scale)
        with self.autocast:
            return super_resolve_signed(self.flow, lr, steps, self.unet, self.diffusion, self.stats)


def _time(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds of `fn` after warm-up (CUDA events on GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call, counted by torch's FLOP counter."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def _row(
    name: str,
    mode: str,
    batch: int,
    seconds: float,
    flops: int | None,
    device: torch.device,
    device_name: str,
) -> dict[str, Any]:
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {
        "name": name,
        "mode": mode,
        "batch": batch,
        "img_per_s": batch / seconds,
        "seconds": seconds,
        "tflops": (flops / seconds / 1e12) if flops else None,
        "peak_gib": peak,
        "device": device_name,
    }


def _measure(setup: Setup, name: str, batch: int, cfg: DictConfig, flop_fn=None) -> dict[str, Any]:
    dev = setup.device
    x = setup.images(batch, cfg.size)
    ops_ = {
        "flow_train": lambda: setup.flow_train(x),
        "ddpm_train": lambda: setup.ddpm_train(x),
        "flow_inverse": lambda: setup.flow_inverse(x),
        "sample_7": lambda: setup.sample(x, 7),
        "sample_100": lambda: setup.sample(x, 100),
    }
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    seconds = _time(ops_[name], dev, cfg.warmup, cfg.repeats)
    return _row(
        name,
        setup.mode,
        batch,
        seconds,
        flop_fn(batch) if flop_fn else None,
        dev,
        _device_name(dev),
    )


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        models = [
            ln.split(":", 1)[1].strip()
            for ln in cpuinfo.read_text().splitlines()
            if ln.startswith("model name")
        ]
        name = models[0] if models else name
    return f"CPU ({name}, {torch.get_num_threads()} threads)"


def _flop_counts(cfg: DictConfig, device: torch.device) -> dict[str, Callable[[int], int]]:
    """FLOPs per image of each operation (reference models, fp32, batch 1), scaled by batch."""
    ref = Setup(cfg, "reference", device)
    x = ref.images(1, cfg.size)
    lr = ops.degrade(x, ref.flow.scale)
    coarse = ops.upsample_nearest(lr, ref.flow.k)
    zhat = torch.zeros(1, *ref.flow.latent_shape(*lr.shape[-2:]), device=device)
    with torch.no_grad():
        flow_fwd = _flops(lambda: ref.flow(x))
        unet_fwd = _flops(
            lambda: ref.unet(torch.cat([zhat, coarse], 1), torch.zeros(1, device=device))
        )
    return {
        "flow_train": lambda b: 3 * flow_fwd * b,
        "ddpm_train": lambda b: (flow_fwd + 3 * unet_fwd) * b,
        "flow_inverse": lambda b: flow_fwd * b,
        "sample_7": lambda b: (7 * unet_fwd + flow_fwd) * b,
        "sample_100": lambda b: (100 * unet_fwd + flow_fwd) * b,
    }


def _largest_flow_batch(setup: Setup, cfg: DictConfig, start: int) -> int | None:
    """Largest flow-training batch that fits (doubling from `start`), CUDA only."""
    if setup.device.type != "cuda":
        return None
    best, batch = None, start
    while batch <= cfg.max_batch_search:
        try:
            x = setup.images(batch, cfg.size)
            setup.flow_train(x)
            torch.cuda.synchronize()
            best, batch = batch, batch * 2
        except torch.OutOfMemoryError:
            break
        finally:
            setup.flow_opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
    return best


@torch.no_grad()
def trust_report(ckpt: str, cfg: DictConfig, device: torch.device) -> list[dict[str, Any]]:
    """Consistency and invertibility of a trained model under each precision mode."""
    from gpsr.data import GPSRDataModule
    from gpsr.inference import GPSR
    from gpsr.metrics import CONSISTENCY_UNIT, per_image_consistency

    model = GPSR.load(ckpt, device=device)
    dm = GPSRDataModule(
        size=cfg.trust.size,
        scale=model.scale,
        demo_test=cfg.trust.images,
        eval_batch_size=cfg.trust.images,
    )
    batch = next(iter(dm.eval_dataloader("test")))
    hr, lr = batch["hr"].to(device), batch["lr"].to(device)
    rows = []
    for mode in MODES:
        ctx = (
            torch.autocast(device.type, dtype=torch.bfloat16)
            if mode == "optimized"
            else contextlib.nullcontext()
        )
        with ctx:
            coarse, latent, _ = model.flow(hr)
            inv_err = (model.flow.inverse(coarse, latent).float() - hr).abs().max().item()
            sr = model.super_resolve(ops.to_unit(lr), steps=cfg.trust.steps, seed=0)
        cons = per_image_consistency(sr.float(), ops.to_unit(lr), model.scale).mean().item()
        rows.append(
            {
                "mode": mode,
                "precision": "bf16 autocast" if mode == "optimized" else "fp32",
                "consistency_x1e5": cons / CONSISTENCY_UNIT,
                "invertibility_max_abs": inv_err,
                "images": hr.shape[0],
                "device": _device_name(device),
            }
        )
    return rows


def run_benchmark(cfg: DictConfig) -> dict[str, Any]:
    out = check_output_dir(cfg.paths.output_dir)
    device = pick_device(cfg.device)
    flops = _flop_counts(cfg, device)
    rows = []
    for mode in MODES:
        setup = Setup(cfg, mode, device)
        for name, batches in cfg.batches.items():
            for batch in batches:
                log.info("%s %s batch %d", name, mode, batch)
                rows.append(_measure(setup, name, int(batch), cfg, flops[name]))
        largest = _largest_flow_batch(setup, cfg, max(cfg.batches.flow_train))
        if largest and largest not in cfg.batches.flow_train:
            rows.append(_measure(setup, "flow_train", largest, cfg, flops["flow_train"]))
        del setup
    result: dict[str, Any] = {
        "device": _device_name(device),
        "torch": torch.__version__,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "rows": rows,
    }
    if cfg.trust.ckpt:
        result["trust"] = trust_report(cfg.trust.ckpt, cfg, device)
    (out / "benchmark.json").write_text(json.dumps(result, indent=2))
    (out / "benchmark.md").write_text(markdown(result))
    log.info("\n%s", markdown(result))
    return result


def markdown(result: dict[str, Any]) -> str:
    """Table with the optimised / reference speed-up of each (name, batch)."""
    ref = {(r["name"], r["batch"]): r for r in result["rows"] if r["mode"] == "reference"}
    lines = [
        f"Device: {result['device']}, torch {result['torch']}",
        "",
        "| what | batch | mode | img/s | TFLOP/s | peak GiB | GiB / img | speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        base = ref.get((r["name"], r["batch"]))
        speed = (
            f"{r['img_per_s'] / base['img_per_s']:.2f}x"
            if base and r["mode"] == "optimized"
            else ""
        )
        fmt = lambda v, f: f.format(v) if v is not None else "n/a"  # noqa: E731
        per_img = r["peak_gib"] / r["batch"] if r["peak_gib"] is not None else None
        lines.append(
            f"| {r['name']} | {r['batch']} | {r['mode']} | {r['img_per_s']:.2f} | "
            f"{fmt(r['tflops'], '{:.2f}')} | {fmt(r['peak_gib'], '{:.2f}')} | "
            f"{fmt(per_img, '{:.3f}')} | {speed} |"
        )
    if "trust" in result:
        lines += [
            "",
            "| precision | consistency (x1e-5) | invertibility max abs |",
            "|---|---|---|",
        ]
        lines += [
            f"| {t['precision']} | {t['consistency_x1e5']:.4g} | {t['invertibility_max_abs']:.2e} |"
            for t in result["trust"]
        ]
    return "\n".join(lines) + "\n"


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="benchmark")
@report_errors
def main(cfg: DictConfig) -> None:
    run_benchmark(cfg)


if __name__ == "__main__":
    preflight(sys.argv[1:])
    main()
