"""Super-resolve your own LR images: `python -m gpsr.sample ckpt=... input=<file|folder> output=<folder>`.

Writes `<name>_sr.png` (or `<name>_sr{k}.png` for `sampler.samples=K` plus `<name>_std.png`,
the per-pixel standard deviation over samples), optionally float32 `.npy`
(`save_float=true`), and prints each image's sampling and projection time and consistency.
With `sampler.sigma_y=<std>|auto` (and `noise_ckpt`) noisy images are super-resolved
within their noise (docs/method.md §10); `auto` prints the noise level it estimated.
Every output name is planned before the model loads: an existing file is never replaced
unless `overwrite=true`, two inputs never write the same file (`cat.png` and `cat.jpg` give
`cat_png_sr.png` and `cat_jpg_sr.png`), and no output is ever an input. A bad file gets one
line naming it; the rest go on.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image
from tqdm import tqdm

from gpsr import ops, progress
from gpsr.calibrate import calibration_for
from gpsr.data.images import IMAGE_SUFFIXES, ImageFileError, decode_rgb
from gpsr.diffusion import SPACINGS
from gpsr.inference import GPSR, load_from_config, sampled_method
from gpsr.metrics import CONSISTENCY_UNIT, per_image_consistency
from gpsr.tiling import Tiling
from gpsr.uncertainty import centre_spread, interval
from gpsr.utils.checkpoint import write_atomically
from gpsr.utils.cli import CONFIG_DIR, check_output_dir, preflight, report_errors
from gpsr.utils.errors import (
    NO_SPACE,
    NOT_WRITABLE,
    ConfigError,
    GPSRError,
    InputNotFoundError,
    OutputError,
    os_error_in_chain,
)

log = logging.getLogger("gpsr.sample")

# Consistency MSE left above the projection's target (0, or sigma^2 with noise) that is
# reported as falling short: 1e-10, a thousand times the exact projection's tolerance.
PROJECTION_SLACK = 1e-10

__all__ = ["plan_outputs", "check_plan", "sample_images", "main"]


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """(C, H, W) in [0, 1] -> (H, W, C) uint8."""
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def list_inputs(src: Path) -> list[Path]:
    """The input file, or every file of the input folder, sorted. Not recursive (all
    outputs go to one folder, named by the inputs' stems): a folder with no files of its own
    is refused in one line, which counts the images in its subfolders."""
    if not src.exists():
        raise InputNotFoundError(f"input={src} does not exist")
    if src.is_file():
        return [src]
    files = sorted(p for p in src.iterdir() if p.is_file())
    if not files:
        nested = [p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        where = (
            f"; its subfolders hold {len(nested)} image(s), e.g. {nested[0]}, but gpsr.sample "
            f"reads only the folder's own files: give a subfolder as input="
            if nested
            else ""
        )
        raise InputNotFoundError(f"input={src} holds no files{where}")
    return files


def width_png(width: torch.Tensor, bar: int = 24) -> np.ndarray:
    """width (H, W) in [0, 1] pixel units -> (H + bar, max(W, 160), 3) uint8: the width in
    matplotlib's viridis map from 0 to its maximum, above a colour bar labelled with that
    range, so the picture carries its own scale."""
    from matplotlib import colormaps
    from PIL import ImageDraw

    w = width.detach().float().cpu().numpy()
    top = float(w.max()) if w.size and w.max() > 0 else 1.0
    cmap = colormaps["viridis"]
    img = (cmap(np.clip(w / top, 0, 1))[..., :3] * 255).round().astype(np.uint8)
    side = max(img.shape[1], 160)
    canvas = np.full((img.shape[0] + bar, side, 3), 255, dtype=np.uint8)
    canvas[: img.shape[0], : img.shape[1]] = img
    ramp = (cmap(np.linspace(0, 1, side))[:, :3] * 255).round().astype(np.uint8)
    canvas[img.shape[0] + 2 : img.shape[0] + 8] = ramp[None]
    pic = Image.fromarray(canvas)
    draw = ImageDraw.Draw(pic)
    draw.text((1, img.shape[0] + 10), "0", fill=(0, 0, 0))
    label = f"{top:.3g} (width, [0,1] units)"
    draw.text((max(side - 6 * len(label) - 1, 12), img.shape[0] + 10), label, fill=(0, 0, 0))
    return np.asarray(pic)


def plan_outputs(
    files: list[Path], out_dir: Path, samples: int, save_float: bool, intervals: bool = False
) -> dict[Path, list[Path]]:
    """Every file each input will write: `<name>_sr.png` (`<name>_sr{k}.png` and
    `<name>_std.png` for samples > 1; with a calibration also `<name>_lower.png`,
    `<name>_upper.png` and `<name>_width.png`), plus `.npy` twins with save_float.
    `<name>` is the input's stem, or stem and extension (`cat_jpg`) when two inputs share a
    stem."""
    stems = [p.stem for p in files]
    plan = {}
    for path in files:
        name = path.stem if stems.count(path.stem) == 1 else f"{path.stem}_{path.suffix[1:]}"
        bases = [f"{name}_sr"] if samples == 1 else [f"{name}_sr{k}" for k in range(samples)]
        outs = [out_dir / f"{b}.png" for b in bases]
        if samples > 1:
            outs.append(out_dir / f"{name}_std.png")
        if intervals:
            outs += [out_dir / f"{name}_{part}.png" for part in ("lower", "upper", "width")]
        if save_float:
            outs += [o.with_suffix(".npy") for o in outs]
        plan[path] = outs
    return plan


def check_plan(plan: dict[Path, list[Path]], overwrite: bool) -> None:
    """Refuse, in one line, outputs that would replace a file or another output, or an input."""
    inputs = {p.resolve() for p in plan}
    seen: dict[Path, Path] = {}
    for src, outs in plan.items():
        for out in outs:
            key = out.resolve()
            if key in seen:
                raise ConfigError(f"{src} and {seen[key]} would both write {out}; rename one")
            seen[key] = src
            if out.exists() and not overwrite:
                raise ConfigError(
                    f"output {out} already exists; choose another output= folder or set "
                    f"overwrite=true"
                )
            if key in inputs:
                raise ConfigError(
                    f"output {out} of {src} is itself an input: write to another folder "
                    f"(output=...)"
                )


def prepare_output(out_dir: Path) -> Path:
    """The output folder, created and checked writable (before any model is loaded)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"output={out_dir} is a file, not a folder")
    return check_output_dir(out_dir, setting="output=")


