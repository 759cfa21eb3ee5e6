"""Speed and memory benchmark: `python -m gpsr.benchmark` (paper configs by default).

Every row is measured twice in one run on one device: the straightforward path
("reference": fp32, eager, plain modules and optimiser, as the authors' release runs) and the
optimised default ("optimized": bf16 autocast for the subnets and UNet, channels-last,
torch.compile, fused AdamW, TF32, activation checkpointing of the flow). The optimisers and
gradient clipping are the training stages' own (conf/stage/*.yaml), the DDPM step is
`GPSR.training_loss` and the flow step `flow_loss_terms`, as in training. Writes
`benchmark.json` (rows: name, mode, batch, img_per_s, tflops, peak_gib, device) and
`benchmark.md`. With `trust.ckpt=<trained DDPM ckpt>` it also reports, per precision, the
consistency and invertibility error of that model. On a CPU the sampling rows and the trained
model's rows (`demo.ckpt`) alternate the two modes in rounds and report the median of the
rounds' speed-ups (`gpsr.utils.timing.interleaved_seconds`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from gpsr import ops
from gpsr.configs import stage_module_config
from gpsr.diffusion import GaussianDiffusion
from gpsr.models.conditioning import CoarseConditioned
from gpsr.models.flow import DegradationFlow, flow_loss_terms
from gpsr.models.gpsr import GPSR
from gpsr.models.stats import LatentStats
from gpsr.models.unet import UNet
from gpsr.report import benchmark_markdown
from gpsr.utils.cli import CONFIG_DIR, check_output_dir, preflight, report_errors
from gpsr.utils.device import device_name, keep_freed_memory, pick_device, set_cpu_threads
from gpsr.utils.speed import set_tf32
from gpsr.utils.timing import count_flops, interleaved_seconds, median_seconds, paired_ratios

log = logging.getLogger("gpsr.benchmark")

__all__ = ["run_benchmark", "main"]

MODES = ("reference", "optimized")
# Rows whose two modes are timed in interleaved rounds on a CPU (`_measure_pair`).
PAIRED = ("sample_7", "sample_100")


def stage_training(stage: str) -> tuple[Any, float | None]:
    """(optimizer node, grad_clip) of a training stage's config, conf/stage/<stage>.yaml
    over the stage module's defaults."""
    node = stage_module_config(stage)
    return node.optimizer, node.grad_clip


class Setup:
    """Models, optimiser and precision of one mode on one device."""

    def __init__(self, cfg: DictConfig, mode: str, device: torch.device):
        self.mode, self.device = mode, device
        opt = mode == "optimized"
        cuda = device.type == "cuda"
        set_tf32(opt and cuda)
        torch.manual_seed(0)
        flow = DegradationFlow(scale=cfg.scale, **cfg.model.flow).to(device)
        unet = UNet(**cfg.model.unet).to(device)
        # Random but non-trivial weights, so no coupling is the identity.
        with torch.no_grad():
            for p in list(flow.parameters()) + list(unet.parameters()):
                if p.abs().sum() == 0:
                    p.normal_(0, 1e-3)
        stats = LatentStats(3 * flow.channels).to(device)
        stats.ready.fill_(True)
        self.model = GPSR(flow, unet, GaussianDiffusion(), stats)
        self.flow, self.unet = flow, unet
        self.autocast = (
            torch.autocast(device.type, dtype=torch.bfloat16) if opt else contextlib.nullcontext()
        )
        self.compile = opt and cuda and cfg.compile
        flow.speed_up(checkpointing=opt, channels_last=opt and cuda, compile=self.compile)
        unet.speed_up(channels_last=opt and cuda, compile=self.compile)
        fused = {"fused": True} if opt and cuda else {}
        (flow_opt, self.flow_clip), (unet_opt, self.unet_clip) = map(
            stage_training, ("flow", "ddpm")
        )
        self.flow_opt = instantiate(flow_opt, **fused)(flow.parameters())
        self.unet_opt = instantiate(unet_opt, **fused)(unet.parameters())

    def images(self, n: int, size: int) -> torch.Tensor:
        x = torch.rand(n, self.flow.channels, size, size, device=self.device) * 2 - 1
        return x.contiguous(memory_format=torch.channels_last) if self.mode == "optimized" else x

    # -- the measured operations -------------------------------------------------------
    def flow_train(self, x: torch.Tensor) -> None:
        with self.autocast:
            loss = flow_loss_terms(self.flow, ops.dequantize(x), ops.QUANT_STEP)["loss"]
        loss.backward()
        if self.flow_clip:
            torch.nn.utils.clip_grad_norm_(self.flow.parameters(), self.flow_clip)
        self.flow_opt.step()
        self.flow_opt.zero_grad(set_to_none=True)

    def ddpm_train(self, x: torch.Tensor) -> None:
        with self.autocast:
            loss = self.model.training_loss(ops.dequantize(x))
        loss.backward()
        if self.unet_clip:
            torch.nn.utils.clip_grad_norm_(self.unet.parameters(), self.unet_clip)
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
        if self.device.type == "cpu":
            # The CPU fast path is the sampler's own (sampler.precision=auto: bf16 copies of
            # the UNet and the flow's subnets where the CPU has bf16 matrix units), not autocast.
            precision = "auto" if self.mode == "optimized" else "fp32"
            return self.model.sample_signed(lr.contiguous(), steps, precision=precision)
        with self.autocast:
            return self.model.sample_signed(lr, steps)


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


