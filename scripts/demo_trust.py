"""`make demo-trust`: trust under noise with the `make demo` models (docs/demo/trust.md).

The demo's 16 test tiles with Gaussian LR noise of sigma 0, 0.02 and 0.05 (`data.lr_noise`,
clamped to [0, 1], seeded per tile), each evaluated by `gpsr.evaluate` (7+1 NFEs, one sample
per tile, seed 0, projection on) three ways: noise-unaware (`sampler.sigma_y=0`, the paper's
sampler, its projection exact onto the noisy LR), noise-aware with the true sigma, and
noise-aware with `sampler.sigma_y=auto`. Bicubic upsampling and flow-only sampling of the
same noisy LR are the baselines. Also the noise model's estimate of sigma on every tile, and
the NFE sweep under noise (1, 7 and 100 steps at sigma 0.05, unaware and aware).

Writes <out>/trust.json and <out>/trust.md (default out: demo/trust); needs
demo/ddpm/checkpoints/last.ckpt and demo/noise/checkpoints/last.ckpt.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from gpsr import ops
from gpsr.configs import register
from gpsr.data import GPSRDataModule
from gpsr.diffusion import measurement_noise
from gpsr.evaluate import evaluate
from gpsr.loading import load_noise_model
from gpsr.utils.cli import CONFIG_DIR

REPO = Path(__file__).resolve().parents[1]
SIGMAS = (0.0, 0.02, 0.05)
MODES = (("unaware", "0"), ("known", None), ("auto", "auto"))  # None: the true sigma
SWEEP_SIGMA, SWEEP_STEPS = 0.05, (1, 7, 100)


def run_eval(
    ckpt: Path, noise: Path, sigma: float, sigma_y: str, out: Path, steps: int = 7
) -> dict:
    """One `gpsr.evaluate` run in this process (as `python -m gpsr.evaluate` composes it)."""
    overrides = [
        f"ckpt={ckpt}",
        f"noise_ckpt={noise}",
        f"data.lr_noise={sigma}",
        f"sampler.sigma_y={sigma_y}",
        f"sampler.steps={steps}",
        "sampler.samples=1",
        "sampler.project=true",
        "baselines=[bicubic,flow]",
        "diagnostic_buckets=0",
        "progress=false",
        f"paths.output_dir={out}",
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=overrides)
    return evaluate(cfg)


def estimates(noise_ckpt: Path, scale: int) -> dict[str, dict]:
    """The noise model's estimate on every test tile at each sigma (the same noisy LR as
    `data.lr_noise` gives the evaluation)."""
    model = load_noise_model(noise_ckpt, scale)
    data = GPSRDataModule(size=32, scale=scale, seed=0)
    batch = next(iter(data.eval_dataloader("test")))
    clean = ops.to_unit(batch["lr"])
    out = {}
    for sigma in SIGMAS:
        noise = measurement_noise(clean.shape[1:], batch["index"].tolist(), 0)
        noisy = ops.noisy_measurement(clean, sigma, noise)
        with torch.no_grad():
            est = model.estimate(noisy).double()
        rel = (est.mean() / sigma - 1).item() if sigma > 0 else None
        out[f"{sigma:g}"] = {
            "per_tile": [round(v, 5) for v in est.tolist()],
            "mean": est.mean().item(),
            "median": est.median().item(),
            "min": est.min().item(),
            "max": est.max().item(),
            "relative_error_of_mean": rel,
            "median_relative_error": (est / sigma - 1).abs().median().item() if sigma else None,
        }
    return out


ROWS = (
    # (label, mode, method in metrics.json)
    ("bicubic of the noisy LR", "unaware", "bicubic"),
    ("flow-only, noise-unaware", "unaware", "flow"),
    ("GPSR 7+1, noise-unaware (the paper)", "unaware", "gpsr"),
    ("GPSR 7+1, noise-unaware, projected (exact)", "unaware", "gpsr_projected"),
    ("flow-only, noise-aware (true sigma)", "known", "flow"),
    ("GPSR 7+1, noise-aware (true sigma)", "known", "gpsr"),
    ("GPSR 7+1, noise-aware (true sigma), projected", "known", "gpsr_projected"),
    ("GPSR 7+1, noise-aware (sigma auto)", "auto", "gpsr"),
    ("GPSR 7+1, noise-aware (sigma auto), projected", "auto", "gpsr_projected"),
)


def markdown(result: dict) -> str:
    lines = [
        "# Trust under noise (`make demo-trust`)",
        "",
        f"Machine: {result['machine']}; {result['seconds']:.0f} s. The `make demo` models (flow, "
        "latent DDPM, LR noise model) on its 16 test tiles (4x, LR 8 x 8), Gaussian LR noise "
        "clamped to [0, 1] and seeded per tile (`data.lr_noise`), 7+1 NFEs, one sample per "
        "tile, seed 0. PSNR and SSIM against the clean HR; consistency against the LR the "
        "method was given (noisy), consistency clean against the noise-free LR (both x1e-5 "
        "MSE); discrepancy ratio `||D(x) - y||^2 / (m sigma^2)` with the sigma the sampler "
        "used (mean / max over tiles; 1 = a residual the size of the noise).",
        "",
    ]
    for sigma in SIGMAS:
        key = f"{sigma:g}"
        lines += [
            f"## sigma = {key}",
            "",
            "| method | PSNR | SSIM | consistency | consistency clean | discrepancy ratio |",
            "|---|---|---|---|---|---|",
        ]
        for label, mode, method in ROWS:
            if sigma == 0 and mode == "known":
                continue  # sigma_y = 0 is the unaware sampler itself
            m = result["runs"][key][mode]["methods"][method]
            clean = (
                f"{m['consistency_clean']:.4g}" if "consistency_clean" in m else "(= consistency)"
            )
            ratio = (
                f"{m['discrepancy_ratio']:.3g} / {m['discrepancy_ratio_max']:.3g}"
                if "discrepancy_ratio" in m
                else ""
            )
            lines.append(
                f"| {label} | {m['psnr']:.2f} | {m['ssim']:.4f} | {m['consistency']:.4g} | "
                f"{clean} | {ratio} |"
            )
        lines.append("")
    lines += [
        f"## NFE sweep at sigma = {SWEEP_SIGMA:g}",
        "",
        "| sampler | NFEs | PSNR | SSIM | consistency clean | discrepancy ratio | projected: PSNR "
        "| projected: consistency clean |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode in ("unaware", "known"):
        for steps in SWEEP_STEPS:
            run = result["sweep"][mode][str(steps)]["methods"]
            m, p = run["gpsr"], run["gpsr_projected"]
            ratio = f"{m['discrepancy_ratio']:.3g}" if "discrepancy_ratio" in m else ""
            label = "noise-unaware" if mode == "unaware" else f"noise-aware (sigma {SWEEP_SIGMA:g})"
            lines.append(
                f"| {label} | {steps}+1 | {m['psnr']:.2f} | {m['ssim']:.4f} | "
                f"{m['consistency_clean']:.4g} | {ratio} | {p['psnr']:.2f} | "
                f"{p['consistency_clean']:.4g} |"
            )
    lines += [
        "",
        "## The noise model's estimate of sigma (`sampler.sigma_y=auto`), per tile",
        "",
        "| true sigma | mean | median | min | max | mean vs truth | median abs. relative error |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, e in result["estimates"].items():
        rel = (
            f"{e['relative_error_of_mean']:+.1%}" if e["relative_error_of_mean"] is not None else ""
        )
        med = f"{e['median_relative_error']:.1%}" if e["median_relative_error"] is not None else ""
        lines.append(
            f"| {key} | {e['mean']:.4f} | {e['median']:.4f} | {e['min']:.4f} | {e['max']:.4f} | "
            f"{rel} | {med} |"
        )
    return "\n".join(lines) + "\n"


def machine() -> str:
    """The CPU's model name and the threads torch uses."""
    name = platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name}, {os.cpu_count()} cores, torch {torch.get_num_threads()} threads"