def check_settings(cfg: DictConfig) -> Tiling:
    """Refuse bad sampling settings in one line each, by their names, before loading;
    -> the tiling they describe."""
    sampler = cfg.sampler

    def integer(name: str, low: int) -> None:
        value = sampler.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"sampler.{name} must be an integer >= {low}, got {value!r}")

    integer("steps", 0)
    integer("samples", 1)
    sigma_y = sampler.get("sigma_y", 0.0)
    if sigma_y != "auto" and (
        isinstance(sigma_y, bool) or not isinstance(sigma_y, (int, float)) or sigma_y < 0
    ):
        raise ConfigError(
            f"sampler.sigma_y must be the LR noise std >= 0 in [0, 1] pixel units or 'auto', "
            f"got {sigma_y!r}"
        )
    eta = sampler.get("eta")
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or eta < 0:
        raise ConfigError(f"sampler.eta must be a number >= 0, got {eta!r}")
    if sampler.get("spacing") not in SPACINGS:
        raise ConfigError(
            f"sampler.spacing must be one of {', '.join(SPACINGS)}, got {sampler.get('spacing')!r}"
        )
    tiling = Tiling.from_config(sampler)
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int):
        raise ConfigError(f"seed must be an integer, got {cfg.seed!r}")
    return tiling


def sample_images(cfg: DictConfig) -> int:
    """Process every input image; returns the number of files that failed."""
    src, out_dir = Path(cfg.input), Path(cfg.output)
    tiling = check_settings(cfg)
    files = list_inputs(src)
    cal = calibration_for(cfg, cfg.sampler.steps)  # with precision=auto: the calibration's
    lam = cal["lambda"] if cal is not None else None
    plan = plan_outputs(files, out_dir, cfg.sampler.samples, cfg.save_float, lam is not None)
    check_plan(plan, cfg.get("overwrite", False))
    prepare_output(out_dir)
    model = load_from_config(cfg)
    if lam is not None and model.unet is None:
        raise ConfigError(
            f"calibration= with {cfg.ckpt}, a flow-stage checkpoint: give the one calibrated"
        )
    steps = cfg.sampler.steps
    if model.unet is None and steps > 0:
        log.warning(
            "%s is a flow-stage checkpoint (no diffusion model): flow-only sampling, "
            "sampler.steps=%d ignored",
            cfg.ckpt,
            steps,
        )
        steps = 0
    failures = 0
    bars = progress.show_bars(cfg.get("progress", True))
    for path, outs in tqdm(plan.items(), desc="images", unit="image", disable=not bars):
        try:
            process_one(model, path, outs, steps, tiling, cfg, lam, bars)
        except GPSRError as err:
            failures += 1
            msg = str(err) if str(path) in str(err) else f"{path}: {err}"
            say(f"skipped: {msg}", file=sys.stderr)
    return failures