def _operation(setup: Setup, name: str, batch: int, size: int) -> Callable[[], Any]:
    """The measured operation `name` of `setup` on a fixed input of `batch` images."""
    x = setup.images(batch, size)
    return {
        "flow_train": lambda: setup.flow_train(x),
        "ddpm_train": lambda: setup.ddpm_train(x),
        "flow_inverse": lambda: setup.flow_inverse(x),
        "sample_7": lambda: setup.sample(x, 7),
        "sample_100": lambda: setup.sample(x, 100),
    }[name]


def _measure(setup: Setup, name: str, batch: int, cfg: DictConfig, flop_fn=None) -> dict[str, Any]:
    dev = setup.device
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    seconds = median_seconds(_operation(setup, name, batch, cfg.size), dev, cfg.warmup, cfg.repeats)
    return _row(
        name,
        setup.mode,
        batch,
        seconds,
        flop_fn(batch) if flop_fn else None,
        dev,
        device_name(dev),
    )


def _measure_pair(
    setups: dict[str, Setup], name: str, batch: int, cfg: DictConfig, flop_fn=None
) -> list[dict[str, Any]]:
    """Both modes' rows of `name`, timed in `cfg.repeats` interleaved rounds
    (`interleaved_seconds`): each row's seconds are its median; the optimized row also
    carries each round's speed-up (`speedup_rounds`) and their median (`speedup`)."""
    dev = next(iter(setups.values())).device
    fns = {mode: _operation(setups[mode], name, batch, cfg.size) for mode in MODES}
    seconds = interleaved_seconds(fns, dev, cfg.warmup, cfg.repeats)
    flops = flop_fn(batch) if flop_fn else None
    rows = [
        _row(name, mode, batch, statistics.median(seconds[mode]), flops, dev, device_name(dev))
        for mode in MODES
    ]
    rows[MODES.index("optimized")].update(_paired_speedup(seconds))
    return rows


def _paired_speedup(seconds: dict[str, list[float]]) -> dict[str, Any]:
    """The optimized row's speed-up fields from both modes' interleaved rounds: each round's
    reference / optimized ratio (`speedup_rounds`) and their median (`speedup`)."""
    ratios = paired_ratios(seconds["reference"], seconds["optimized"])
    return {"speedup": statistics.median(ratios), "speedup_rounds": ratios}


