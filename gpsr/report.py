"""Gather an NFE sweep into one table and one plot: `python -m gpsr.report <sweep dir>`.

Reads every `*/metrics.json` written by `gpsr.evaluate` jobs under the folder and writes
`report.md`, `report.json` and `report.png` (PSNR, SSIM and consistency against NFEs) there.
Also runs by itself at the end of an evaluation multirun (a Hydra callback).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from gpsr.utils.errors import InputNotFoundError

log = logging.getLogger("gpsr.report")

__all__ = [
    "collect",
    "results_table",
    "write_report",
    "SweepReportCallback",
    "benchmark_markdown",
    "main",
]


BASELINE_STYLE = {
    "bicubic": ("tab:gray", "--"),
    "pseudoinverse": ("tab:purple", ":"),
    "flow": ("tab:green", "--"),
}


# What a method's results may hold beyond PSNR, SSIM and consistency (None where absent).
OPTIONAL_KEYS = (
    "consistency_clean", "discrepancy_ratio", "discrepancy_ratio_max", "projection_iterations",
    "ms_ssim", "haarpsi", "psd_error", "swd", "swd_spread", "lpips_alex", "lpips_vgg", "dists",
    "fid", "kid", "kid_spread", "miscoverage", "interval_width", "miscoverage_uncalibrated",
    "interval_width_uncalibrated",
)  # fmt: skip


def collect(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One row per (job, method): steps, NFE label, PSNR, SSIM, consistency, seconds/image,
    and each of `OPTIONAL_KEYS` (noisy LR images, weight-free and learned metrics,
    intervals; None where a job did not report it)."""
    rows = []
    for path in sorted(Path(sweep_dir).glob("*/metrics.json")):
        data = json.loads(path.read_text())
        if "methods" not in data:
            continue
        steps = data["sampler"]["steps"]
        for method, m in data["methods"].items():
            rows.append(
                {
                    "job": path.parent.name,
                    "method": method,
                    "prediction": data.get("prediction"),
                    "steps": steps,
                    "nfe": m["nfe"],
                    "psnr": m["psnr"],
                    "ssim": m["ssim"],
                    "consistency": m["consistency"],
                    "seconds_per_image": m["seconds_per_image"],
                    **{key: m.get(key) for key in OPTIONAL_KEYS},
                }
            )
    return rows


def _interval_cells(m: dict[str, Any]) -> str:
    """The two interval cells of a row: calibrated / lambda = 1 miscoverage and width
    ("-" where not calibrated; empty for a method without intervals)."""
    if m.get("miscoverage_uncalibrated") is None:
        return " | |"
    cal = lambda k: f"{m[k]:.4f}" if m.get(k) is not None else "-"  # noqa: E731
    return (
        f" {cal('miscoverage')} / {m['miscoverage_uncalibrated']:.4f} |"
        f" {cal('interval_width')} / {m['interval_width_uncalibrated']:.4f} |"
    )


def results_table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    """The Table 1-style Markdown table of (method, results) rows, as `gpsr.evaluate` writes
    them (nfe, psnr, ssim, consistency, seconds_per_image); with noisy LR images also the
    consistency with the clean LR and the discrepancy ratio (mean / max over images), and
    with K >= 2 samples the interval's miscoverage and width (calibrated / lambda = 1), and
    the weight-free quality metrics (docs/metrics.md), when any row has them (absent or
    None: empty cells)."""
    has = lambda key: any(m.get(key) is not None for _, m in rows)  # noqa: E731
    clean, ratio = has("consistency_clean"), has("discrepancy_ratio")
    cov = has("miscoverage_uncalibrated")
    qual = has("ms_ssim")
    head = "| Method | NFEs | PSNR | SSIM | Consistency (x1e-5) |"
    head += " MS-SSIM | HaarPSI | PSD error | SWD (x1e3) +/- spread |" * qual
    head += " Consistency clean (x1e-5) |" * clean + " Discrepancy ratio mean / max |" * ratio
    head += " Outside interval calibrated / lambda=1 | Interval width calibrated / lambda=1 |" * cov
    lines = [head + " s / image |", "|---" * (6 + 4 * qual + clean + ratio + 2 * cov) + "|"]
    for name, m in rows:
        row = (
            f"| {name} | {m['nfe']} | {m['psnr']:.2f} | {m['ssim']:.4f} | {m['consistency']:.4g} |"
        )
        if qual:
            row += (
                f" {m['ms_ssim']:.4f} | {m['haarpsi']:.4f} | {m['psd_error']:.3f} |"
                f" {m['swd']:.1f} +/- {m['swd_spread']:.1f} |"
                if m.get("ms_ssim") is not None
                else " | | | |"
            )
        if clean:
            cc = m.get("consistency_clean")
            row += f" {cc:.4g} |" if cc is not None else " |"
        if ratio:
            dr = m.get("discrepancy_ratio")
            row += f" {dr:.3g} / {m['discrepancy_ratio_max']:.3g} |" if dr is not None else " |"
        if cov:
            row += _interval_cells(m)
        lines.append(row + f" {m['seconds_per_image']:.4f} |")
    return "\n".join(lines) + "\n"


