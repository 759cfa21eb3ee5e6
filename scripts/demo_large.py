"""`make demo-large`: super-resolve whole images with the `make demo` model and measure how
time and memory grow with the image (docs/large_images.md).

1. The demo's held-out photo strips, whole (each far larger than a training tile): PSNR and
   consistency of bicubic, flow-only sampling, GPSR 7+1 and GPSR projected.
2. Tiled against whole-image sampling where both fit (8 photos, LR 32 x 32): PSNR,
   consistency and the seam measure of the tests (gradient across tile borders over the
   gradient at like positions elsewhere), with and without overlap.
3. `gpsr.sample` (a separate process per size, as a user runs it) on a photo at LR sides
   64, 128, 256, 512 (and 1024 with LARGE_SIDES), with `sampler.precision=fp32` and `auto`
   (LARGE_PRECISIONS): sampling and projection seconds, seconds per output megapixel, peak
   resident memory, raw and projected consistency.
4. Raw consistency of the tiled LR 256 sample against sampling the same LR image in
   independent pieces of the training size.

Writes <out>/large_images.json and <out>/large_images.md; needs demo/ddpm/checkpoints/last.ckpt.
"""

from __future__ import annotations

import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import skimage.data
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from gpsr import ops
from gpsr.data.demo import DEMO_PHOTOS, demo_photos
from gpsr.inference import GPSR
from gpsr.metrics import CONSISTENCY_UNIT
from gpsr.panels import to_uint8_grid
from gpsr.projection import project_consistent_box
from gpsr.tiling import Tiling, seam_ratio, tile_starts

REPO = Path(__file__).resolve().parents[1]
BEST_OF_S = 150.0  # `best_of`: a size is run again while its runs have taken less than this


def psnr(sr: torch.Tensor, hr: torch.Tensor) -> float:
    return (-10 * torch.log10(((sr - hr) ** 2).flatten(1).mean(1))).mean().item()


def consistency(sr: torch.Tensor, lr: torch.Tensor, scale: int) -> float:
    err = ((ops.degrade(sr.double(), scale) - lr.double()) ** 2).flatten(1).mean(1)
    return err.mean().item() / CONSISTENCY_UNIT


def strips(model: GPSR, out: Path) -> list[dict]:
    """Part 1: every held-out strip of the demo photos, super-resolved whole."""
    rows, panel = [], {}
    for name, photo in zip(DEMO_PHOTOS, demo_photos(32, 4.0)):
        # The strip held out of training (gpsr.data.demo.split_photo), whole.
        strip = photo[:, :, -32:] if photo.shape[-1] >= photo.shape[-2] else photo[:, -32:, :]
        hr = ops.modcrop(strip.float() / 255, model.scale)[None]
        lr = ops.degrade(hr, model.scale)
        t0 = time.perf_counter()
        sr = model.super_resolve(lr, steps=7, seed=0)
        seconds = time.perf_counter() - t0
        proj, _ = model.project(sr, lr)
        flow = model.super_resolve(lr, steps=0, seed=0)
        bic = ops.upsample_bicubic(lr, model.scale).clamp(0, 1)
        row = {"photo": name, "hr": list(hr.shape[-2:]), "seconds": seconds}
        for key, x in (("bicubic", bic), ("flow", flow), ("gpsr", sr), ("gpsr_projected", proj)):
            row[key] = {"psnr": psnr(x, hr), "consistency": consistency(x, lr, model.scale)}
        rows.append(row)
        for key, x in (("HR", hr), ("bicubic", bic), ("GPSR 7+1", sr)):
            flat = x[0] if x.shape[-1] >= x.shape[-2] else x[0].transpose(-1, -2)
            panel.setdefault(key, []).append(flat)
    length = min(x.shape[-1] for x in panel["HR"])  # every strip, laid flat and cut
    grid = {k: torch.stack([x[..., :length] for x in v]) for k, v in panel.items()}
    Image.fromarray(to_uint8_grid(grid, max_images=8)).save(out / "strips.png")
    return rows