def say(line: str, file=None) -> None:
    """print, through tqdm so that a progress bar on the terminal is not overwritten; flushed
    like print(flush=True), so a log that is piped or tailed gets each line as it comes."""
    out = file or sys.stdout
    tqdm.write(line, file=out)
    out.flush()


def image_work_units(
    model: GPSR, lr_height: int, lr_width: int, steps: int, tiling: Tiling, sampler
) -> int:
    """Units of progress of one LR image in `gpsr.sample`: each sample's UNet calls and
    decode (`GPSR.work_units`), and one for the projection when `sampler.project`."""
    one = model.work_units(
        lr_height, lr_width, steps, tiling, precision=sampler.get("precision", "fp32")
    )
    return int(sampler.samples) * one + (1 if sampler.project else 0)


def process_one(
    model: GPSR,
    path: Path,
    outs: list[Path],
    steps: int,
    tiling: Tiling,
    cfg: DictConfig,
    lam: float | None = None,
    bars: bool = False,
) -> None:
    """Super-resolve one LR file and write its planned outputs (with `lam`, a calibrated
    lambda, its interval maps too); GPSRError on a bad file. `bars`: a progress bar over
    this image's UNet calls, decodes and projection (`image_work_units`), shown once the
    image has taken 2 s."""
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise ImageFileError(f"{path}: not an image file ({', '.join(IMAGE_SUFFIXES)})")
    img = decode_rgb(path, cfg.get("max_pixels"))
    h, w = img.shape[-2:]
    multiple, minimum = model.lr_size_rule()
    if min(h, w) < minimum:
        raise ImageFileError(
            f"{path} is {w}x{h}; this model needs LR images of at least {minimum}x{minimum}"
        )
    if h % multiple or w % multiple:
        img = ops.modcrop(img, multiple)
        log.warning(
            "%s: %dx%d is not a multiple of %d; cropped to %dx%d",
            path,
            w,
            h,
            multiple,
            img.shape[-1],
            img.shape[-2],
        )
    lr = (img.float() / 255.0)[None].to(model.device)
    sampler = cfg.sampler
    t0 = time.perf_counter()
    sigma_y = sampler.get("sigma_y", 0.0)
    sigma = model.noise_level(lr, sigma_y)
    noisy = bool((sigma > 0).any())
    if sigma_y == "auto":
        say(f"{path.name}: estimated noise sigma {float(sigma[0]):.4g}")
    units = image_work_units(model, lr.shape[-2], lr.shape[-1], steps, tiling, sampler)
    bar = tqdm(total=units, desc=path.name, unit="call", leave=False, delay=2, disable=not bars)
    t_proj = 0.0
    with bar, progress.reporting(bar.update):
        sr = sampled_method(model, cfg, steps, tiling)(lr, [0], sigma)
        stack = sr if sampler.samples > 1 else sr[:, None]  # (1, K, C, H, W)
        sampled = stack
        if sampler.project:
            t1 = time.perf_counter()
            bar.set_postfix_str("projecting")
            stack, _ = model.project(stack, lr, sigma)
            progress.advance()
            t_proj = time.perf_counter() - t1
    reps = lr.expand(stack.shape[1], -1, -1, -1)
    timing = f"sampled in {time.perf_counter() - t0 - t_proj:.3g} s"

    def agreement(x: torch.Tensor) -> str:
        """Consistency x1e-5, or with noise the discrepancy ratio ||D(x) - y||^2/(m sigma^2)."""
        mse = per_image_consistency(x, reps, model.scale).mean().item()
        if noisy:
            return f"{mse / float(sigma[0]) ** 2:.3g}"
        return f"{mse / CONSISTENCY_UNIT:.4g}"

    what = "discrepancy ratio (1 = within the noise)" if noisy else "consistency x1e-5"
    consistency = f"{what}: sample {agreement(sampled[0])}"
    if sampler.project:
        timing += f", projected in {t_proj:.3g} s"
        consistency += f", projected {agreement(stack[0])}"
        short = per_image_consistency(stack[0], reps, model.scale) - sigma.double() ** 2
        if float(short.max()) > PROJECTION_SLACK:
            say(
                f"warning: {path.name}: the projection stopped short of its target (residual "
                f"{float(short.max()):.3g} MSE above it): no image in [0, 1] may produce this "
                f"LR image exactly (e.g. a resized or sharpened photo); its closest is written",
                file=sys.stderr,
            )
    write_outputs(stack[0], outs, cfg.save_float, lam)
    say(
        f"{path.name}: {w}x{h} -> {stack.shape[-1]}x{stack.shape[-2]}, {stack.shape[1]} sample(s), "
        f"{timing}, {consistency}, 8-bit PNG {agreement((stack[0] * 255).round() / 255)}",
    )


