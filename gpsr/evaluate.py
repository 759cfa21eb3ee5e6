"""Table 1 evaluation: `python -m gpsr.evaluate ckpt=... [data=celebahq data.root=...]`.

Evaluates GPSR and the baselines that need no training (bicubic upsampling, the linear
pseudoinverse of Remark 1, flow-only sampling) on the same images, and writes
`metrics.json`, `metrics.md` and an image panel to the run folder. With `-m
sampler.steps=1,2,4,7` each NFE count is one job; `gpsr.report` gathers them. With
`data.lr_noise` / `data.lr_quantize` every method is given the same noisy LR images, and
`sampler.sigma_y` (with `noise_ckpt`) makes the sampler noise-aware (docs/method.md §10).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from PIL import Image
from tqdm import tqdm

from gpsr import ops, progress
from gpsr.calibrate import calibration_for
from gpsr.configs import register as register_schemas
from gpsr.diffusion import add_diagnostic, diagnostic_means
from gpsr.inference import GPSR, load_from_config, sampled_method
from gpsr.learned import build_all
from gpsr.metrics import SRMetrics
from gpsr.panels import panel_rows, to_uint8_grid
from gpsr.report import perception_distortion, results_table
from gpsr.tiling import Tiling
from gpsr.uncertainty import IntervalMetrics, centre_spread, interval
from gpsr.utils.cli import CONFIG_DIR, check_output_dir, preflight, report_errors
from gpsr.utils.device import synchronize
from gpsr.utils.errors import ConfigError

log = logging.getLogger("gpsr.evaluate")

__all__ = [
    "evaluate",
    "build_methods",
    "run_methods",
    "summarise",
    "write_artifacts",
    "markdown_table",
    "main",
]

Method = Callable[[torch.Tensor, list[int], torch.Tensor], torch.Tensor]


def build_methods(model: GPSR, cfg: DictConfig) -> dict[str, tuple[Method, str]]:
    """name -> (fn(lr01 (N,C,h,w), indices, sigma (N,)) -> sr01 (N,C,H,W) or (N,K,C,H,W),
    NFE label). Every method gets the same (possibly noisy) LR; the sampled ones also the
    noise level of each image (`GPSR.noise_level`); bicubic and the pseudoinverse use the LR
    as given."""
    s, sampler = model.scale, cfg.sampler
    tiling = Tiling.from_config(sampler)
    methods: dict[str, tuple[Method, str]] = {}
    if "bicubic" in cfg.baselines:
        methods["bicubic"] = (lambda lr, idx, sig: ops.upsample_bicubic(lr, s).clamp(0, 1), "0")
    if "pseudoinverse" in cfg.baselines:
        methods["pseudoinverse"] = (
            lambda lr, idx, sig: ops.pseudoinverse(lr, s).clamp(0, 1),
            "0",
        )
    if "flow" in cfg.baselines or model.unet is None or sampler.steps == 0:
        methods["flow"] = (sampled_method(model, cfg, 0, tiling), "0+1")
    if model.unet is not None and sampler.steps > 0:
        methods["gpsr"] = (sampled_method(model, cfg, sampler.steps, tiling), f"{sampler.steps}+1")
    return methods


def markdown_table(methods: dict[str, dict[str, Any]]) -> str:
    """A Table 1-style Markdown table of per-method results (`gpsr.report.results_table`);
    with noisy LR images also the consistency with the clean LR and the discrepancy ratio."""
    return results_table(list(methods.items()))


def diagnostic_table(d: dict[str, Any]) -> str:
    """Markdown of the per-timestep diagnostic written to `metrics.json["loss_by_t"]`."""
    head = "| t | " + " | ".join(str(t) for t in d["t"]) + " |"
    rule = "|---" * (len(d["t"]) + 1) + "|"
    loss = f"| loss ({d['prediction']}) | " + " | ".join(f"{v:.3g}" for v in d["loss"]) + " |"
    x0 = "| x0 MSE | " + " | ".join(f"{v:.3g}" for v in d["x0_mse"]) + " |"
    return (
        f"\nDiffusion error by noise level (test images, EMA weights; always predicting the "
        f"latent mean gives an x0 MSE of {d['mean_predictor_x0_mse']:.3g}):\n\n"
        f"{head}\n{rule}\n{loss}\n{x0}\n"
    )


@dataclass
class EvalRun:
    """What running the methods over a split accumulates."""

    metrics: dict[str, SRMetrics]
    seconds: dict[str, float]
    images: int = 0
    sigmas: list[torch.Tensor] = field(default_factory=list)
    projection_iterations: list[torch.Tensor] = field(default_factory=list)
    panel: dict[str, torch.Tensor] | None = None
    diagnostic: dict[str, torch.Tensor] | None = None
    intervals: tuple[str, IntervalMetrics] | None = None  # (method, its interval metrics)


def noisy_evaluation(cfg: DictConfig) -> tuple[bool, bool]:
    """(the data holds clean LR images beside noisy or rounded ones: `consistency_clean`;
    the sampler is noise-aware: `discrepancy_ratio`)."""
    data = cfg.data
    clean = bool(data.get("lr_noise", 0) or data.get("lr_quantize", False))
    return clean, cfg.sampler.get("sigma_y", 0) != 0


def _projected_base(methods: dict[str, tuple[Method, str]], cfg: DictConfig) -> str | None:
    """The sampled method whose outputs `sampler.project=true` projects (GPSR, else flow)."""
    if not cfg.sampler.project:
        return None
    return "gpsr" if "gpsr" in methods else "flow"


def check_metric_settings(cfg: DictConfig) -> None:
    """metrics.extras / y_channel true or false, metrics.crop_border an integer >= 0, or one
    line naming the setting."""
    settings = cfg.get("metrics") or {}
    for key in ("extras", "y_channel"):
        if not isinstance(settings.get(key, False), bool):
            raise ConfigError(f"metrics.{key} must be true or false, got {settings.get(key)!r}")
    crop = settings.get("crop_border", 0)
    if isinstance(crop, bool) or not isinstance(crop, int) or crop < 0:
        raise ConfigError(f"metrics.crop_border must be an integer >= 0, got {crop!r}")


def mean_method(methods: dict[str, tuple[Method, str]], cfg: DictConfig) -> str | None:
    """With K >= 2 samples, the sampled method whose per-pixel mean of the K samples is
    reported as `<method>_mean` (GPSR, else flow-only sampling): the estimate that
    maximises expected PSNR, at the other end of the perception-distortion trade-off from
    one sample."""
    if cfg.sampler.samples < 2:
        return None
    return "gpsr" if "gpsr" in methods else "flow"


def interval_method(methods: dict[str, tuple[Method, str]], cfg: DictConfig) -> str | None:
    """The method whose K samples give the per-pixel interval (docs/uncertainty.md): GPSR
    (flow-only sampling without a diffusion model), projected when `sampler.project`; None
    for one sample."""
    if cfg.sampler.samples < 2:
        return None
    base = "gpsr" if "gpsr" in methods else "flow"
    return f"{base}_projected" if cfg.sampler.project else base


@torch.no_grad()
def run_methods(
    model: GPSR,
    methods: dict[str, tuple[Method, str]],
    loader,
    cfg: DictConfig,
    lam: float | None = None,
) -> EvalRun:
    """Every method (and the projection) on every batch of the split; metrics accumulated.
    With K >= 2 samples, the interval of `interval_method` at lambda = 1 and, given `lam`
    (a calibrated lambda), at `lam`."""
    device = model.device
    proj_base = _projected_base(methods, cfg)
    mean_of = mean_method(methods, cfg)
    names = list(methods) + ([f"{proj_base}_projected"] if proj_base else [])
    if mean_of is not None:
        names += [f"{mean_of}_mean"] + ([f"{mean_of}_mean_projected"] if proj_base else [])
    clean, noisy = noisy_evaluation(cfg)
    settings = cfg.get("metrics") or {}
    learned, sets = build_all(settings.get("learned"), device)
    run = EvalRun(
        {
            n: SRMetrics(
                model.scale,
                clean,
                noisy,
                extras=bool(settings.get("extras", False)),
                y_channel=bool(settings.get("y_channel", False)),
                crop=int(settings.get("crop_border", 0)),
                learned=learned,
                sets=sets,
            ).to(device)
            for n in names
        },
        dict.fromkeys(names, 0.0),
    )
    if (target := interval_method(methods, cfg)) is not None:
        run.intervals = (target, IntervalMetrics(lam).to(device))
    limit = cfg.limit_batches
    for b, batch in enumerate(
        tqdm(loader, desc=f"evaluate {cfg.split}", disable=not progress.show_bars(cfg.progress))
    ):
        if limit is not None and b >= limit:
            break
        hr = ops.to_unit(batch["hr"].to(device))
        lr = ops.to_unit(batch["lr"].to(device))
        lr_clean = ops.to_unit(batch["lr_clean"].to(device)) if clean else None
        idx = batch["index"].tolist()
        run.images += hr.shape[0]
        sigma = model.noise_level(lr, cfg.sampler.get("sigma_y", 0.0))  # (N,), 0: the paper
        run.sigmas.append(sigma.cpu())
        if model.unet is not None and cfg.diagnostic_buckets > 0:
            part = model.diagnostic(batch["hr"].to(device), idx, cfg.seed, cfg.diagnostic_buckets)
            run.diagnostic = add_diagnostic(run.diagnostic, part)
        outputs = {}
        for name, (fn, _) in methods.items():
            synchronize(device)
            t0 = time.perf_counter()
            outputs[name] = fn(lr, idx, sigma)
            synchronize(device)
            run.seconds[name] += time.perf_counter() - t0
        if proj_base:
            t0 = time.perf_counter()
            proj, iters = model.project(outputs[proj_base], lr, sigma)
            synchronize(device)
            run.seconds[f"{proj_base}_projected"] += time.perf_counter() - t0
            run.projection_iterations.append(iters.flatten())
            outputs[f"{proj_base}_projected"] = proj
        if mean_of is not None:  # the per-pixel mean of the K samples (and its projection)
            mean = outputs[mean_of].mean(1)
            outputs[f"{mean_of}_mean"] = mean
            if proj_base:
                t0 = time.perf_counter()
                outputs[f"{mean_of}_mean_projected"] = model.project(mean, lr, sigma)[0]
                run.seconds[f"{mean_of}_mean_projected"] += time.perf_counter() - t0
        for name, out in outputs.items():
            for sr in out.unbind(1) if out.dim() == 5 else [out]:
                run.metrics[name].update(sr, hr, lr, lr_clean, sigma)
        if run.intervals is not None:
            run.intervals[1].update(outputs[run.intervals[0]], hr)
        if run.panel is None:
            last = proj_base and f"{proj_base}_projected" or next(reversed(methods))
            firsts = {name: out[:, 0] if out.dim() == 5 else out for name, out in outputs.items()}
            std = outputs[last].std(1) if outputs[last].dim() == 5 else None
            width = None
            if run.intervals is not None and lam is not None:
                lower, upper = interval(*centre_spread(outputs[run.intervals[0]]), lam)
                width = upper - lower
            run.panel = panel_rows(lr, hr, firsts, model.scale, last, std, width)
    if run.images == 0:
        raise ConfigError(f"the {cfg.split} split gave no images to evaluate")
    return run


def summarise(
    run: EvalRun, methods: dict[str, tuple[Method, str]], model: GPSR, cfg: DictConfig
) -> dict[str, Any]:
    """What `metrics.json` holds: per-method metrics, time per image, NFEs, diagnostics."""
    nfe = {name: label for name, (_, label) in methods.items()}
    its = torch.cat(run.projection_iterations).float() if run.projection_iterations else None
    results: dict[str, dict[str, Any]] = {}
    for name, metric in run.metrics.items():
        base = name.removesuffix("_projected")
        sampled = base.removesuffix("_mean")  # gpsr_mean costs what gpsr costs
        seconds = run.seconds[name] + (run.seconds[sampled] if name != sampled else 0.0)
        results[name] = {
            **metric.compute(worst=True),
            "seconds_per_image": seconds / run.images,
            "nfe": nfe[sampled] if base == sampled else f"{nfe[sampled]} x{cfg.sampler.samples}",
        }
        if run.intervals is not None and run.intervals[0] == name:
            results[name].update(run.intervals[1].compute())
        if name != base and base == sampled:
            results[name]["projection_iterations"] = {
                "mean": its.mean().item(),
                "max": int(its.max()),
            }
    device = model.device
    summary = {
        "ckpt": str(cfg.ckpt),
        "split": cfg.split,
        "images": run.images,
        "samples_per_image": cfg.sampler.samples,
        "sampler": OmegaConf.to_container(cfg.sampler, resolve=True),
        "seed": cfg.seed,
        "noise": noise_summary(run, cfg),
        "prediction": model.diffusion.prediction if model.diffusion is not None else None,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "methods": results,
    }
    if run.diagnostic is not None:
        summary["loss_by_t"] = {
            "prediction": model.diffusion.prediction,
            **diagnostic_means(run.diagnostic, model.diffusion.num_timesteps),
        }
    return summary


def noise_summary(run: EvalRun, cfg: DictConfig) -> dict[str, Any]:
    """The LR noise of the evaluation and the noise levels the sampler used (for
    sampler.sigma_y=auto, the estimates: mean, median, min, max over images)."""
    sig = torch.cat(run.sigmas).double() if run.sigmas else torch.zeros(1, dtype=torch.float64)
    return {
        "lr_noise": float(cfg.data.get("lr_noise", 0.0)),
        "lr_quantize": bool(cfg.data.get("lr_quantize", False)),
        "noise_ckpt": cfg.get("noise_ckpt"),
        "sigma_y": cfg.sampler.get("sigma_y", 0.0),
        "sigma_used": {
            "mean": sig.mean().item(),
            "median": sig.median().item(),
            "min": sig.min().item(),
            "max": sig.max().item(),
        },
    }


def write_artifacts(
    summary: dict[str, Any], panel: dict[str, torch.Tensor] | None, cfg: DictConfig, out: Path
) -> str:
    """metrics.json, metrics.md and panel.png in the run folder; returns the Markdown table."""
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    table = markdown_table(summary["methods"])
    note = ""
    projected = [m for m in summary["methods"].values() if "projection_iterations" in m]
    if projected:
        its = projected[0]["projection_iterations"]
        target = (
            "the images within the noise of the given LR (||D(x) - y||^2 <= m sigma^2) inside "
            "[0, 1] (semi-smooth Newton, gpsr.projection.project_noise_ball)"
            if summary["noise"]["sigma_y"] != 0
            else "the consistent images inside [0, 1] (semi-smooth Newton, "
            "gpsr.projection.project_consistent_box)"
        )
        note = (
            f"\nProjection onto {target} took {its['mean']:.1f} iterations per "
            f"image on average (at most {its['max']}).\n"
        )
    if "calibration" in summary:
        c = summary["calibration"]
        note += (
            f"\nIntervals: mean +/- lambda (std + half a level) of the samples, lambda = "
            f"{c['lambda']:g} from `{c['file']}` (alpha {c['alpha']:g}, delta {c['delta']:g}, "
            f"{c['images']} images of its {c['split']} split): the expected fraction of pixels "
            f"outside is at most alpha with probability 1 - delta for images from the "
            f"calibration's distribution only (docs/uncertainty.md); lambda = 1 is the "
            f"uncalibrated interval.\n"
        )
    if "loss_by_t" in summary:
        note += diagnostic_table(summary["loss_by_t"])
    columns = " | ".join(panel) if panel is not None else ""
    noise = summary["noise"]
    noise_line = ""
    if noise["lr_noise"] or noise["lr_quantize"] or noise["sigma_y"] != 0:
        used = noise["sigma_used"]
        noise_line = (
            f"LR noise: sigma {noise['lr_noise']:g}"
            f"{', rounded to 8 bits' if noise['lr_quantize'] else ''}; sampler.sigma_y="
            f"{noise['sigma_y']} (used: mean {used['mean']:.4g}, median {used['median']:.4g}, "
            f"min {used['min']:.4g}, max {used['max']:.4g}). Consistency is against the LR "
            f"each method was given; consistency clean against the noise-free LR; the "
            f"discrepancy ratio is ||D(x) - y||^2 / (m sigma^2) with the sigma the sampler used "
            f"(docs/method.md §10).\n\n"
        )
    (out / "metrics.md").write_text(
        f"# Evaluation of `{cfg.ckpt}`\n\n{summary['images']} images ({cfg.split} split), "
        f"{cfg.sampler.samples} sample(s) each, eta={cfg.sampler.eta}, seed={cfg.seed}.\n\n"
        f"{noise_line}{table}{note}\n`panel.png` columns: {columns}.\n"
    )
    if panel is not None:
        Image.fromarray(to_uint8_grid(panel, max_images=8)).save(out / "panel.png")
    perception_distortion(list(summary["methods"].items()), out / "perception_distortion.png")
    return table


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """The Table 1 protocol over a whole split: build the methods, run them, summarise, write
    the artifacts; returns what `metrics.json` holds."""
    output_dir = check_output_dir(cfg.paths.output_dir)
    model = load_from_config(cfg)
    with open_dict(cfg):
        if cfg.scale is None:
            cfg.scale = model.scale
    if cfg.scale != model.scale:
        raise ConfigError(
            f"scale={cfg.scale} but checkpoint {cfg.ckpt} was trained for scale {model.scale}"
        )
    check_metric_settings(cfg)
    cal = calibration_for(cfg, cfg.sampler.steps if model.unet is not None else 0)
    lam = cal["lambda"] if cal is not None else None
    loader = instantiate(cfg.data).eval_dataloader(cfg.split)
    methods = build_methods(model, cfg)
    run = run_methods(model, methods, loader, cfg, lam)
    summary = summarise(run, methods, model, cfg)
    if cal is not None:
        summary["calibration"] = {"file": str(cfg.calibration), **{
            k: cal[k] for k in ("lambda", "alpha", "delta", "bound", "images", "split")
        }}  # fmt: skip
    table = write_artifacts(summary, run.panel, cfg, output_dir)
    log.info("\n%s", table)
    _log_to_loggers(cfg, summary, output_dir)
    return summary


def _log_to_loggers(cfg: DictConfig, summary: dict[str, Any], output_dir: Path) -> None:
    """Send the evaluation to the configured loggers (e.g. one W&B run per sweep job)."""
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    if not loggers:
        return
    flat = {
        f"eval/{m}/{k}": v
        for m, vals in summary["methods"].items()
        for k, v in vals.items()
        if isinstance(v, (int, float))
    }
    flat["eval/steps"] = cfg.sampler.steps
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        lg.log_metrics(flat, step=0)
        if hasattr(lg, "log_image") and (output_dir / "panel.png").is_file():
            lg.log_image("eval/panel", [np.asarray(Image.open(output_dir / "panel.png"))], step=0)
        lg.finalize("success")


register_schemas()  # the defaults that conf/stage and conf/data extend


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")
@report_errors
def main(cfg: DictConfig) -> float | None:
    summary = evaluate(cfg)
    best = summary["methods"].get("gpsr") or summary["methods"].get("flow")
    return best["psnr"] if best else None


if __name__ == "__main__":
    preflight(sys.argv[1:])
    main()