def tiled_vs_whole(model: GPSR) -> dict:
    """Part 2: 8 photos at LR 32 x 32 (latent 64 x 64), 2 samples each."""
    hr = torch.stack(
        [
            TF.center_crop(
                TF.resize(
                    torch.from_numpy(getattr(skimage.data, n)().copy()).permute(2, 0, 1), 128
                ),
                [128, 128],
            ).float()
            / 255
            for n in DEMO_PHOTOS
        ]
    )
    lr = ops.degrade(hr, model.scale)
    latent = lr.shape[-1] * model.flow.k
    result = {}
    for name, tiling in (
        ("tiled", Tiling()),
        ("tiled, no overlap", Tiling(overlap=0, final_overlap=0)),
        ("whole", Tiling.whole()),
    ):
        sr = model.super_resolve(lr, steps=7, samples=2, seed=0, tiling=tiling).flatten(0, 1)
        ref, low = hr.repeat_interleave(2, 0), lr.repeat_interleave(2, 0)
        row = {"psnr": psnr(sr, ref), "consistency": consistency(sr, low, model.scale)}
        if name == "tiled":  # part 5: the projection of these 128 x 128 samples, one by one
            result["projection_4x"] = time_projection(sr, low, model.scale)
        if tiling.tile is not None:
            tile = tiling.unet_tile(model.unet, 2)
            overlap = tiling.unet_overlap(tile)
            starts = tile_starts(latent, tile, overlap, 2)
            cuts = sorted({2 * s for s in starts[1:]} | {2 * (s + tile) for s in starts[:-1]})
            row["seam_ratio"] = [seam_ratio(sr, cuts, d, 16) for d in (2, 3)]
        result[name] = row
    result["projection_8x"] = projection_8x()
    return result


def best_of(measure, budget_s: float = BEST_OF_S, most: int = 3) -> dict:
    """Run `measure()` (-> dict) until `budget_s` seconds have passed or `most` times, and
    keep the fastest: each key ending in "_s" is its minimum over the runs (on a shared
    machine the fastest run is the one least slowed down by other work), "peak_rss_gib"
    its maximum, every other key its first value; "runs" counts the runs."""
    start, results = time.perf_counter(), []
    while not results or (len(results) < most and time.perf_counter() - start < budget_s):
        results.append(measure())
    best = dict(results[0], runs=len(results))
    for key in best:
        if key.endswith("_s"):
            best[key] = min(r[key] for r in results)
        elif key == "peak_rss_gib":
            best[key] = max(r[key] for r in results)
    return best


def time_projection(sr: torch.Tensor, lr: torch.Tensor, scale: int, repeats: int = 3) -> dict:
    """Box projection of each image alone: seconds (mean, max; each image's fastest of
    `repeats` runs), Newton steps, consistency."""
    seconds, steps, cons = [], [], []
    for x, y in zip(sr, lr):
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            proj, its = project_consistent_box(x[None], y[None], scale)
            runs.append(time.perf_counter() - t0)
        seconds.append(min(runs))
        steps.append(int(its[0]))
        cons.append(consistency(proj, y[None], scale))
    return {
        "images": len(seconds), "side": sr.shape[-1], "scale": scale, "repeats": repeats,
        "seconds_mean": float(np.mean(seconds)), "seconds_max": float(np.max(seconds)),
        "steps_mean": float(np.mean(steps)), "steps_max": int(np.max(steps)),
        "consistency_max": float(np.max(cons)),
    }  # fmt: skip


def projection_8x() -> dict:
    """Part 5 at 8x (the demo model is 4x): the 8 photos at 128 x 128 plus texture noise
    whose low-pass part is mostly removed, clamped (a sample-like input, PSNR about 24 dB)."""
    hr = _photos(128)
    gen = torch.Generator().manual_seed(0)
    noise = 0.06 * torch.randn(hr.shape, generator=gen)
    noise = noise - 0.98 * ops.pseudoinverse(ops.degrade(noise, 8), 8)
    x = (hr + noise).clamp(0, 1)
    return time_projection(x, ops.degrade(hr, 8), 8)


def _photos(side: int) -> torch.Tensor:
    """The 8 bundled photos, resized and centre-cropped to side x side, in [0, 1]."""
    return torch.stack(
        [
            TF.center_crop(
                TF.resize(
                    torch.from_numpy(getattr(skimage.data, n)().copy()).permute(2, 0, 1), side
                ),
                [side, side],
            ).float()
            / 255
            for n in DEMO_PHOTOS
        ]
    )