def write_outputs(
    samples: torch.Tensor, outs: list[Path], save_float: bool, lam: float | None = None
) -> None:
    """Write K samples (K, C, H, W) in [0, 1] to the planned files: PNGs (and for K > 1 the
    per-pixel standard deviation, scaled to its maximum; with `lam`, a calibrated lambda, the
    interval's lower and upper bounds as images and its width, averaged over channels, as a
    colour map with its scale in [0, 1] pixel units: `width_png`), and float32 .npy twins.

    All or nothing (`write_atomically`): a full or read-only disk leaves no partial file and
    nothing of this image (an OutputError in one line; a rerun is not blocked)."""
    images: list[torch.Tensor | np.ndarray] = list(samples)
    floats = list(samples)
    if samples.shape[0] > 1:
        std = samples.std(0)
        images.append(std / std.max().clamp(min=1e-8))
        floats.append(std)
    if lam is not None:
        lower, upper = interval(*centre_spread(samples[None]), lam)
        width = (upper - lower)[0]
        images += [lower[0], upper[0], width_png(width.mean(0))]
        floats += [lower[0], upper[0], width]

    def png(fh, x) -> None:
        Image.fromarray(x if isinstance(x, np.ndarray) else _to_uint8(x)).save(fh, format="PNG")

    jobs = [
        (target, lambda fh, x=img: png(fh, x))
        for img, target in zip(images, [o for o in outs if o.suffix == ".png"])
    ]
    if save_float:
        jobs += [
            (
                target,
                lambda fh, x=arr: np.save(fh, x.permute(1, 2, 0).cpu().numpy().astype(np.float32)),
            )
            for arr, target in zip(floats, [o for o in outs if o.suffix == ".npy"])
        ]
    try:
        write_atomically(jobs)
    except Exception as err:
        full = os_error_in_chain(err, NO_SPACE)
        denied = os_error_in_chain(err, NOT_WRITABLE)
        if full is None and denied is None:
            raise
        why = "no space left on its disk" if full is not None else "the folder is not writable"
        raise OutputError(
            f"cannot write {jobs[0][0].parent}/{jobs[0][0].stem}...: {why}; nothing of this "
            f"image was written (free space or choose another output=)"
        ) from None


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="sample")
@report_errors
def main(cfg: DictConfig) -> None:
    failures = sample_images(cfg)
    if failures:
        print(f"{failures} file(s) could not be processed", file=sys.stderr)
        raise SystemExit(1)


def refuse_data_settings(argv: list[str]) -> None:
    """gpsr.sample takes LR images as given: refuse `data.*` settings (e.g. data.lr_noise,
    which adds noise where gpsr makes the LR) in one line, pointing to sampler.sigma_y."""
    for arg in argv:
        if arg.lstrip("+~").startswith("data."):
            print(
                f"gpsr: error: {arg}: gpsr.sample super-resolves LR images as given and has no "
                f"data settings (data.lr_noise adds noise where gpsr makes the LR: training and "
                f"gpsr.evaluate); for noisy images set sampler.sigma_y=<noise std>|auto",
                file=sys.stderr,
            )
            raise SystemExit(1)


if __name__ == "__main__":
    preflight(sys.argv[1:])
    refuse_data_settings(sys.argv[1:])
    main()