def _flop_counts(cfg: DictConfig, device: torch.device) -> dict[str, Callable[[int], int]]:
    """FLOPs per image of each operation (reference models, fp32, batch 1), scaled by batch."""
    ref = Setup(cfg, "reference", device)
    x = ref.images(1, cfg.size)
    lr = ops.degrade(x, ref.flow.scale)
    coarse = ops.upsample_nearest(lr, ref.flow.k)
    zhat = torch.zeros(1, *ref.flow.latent_shape(*lr.shape[-2:]), device=device)
    with torch.no_grad():
        flow_fwd = count_flops(lambda: ref.flow(x))
        unet_fwd = count_flops(
            lambda: CoarseConditioned(ref.unet, coarse)(zhat, torch.zeros(1, device=device))
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
            sr = model.super_resolve(
                ops.to_unit(lr), steps=cfg.sampler.steps, eta=cfg.sampler.eta, seed=0
            )
        cons = per_image_consistency(sr.float(), ops.to_unit(lr), model.scale).mean().item()
        rows.append(
            {
                "mode": mode,
                "precision": "bf16 autocast" if mode == "optimized" else "fp32",
                "consistency_x1e5": cons / CONSISTENCY_UNIT,
                "invertibility_max_abs": inv_err,
                "images": hr.shape[0],
                "device": device_name(device),
            }
        )
    return rows


def matmul_rows(
    device: torch.device, n: int = 2048, repeats: int = 20, warm_s: float = 1.0
) -> list[dict[str, Any]]:
    """The device's own arithmetic limit, measured in the same run: an n^3 matrix product in
    float32 and in bfloat16 (2 n^3 FLOPs each), the median of `repeats` after `warm_s`
    seconds of the same product (a CPU's matrix units reach their rate only after a warm-up:
    one warm-up call measured half the bf16 rate of a second-long warm-up here)."""
    rows = []
    for dtype, mode in ((torch.float32, "reference"), (torch.bfloat16, "optimized")):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        start = time.perf_counter()
        while time.perf_counter() - start < warm_s:
            a @ b
        seconds = median_seconds(lambda a=a, b=b: a @ b, device, 1, repeats)
        row = _row(f"matmul_{n}", mode, 1, seconds, 2 * n**3, device, device_name(device))
        row["dtype"] = str(dtype).removeprefix("torch.")
        rows.append(row)
    return rows


@torch.no_grad()
def demo_rows(
    ckpt: str, sides: list[int], device: torch.device, rounds: int = 3
) -> list[dict[str, Any]]:
    """A trained model's `super_resolve` (7+1 NFEs, tiled as gpsr.sample tiles) per output
    megapixel at each LR side, sampler.precision fp32 ("reference") and auto ("optimized"),
    timed in `rounds` interleaved rounds after one call of each (`interleaved_seconds`; the
    optimized row carries each round's speed-up and their median), with the PSNR-free check
    that matters across precisions: each sample's consistency."""
    from gpsr.metrics import CONSISTENCY_UNIT, per_image_consistency
    from gpsr.tiling import Tiling

    model = GPSR.load(ckpt, device=device)
    precisions = {"reference": "fp32", "optimized": "auto"}
    rows = []
    for side in sides:
        lr = torch.rand(
            1, model.flow.channels, side, side, generator=torch.Generator().manual_seed(0)
        )
        lr = lr.to(device)
        runs = {
            mode: lambda lr=lr, precision=precision: model.super_resolve(
                lr, steps=7, seed=0, indices=[0], tiling=Tiling(), precision=precision
            )
            for mode, precision in precisions.items()
        }
        samples = {mode: run() for mode, run in runs.items()}  # also the warm-up
        seconds = interleaved_seconds(runs, device, 0, rounds)
        for mode, sr in samples.items():
            median = statistics.median(seconds[mode])
            megapixels = sr.shape[-1] * sr.shape[-2] / 1e6
            row = _row(
                f"demo_sample_7_lr{side}", mode, 1, median, None, device, device_name(device)
            )
            row.update(
                precision=model.resolve_precision(precisions[mode]),
                seconds_per_mp=median / megapixels,
                consistency_x1e5=float(per_image_consistency(sr, lr, model.scale).mean())
                / CONSISTENCY_UNIT,
            )
            if mode == "optimized":
                row.update(_paired_speedup(seconds))
            rows.append(row)
    return rows


def run_benchmark(cfg: DictConfig) -> dict[str, Any]:
    out = check_output_dir(cfg.paths.output_dir)
    device = pick_device(cfg.device)
    if device.type == "cpu":
        set_cpu_threads()
        keep_freed_memory()  # as the sampling entry points do (training rows run with it too)
    flops = _flop_counts(cfg, device)
    rows = []
    # On a CPU, whose speed drifts with what else the host runs, the sampling rows time
    # both modes in interleaved rounds; on a GPU (steady under CUDA events, and whose peak
    # memory is per mode) every row runs one mode after the other.
    paired = [name for name in PAIRED if device.type == "cpu" and cfg.batches.get(name)]
    if paired:
        setups = {mode: Setup(cfg, mode, device) for mode in MODES}
        for name in paired:
            for batch in cfg.batches[name]:
                log.info("%s, both modes interleaved, batch %d", name, batch)
                rows += _measure_pair(setups, name, int(batch), cfg, flops[name])
        del setups
    sequential = {name: b for name, b in cfg.batches.items() if name not in paired}
    for mode in MODES if any(sequential.values()) else ():
        setup = Setup(cfg, mode, device)
        for name, batches in sequential.items():
            for batch in batches:
                log.info("%s %s batch %d", name, mode, batch)
                rows.append(_measure(setup, name, int(batch), cfg, flops[name]))
        largest = _largest_flow_batch(setup, cfg, max(cfg.batches.flow_train, default=1))
        if largest and largest not in cfg.batches.flow_train:
            rows.append(_measure(setup, "flow_train", largest, cfg, flops["flow_train"]))
        del setup
    rows += matmul_rows(device)
    if cfg.get("demo", {}).get("ckpt"):
        rows += demo_rows(
            cfg.demo.ckpt, list(cfg.demo.sides), device, int(cfg.demo.get("rounds", 3))
        )
    result: dict[str, Any] = {
        "device": device_name(device),
        "torch": torch.__version__,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "rows": rows,
    }
    if cfg.trust.ckpt:
        result["trust"] = trust_report(cfg.trust.ckpt, cfg, device)
    (out / "benchmark.json").write_text(json.dumps(result, indent=2))
    table = benchmark_markdown(result)
    (out / "benchmark.md").write_text(table)
    log.info("\n%s", table)
    return result


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="benchmark")
@report_errors
def main(cfg: DictConfig) -> None:
    run_benchmark(cfg)


if __name__ == "__main__":
    preflight(sys.argv[1:])
    main()