def run_sample(ckpt: Path, image: Path, out: Path, precision: str = "auto") -> dict:
    """gpsr.sample in its own process: its printed timings and consistency, and its peak
    RSS (the maximum over this process's children, so call it from a fresh process)."""
    cmd = [
        sys.executable, "-m", "gpsr.sample", f"ckpt={ckpt}", f"input={image}",
        f"output={out}", "sampler.project=true", "overwrite=true",
        f"sampler.precision={precision}", f"hydra.run.dir={out / 'run'}",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_SILENT": "true"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB -> GiB
    line = next((x for x in stdout.splitlines() if x.startswith(image.name)), "")
    if proc.returncode or not line:
        raise SystemExit(f"gpsr.sample failed on {image}:\n{stdout[-2000:]}\n{stderr[-3000:]}")
    num = r"([0-9.e+-]+)"
    sampled = float(re.search(rf"sampled in {num} s", line).group(1))
    projected = float(re.search(rf"projected in {num} s", line).group(1))
    raw = float(re.search(rf"sample {num}", line).group(1))
    cons = float(re.search(rf"projected {num},", line).group(1))
    return {"sampling_s": sampled, "projection_s": projected, "wall_s": wall,
            "peak_rss_gib": rss, "raw_consistency": raw, "projected_consistency": cons,
            "line": line}  # fmt: skip


def _sample_in_fresh_parent(ckpt: Path, image: Path, out: Path, precision: str) -> dict:
    """`run_sample` from a fresh parent process, so the children's peak RSS is this run's."""
    code = (
        "import json, sys; from pathlib import Path; sys.path.insert(0, sys.argv[4]);"
        "from scripts.demo_large import run_sample;"
        "print(json.dumps(run_sample(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]),"
        " sys.argv[5])))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(ckpt), str(image), str(out), str(REPO), precision],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def scaling(ckpt: Path, out: Path, sides: list[int], precisions: list[str]) -> list[dict]:
    """Part 3: one gpsr.sample process per LR side and `sampler.precision`, each measured by
    a fresh parent; `best_of` repeats each while its runs have taken under `BEST_OF_S` (up
    to 3 runs: LR 512 twice, LR 1024 once on 2 cores). The precisions of one side run one
    after the other, so a slower spell of a shared machine falls on both."""
    photo = Image.fromarray(skimage.data.coffee())
    rows = []
    for side in sides:
        image = out / "inputs" / f"coffee_lr{side}.png"
        image.parent.mkdir(parents=True, exist_ok=True)
        photo.resize((side, side), Image.BICUBIC).save(image)
        for precision in precisions:
            row = best_of(
                lambda image=image, p=precision: _sample_in_fresh_parent(ckpt, image, out / "sr", p)
            )
            mp = (side * 4) ** 2 / 1e6
            row.update(lr=side, hr=side * 4, megapixels=mp, precision=precision)
            row["sampling_s_per_mp"] = row["sampling_s"] / mp
            row["projection_s_per_mp"] = row["projection_s"] / mp
            rows.append(row)
            print(
                f"LR {side}, precision {precision}: {row['line']} (peak RSS "
                f"{row['peak_rss_gib']:.2f} GiB; fastest of {row['runs']} runs: sampled in "
                f"{row['sampling_s']:.3g} s, projected in {row['projection_s']:.3g} s)",
                flush=True,
            )
    return rows


def pieces_vs_tiled(model: GPSR, side: int = 256) -> dict:
    """Part 4: raw consistency of one LR image, tiled whole vs independent training-size
    pieces (8 x 8 LR, the demo's training tiles)."""
    photo = Image.fromarray(skimage.data.coffee()).resize((side, side), Image.BICUBIC)
    lr = torch.from_numpy(np.asarray(photo).copy()).permute(2, 0, 1)[None].float() / 255
    tiled = model.super_resolve(lr, steps=7, seed=0)
    piece = 8
    parts = lr.unfold(2, piece, piece).unfold(3, piece, piece)  # (1, 3, n, n, 8, 8)
    parts = parts.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3, piece, piece)
    sr_parts = torch.cat([model.super_resolve(p, steps=7, seed=0) for p in parts.split(256)])
    return {
        "lr": side,
        "tiled": consistency(tiled, lr, model.scale),
        "pieces_of_training_size": consistency(sr_parts, parts, model.scale),
    }


def markdown(res: dict) -> str:
    lines = [
        "# Large images with the `make demo` model",
        "",
        f"Measured by `make demo-large` on {res['machine']} ({res['threads']} threads), "
        f"checkpoint `{res['ckpt']}`, default tiling (UNet tiles of its training size, 16 x 16 "
        "latent pixels, overlap 4 and 8 at the last step; flow tiles of 256 coarse pixels with "
        "the exact halo).",
        "",
        "## `gpsr.sample` as the image grows (4x, 7+1 NFEs, projection on)",
        "",
        "| LR side | HR side | `sampler.precision` | runs | sampling s | sampling speed-up "
        "| projection s | sampling s/MP "
        "| projection s/MP | peak RSS GiB | raw consistency | projected consistency |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    fp32 = {r["lr"]: r["sampling_s"] for r in res["scaling"] if r["precision"] == "fp32"}
    for r in res["scaling"]:
        speed = f"{fp32[r['lr']] / r['sampling_s']:.2f}x" if r["lr"] in fp32 else "-"
        lines.append(
            f"| {r['lr']} | {r['hr']} | {r['precision']} | {r['runs']} | "
            f"{r['sampling_s']:.3g} | {speed} | {r['projection_s']:.3g} | "
            f"{r['sampling_s_per_mp']:.1f} | {r['projection_s_per_mp']:.1f} | "
            f"{r['peak_rss_gib']:.2f} | {r['raw_consistency']:.3g} | "
            f"{r['projected_consistency']:.3g} |"
        )
    pv = res["pieces_vs_tiled"]
    lines += [
        "",
        "Times: the fastest of `runs` runs of the whole `gpsr.sample` process (each size is "
        f"run again while its runs have taken under {BEST_OF_S:.0f} s, up to 3 times; peak RSS "
        "is the largest over the runs). `auto` resolved to "
        f"{res['auto_precision']} on this machine (docs/benchmarks.md); the speed-up is over "
        "fp32 at the same side. "
        "Consistency in units of 1e-5 MSE, as in Table 1; the LR input is the photo "
        "`skimage.data.coffee()` resized to the side given.",
        "",
        f"Raw consistency at LR {pv['lr']}: tiled whole image {pv['tiled']:.3g}, the same "
        f"LR image sampled in independent 8 x 8 pieces (the training size) "
        f"{pv['pieces_of_training_size']:.3g}.",
        "",
        "## Tiled against whole-image sampling (8 photos, LR 32 x 32, 2 samples each)",
        "",
        "| sampling | PSNR | consistency | seam ratio (rows, columns) |",
        "|---|---|---|---|",
    ]
    for name, r in res["tiled_vs_whole"].items():
        if name.startswith("projection"):
            continue
        seam = ", ".join(f"{v:.3f}" for v in r.get("seam_ratio", [])) or "-"
        lines.append(f"| {name} | {r['psnr']:.2f} | {r['consistency']:.3g} | {seam} |")
    lines += [
        "",
        "## Box projection of one 128 x 128 image",
        "",
        f"Each image projected {res['tiled_vs_whole']['projection_4x']['repeats']} times, "
        "its fastest run kept.",
        "",
        "| scale | input | s / image (mean, max) | Newton steps (mean, max) | worst consistency |",
        "|---|---|---|---|---|",
    ]
    for key, what in (
        ("projection_4x", "GPSR 7+1 samples above"),
        ("projection_8x", "photo + texture noise"),
    ):
        r = res["tiled_vs_whole"][key]
        lines.append(
            f"| {r['scale']}x | {what} ({r['images']} images) | {r['seconds_mean']:.3f}, "
            f"{r['seconds_max']:.3f} | {r['steps_mean']:.0f}, {r['steps_max']} | "
            f"{r['consistency_max']:.2g} |"
        )
    lines += [
        "",
        "## The demo's held-out photo strips, whole",
        "",
        "| photo | HR size | bicubic | flow | GPSR 7+1 | GPSR projected | GPSR s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in res["strips"]:
        cells = " | ".join(
            f"{r[k]['psnr']:.2f} dB / {r[k]['consistency']:.3g}"
            for k in ("bicubic", "flow", "gpsr", "gpsr_projected")
        )
        lines.append(f"| {r['photo']} | {r['hr'][0]}x{r['hr'][1]} | {cells} | {r['seconds']:.2f} |")
    lines += ["", "Cells: PSNR / consistency (x1e-5). `strips.png`: HR | bicubic | GPSR 7+1."]
    return "\n".join(lines) + "\n"


def main() -> None:
    out = Path(os.environ.get("GPSR_DEMO_DIR", "demo")) / "large"
    ckpt = Path(os.environ.get("GPSR_DEMO_DIR", "demo")) / "ddpm" / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        raise SystemExit(f"{ckpt} not found: run `make demo` first")
    sides = [int(s) for s in os.environ.get("LARGE_SIDES", "64,128,256,512").split(",")]
    precisions = os.environ.get("LARGE_PRECISIONS", "fp32,auto").split(",")
    out.mkdir(parents=True, exist_ok=True)
    model = GPSR.load(ckpt)
    cpu = next(
        (l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
        platform.processor(),
    )
    res = {"ckpt": str(ckpt), "machine": cpu, "threads": torch.get_num_threads(),
           "auto_precision": model.resolve_precision("auto")}  # fmt: skip
    print("1/4 strips", flush=True)
    res["strips"] = strips(model, out)
    print("2/4 tiled vs whole", flush=True)
    res["tiled_vs_whole"] = tiled_vs_whole(model)
    print("3/4 gpsr.sample as the image grows", flush=True)
    res["scaling"] = scaling(ckpt, out, sides, precisions)
    print("4/4 raw consistency: tiled vs pieces of the training size", flush=True)
    res["pieces_vs_tiled"] = pieces_vs_tiled(model)
    (out / "large_images.json").write_text(json.dumps(res, indent=2))
    (out / "large_images.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