def write_report(sweep_dir: str | Path) -> Path:
    """Write report.md / report.json / report.png into `sweep_dir`; returns the Markdown path."""
    sweep_dir = Path(sweep_dir)
    rows = collect(sweep_dir)
    if not rows:
        raise InputNotFoundError(f"no evaluation results (*/metrics.json) under {sweep_dir}")
    # A sweep over checkpoints of several parameterizations labels GPSR rows by it.
    if len({r["prediction"] for r in rows if r["method"].startswith("gpsr")}) > 1:
        for r in rows:
            if r["method"].startswith("gpsr"):
                r["method"] = f"{r['method']} ({r['prediction']})"
    sampled = sorted(
        (r for r in rows if r["method"].startswith("gpsr")), key=lambda r: (r["method"], r["steps"])
    )
    # Training-free baselines do not depend on the step count: report them once.
    fixed = {r["method"]: r for r in rows if not r["method"].startswith("gpsr")}
    lines = [results_table([(r["method"], r) for r in list(fixed.values()) + sampled])]
    md = sweep_dir / "report.md"
    md.write_text("# NFE sweep\n\n" + "".join(lines) + "\n![trade-off](report.png)\n")
    (sweep_dir / "report.json").write_text(json.dumps(rows, indent=2))
    _plot(sampled, fixed, sweep_dir / "report.png")
    labelled = [(n, r) for n, r in fixed.items()] + [
        (f"{r['method']} {r['steps']}+1", r) for r in sampled
    ]
    if perception_distortion(labelled, sweep_dir / "perception_distortion.png"):
        md.write_text(md.read_text() + "\n![perception-distortion](perception_distortion.png)\n")
    log.info("report written to %s", md)
    return md