def main() -> int:
    out = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else REPO / "demo" / "trust"
    os.chdir(REPO)  # the files record the checkpoints' paths relative to the repository
    ckpt = Path("demo/ddpm/checkpoints/last.ckpt")
    noise = Path("demo/noise/checkpoints/last.ckpt")
    for path in (ckpt, noise):
        if not path.is_file():
            print(f"gpsr: error: {path} not found: run `make demo` first", file=sys.stderr)
            return 1
    os.environ.setdefault("WANDB_MODE", "offline")
    register()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    runs: dict[str, dict] = {}
    for sigma in SIGMAS:
        for mode, sigma_y in MODES:
            if sigma == 0 and mode == "known":
                continue
            value = f"{sigma:g}" if sigma_y is None else sigma_y
            print(f"sigma {sigma:g}, sampler.sigma_y={value}", flush=True)
            summary = run_eval(ckpt, noise, sigma, value, out / f"sigma{sigma:g}_{mode}")
            runs.setdefault(f"{sigma:g}", {})[mode] = summary
    sweep: dict[str, dict] = {}
    for mode, sigma_y in (("unaware", "0"), ("known", f"{SWEEP_SIGMA:g}")):
        for steps in SWEEP_STEPS:
            print(f"sweep: sigma {SWEEP_SIGMA:g}, sampler.sigma_y={sigma_y}, {steps}+1 NFEs")
            where = out / f"sweep_{mode}_{steps}"
            summary = run_eval(ckpt, noise, SWEEP_SIGMA, sigma_y, where, steps=steps)
            sweep.setdefault(mode, {})[str(steps)] = summary
    result = {
        "machine": machine(),
        "runs": runs,
        "sweep": sweep,
        "estimates": estimates(noise, 4),
        "seconds": time.perf_counter() - t0,
    }
    (out / "trust.json").write_text(json.dumps(result, indent=2))
    md = markdown(result)
    (out / "trust.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