def _plot(sampled: list[dict], fixed: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    keys = [("psnr", "PSNR (dB)"), ("ssim", "SSIM"), ("consistency", "consistency (x1e-5 MSE)")]
    for ax, (key, label) in zip(axes, keys):
        for method in sorted({r["method"] for r in sampled}):
            pts = [r for r in sampled if r["method"] == method]
            ax.plot([r["steps"] + 1 for r in pts], [r[key] for r in pts], "o-", label=method)
        for name, r in fixed.items():
            color, style = BASELINE_STYLE.get(name, ("tab:gray", "-."))
            ax.axhline(r[key], ls=style, lw=1.2, color=color, label=name)
        ax.set_xscale("log")
        if key == "consistency":
            ax.set_yscale("log")
        ax.set_xlabel("NFEs (UNet steps + 1 flow inverse)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("GPSR: quality and consistency against the number of network evaluations")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def perception_distortion(rows: list[tuple[str, dict[str, Any]]], path: Path) -> bool:
    """Draw the perception-distortion plane (Blau & Michaeli, CVPR 2018) of (label, results)
    rows to `path`: distortion on x (PSNR with its axis reversed, or LPIPS-Alex where every
    row has it), perception on y (SWD with its bootstrap spread, or FID where every row has
    it); towards the lower left is better on both. Returns False, drawing
    nothing, when no row has the weight-free metrics."""
    rows = [(label, m) for label, m in rows if m.get("swd") is not None]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    every = lambda key: all(m.get(key) is not None for _, m in rows)  # noqa: E731
    xkey, xlabel = (
        ("lpips_alex", "LPIPS-Alex (lower: closer)")
        if every("lpips_alex")
        else ("psnr", "PSNR dB (axis reversed: left is closer)")
    )
    ykey, ylabel = ("fid", "FID") if every("fid") else ("swd", "SWD x1e3 (+/- bootstrap spread)")
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for label, m in rows:
        err = m.get(f"{ykey}_spread") if ykey == "swd" else None
        ax.errorbar(m[xkey], m[ykey], yerr=err, fmt="o", capsize=3)
        ax.annotate(
            label, (m[xkey], m[ykey]), fontsize=7, xytext=(4, 3), textcoords="offset points"
        )
    if xkey == "psnr":
        ax.invert_xaxis()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{ylabel} (lower: more realistic)")
    ax.set_title("Perception-distortion plane (better: towards the lower left)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


class SweepReportCallback(Callback):
    """Hydra callback: write the report into the sweep folder when a multirun ends."""

    def on_multirun_end(self, config, **kwargs) -> None:
        try:
            write_report(config.hydra.sweep.dir)
        except FileNotFoundError as err:
            log.warning("no sweep report: %s", err)


def _speedup(row: dict[str, Any], base: dict[str, Any] | None, ratio: float | None) -> str:
    """The speed-up cell of an optimized row: the median of its interleaved rounds' ratios
    with their range where it has them (`gpsr.benchmark` on a CPU), else `ratio` (of the
    two rows' medians); empty for a reference row or one without a baseline."""
    if row["mode"] != "optimized" or base is None:
        return ""
    if row.get("speedup_rounds"):
        rounds = row["speedup_rounds"]
        return (
            f"{row['speedup']:.2f}x ({min(rounds):.2f}-{max(rounds):.2f} in "
            f"{len(rounds)} interleaved rounds)"
        )
    return f"{ratio:.2f}x"


def benchmark_markdown(result: dict[str, Any]) -> str:
    """`gpsr.benchmark`'s table: each (operation, batch) in both modes with the optimised /
    reference speed-up (on a CPU, per interleaved round: `_speedup`), and the trust rows
    when present."""
    ref = {(r["name"], r["batch"]): r for r in result["rows"] if r["mode"] == "reference"}
    lines = [
        f"Device: {result['device']}, torch {result['torch']}",
        "",
        "| what | batch | mode | img/s | TFLOP/s | peak GiB | GiB / img | speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    demo = [r for r in result["rows"] if "seconds_per_mp" in r]
    for r in [r for r in result["rows"] if "seconds_per_mp" not in r]:
        base = ref.get((r["name"], r["batch"]))
        speed = _speedup(r, base, base["seconds"] / r["seconds"] if base else None)
        fmt = lambda v, f: f.format(v) if v is not None else "n/a"  # noqa: E731
        per_img = r["peak_gib"] / r["batch"] if r["peak_gib"] is not None else None
        lines.append(
            f"| {r['name']} | {r['batch']} | {r['mode']} | {r['img_per_s']:.2f} | "
            f"{fmt(r['tflops'], '{:.2f}')} | {fmt(r['peak_gib'], '{:.2f}')} | "
            f"{fmt(per_img, '{:.3f}')} | {speed} |"
        )
    if demo:
        ref_demo = {r["name"]: r for r in demo if r["mode"] == "reference"}
        lines += [
            "",
            "| trained model, 7+1 NFEs | mode | precision | s / output MP | speed-up | "
            "consistency (x1e-5) |",
            "|---|---|---|---|---|---|",
        ]
        for r in demo:
            base = ref_demo.get(r["name"])
            speed = _speedup(
                r, base, base["seconds_per_mp"] / r["seconds_per_mp"] if base else None
            )
            lines.append(
                f"| {r['name']} | {r['mode']} | {r['precision']} | {r['seconds_per_mp']:.2f} | "
                f"{speed} | {r['consistency_x1e5']:.3g} |"
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gpsr.report", description=__doc__.splitlines()[0]
    )
    parser.add_argument("sweep_dir", help="folder of an evaluation multirun (holds 0/, 1/, ...)")
    args = parser.parse_args(argv)
    try:
        md = write_report(args.sweep_dir)
    except FileNotFoundError as err:
        print(f"gpsr: error: {err}", file=sys.stderr)
        return 1
    print(md.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
