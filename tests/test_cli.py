"""The command-line entry points end to end (slow: each runs in a fresh process)."""

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from gpsr import ops
from gpsr.utils.cli import check_output_dir
from tests.helpers import FAST, compose_cfg, run_cli

pytestmark = pytest.mark.slow

QUIET = ["logger=csv", *FAST]


def test_train_both_stages_then_evaluate(tmp_path):
    flow_dir, ddpm_dir, eval_dir = tmp_path / "flow", tmp_path / "ddpm", tmp_path / "eval"
    run_cli("train", "stage=flow", *QUIET, f"hydra.run.dir={flow_dir}", cwd=tmp_path)
    flow_ckpt = flow_dir / "checkpoints" / "last.ckpt"
    assert flow_ckpt.is_file() and list((flow_dir / "samples").glob("*.png"))
    metrics = json.loads((flow_dir / "metrics.json").read_text())
    for key in (
        "train/loss",
        "train/coarse",
        "train/latent",
        "train/logdet",
        "train/bpd",
        "val/coarse_mse",
        "val/flow_sample/psnr",
        "val/flow_zero/ssim",
        "test/flow_sample/consistency",
    ):
        assert key in metrics, key
    run_cli(
        "train",
        "stage=ddpm",
        f"flow_ckpt={flow_ckpt}",
        *QUIET,
        f"hydra.run.dir={ddpm_dir}",
        cwd=tmp_path,
    )
    ddpm_ckpt = ddpm_dir / "checkpoints" / "last.ckpt"
    assert "val/gpsr/psnr" in json.loads((ddpm_dir / "metrics.json").read_text())
    run_cli(
        "evaluate",
        f"ckpt={ddpm_ckpt}",
        "sampler.steps=3",
        "sampler.project=true",
        "sampler.samples=2",
        "data.demo_test=5",
        "progress=false",
        f"hydra.run.dir={eval_dir}",
        cwd=tmp_path,
    )
    result = json.loads((eval_dir / "metrics.json").read_text())
    assert set(result["methods"]) == {
        "bicubic", "pseudoinverse", "flow", "gpsr", "gpsr_projected", "gpsr_mean",
        "gpsr_mean_projected",
    }  # fmt: skip
    assert "projection_iterations" not in result["methods"]["gpsr_mean_projected"]
    for name, m in result["methods"].items():
        assert {"psnr", "ssim", "consistency", "seconds_per_image", "nfe"} <= set(m), name
    assert result["methods"]["gpsr"]["nfe"] == "3+1" and result["methods"]["flow"]["nfe"] == "0+1"
    assert result["images"] == 5 and result["samples_per_image"] == 2
    proj = result["methods"]["gpsr_projected"]
    assert proj["consistency_max"] < 1e-4 and proj["projection_iterations"]["max"] >= 1
    assert result["methods"]["gpsr"]["consistency_max"] >= result["methods"]["gpsr"]["consistency"]
    assert "| gpsr | 3+1 |" in (eval_dir / "metrics.md").read_text()
    assert (eval_dir / "panel.png").is_file()


def test_nfe_sweep_writes_one_report(tmp_path, ddpm_ckpt):
    sweep = tmp_path / "sweep"
    run_cli(
        "evaluate",
        "-m",
        f"ckpt={ddpm_ckpt}",
        "sampler.steps=1,2",
        "data.demo_count=64",
        "progress=false",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    jobs = sorted(p.parent.name for p in sweep.glob("*/metrics.json"))
    assert jobs == ["0", "1"]
    steps = [json.loads((sweep / j / "metrics.json").read_text())["sampler"]["steps"] for j in jobs]
    assert sorted(steps) == [1, 2]
    # The Hydra callback wrote the report at the end of the multirun ...
    report = (sweep / "report.md").read_text()
    assert "| gpsr | 1+1 |" in report and "| gpsr | 2+1 |" in report and "| bicubic | 0 |" in report
    assert (sweep / "report.png").stat().st_size > 10_000
    # ... and the stand-alone command rebuilds it.
    (sweep / "report.md").unlink()
    proc = run_cli("report", str(sweep), cwd=tmp_path)
    assert "| gpsr | 2+1 |" in proc.stdout and (sweep / "report.md").is_file()
    rows = json.loads((sweep / "report.json").read_text())
    assert {r["method"] for r in rows} >= {"gpsr", "flow", "bicubic", "pseudoinverse"}


def _leet(run_root: Path, *args: str) -> str:
    exe = shutil.which("wandb") or str(Path(__import__("sys").executable).parent / "wandb")
    return subprocess.run(
        [exe, "leet", "inspect", *args, str(run_root)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout


def test_wandb_offline_run_reads_back(tmp_path, flow_ckpt):
    out = tmp_path / "wb"
    run_cli(
        "train",
        "stage=flow",
        "logger=wandb",
        *FAST,
        "trainer.log_every_n_steps=2",
        f"hydra.run.dir={out}",
        cwd=tmp_path,
        env={"WANDB_API_KEY": ""},
    )
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1  # offline by default: no account, no network
    records = [json.loads(line) for line in _leet(runs[0], "--json").splitlines() if line.strip()]
    history = [r["history"]["item"] for r in records if r.get("type") == "history"]
    keys = set().union(*history)
    for key in (
        "train/loss",
        "train/bpd",
        "val/flow_sample/psnr",
        "val/flow_zero/consistency",
        "lr-AdamW",
    ):
        assert key in keys, key
    panels = [h for h in history if "val/panel.filenames" in h]
    assert panels and panels[0]["val/panel.format"] == "png"
    png = runs[0] / "files" / panels[0]["val/panel.filenames"][0]
    arr = np.asarray(Image.open(png))
    assert arr.dtype == np.uint8 and arr.max() > 50  # a real picture, not a black float image
    summary = json.loads(_leet(runs[0], "--summary", "--json"))
    assert (
        summary["exit_code"] == 0
        and summary["project"] == "gpsr"
        and "stage-flow" in summary["tags"]
    )
    # Each multirun job of an evaluation is its own run in one group, closed properly.
    sweep = tmp_path / "sweep"
    run_cli(
        "evaluate",
        "-m",
        f"ckpt={flow_ckpt}",
        "logger=wandb",
        "logger.wandb.group=nfe-sweep",
        "seed=0,1",
        "data.demo_count=64",
        "progress=false",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    eval_runs = sorted(sweep.glob("*/wandb/offline-run-*"))
    assert len(eval_runs) == 2
    for run in eval_runs:
        s = json.loads(_leet(run, "--summary", "--json"))
        assert s["exit_code"] == 0 and "eval/flow/psnr" in json.dumps(s["summary"])


def test_sample_cli_processes_good_files_and_names_bad_ones(tmp_path, ddpm_ckpt):
    src = tmp_path / "lr"
    src.mkdir()
    # A real bicubic LR (8-bit PNG), so a consistent HR image inside [0, 1] exists.
    hr = (
        torch.from_numpy(skimage.data.astronaut()[:256:4, 128:384:4].copy()).permute(2, 0, 1)[None]
        / 255.0
    )
    lr = ops.degrade(hr.double(), 8)[0].permute(1, 2, 0).clamp(0, 1).mul(255).round().byte().numpy()
    Image.fromarray(lr).save(src / "astro.png")
    Image.fromarray(skimage.data.coffee()[:27:3, :30:3]).save(src / "odd.jpg")
    (src / "notes.txt").write_text("not an image")
    (src / "broken.png").write_bytes(b"\x89PNG garbage")
    out = tmp_path / "sr"
    proc = run_cli(
        "sample",
        f"ckpt={ddpm_ckpt}",
        f"input={src}",
        f"output={out}",
        "sampler.samples=3",
        "sampler.steps=2",
        "save_float=true",
        "sampler.project=true",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 1
    assert (
        "broken.png: cannot be decoded" in proc.stderr and "notes.txt: not an image" in proc.stderr
    )
    assert "Traceback" not in proc.stderr
    # Output that is not a terminal: plain lines, no progress bars (progress=true is default).
    assert "\r" not in proc.stderr and "it/s" not in proc.stderr and "%|" not in proc.stderr
    assert (out / "astro_sr0.png").is_file() and (out / "astro_std.png").is_file()
    sr = np.load(out / "astro_sr1.npy")
    assert sr.shape == (64, 64, 3) and sr.dtype == np.float32
    assert (out / "odd_sr0.png").is_file()  # 10x9: processed (cropped only when needed)
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("astro.png"))
    assert "consistency x1e-5: sample" in line and "sampled in" in line
    assert float(line.split("projected ")[2].split(",")[0]) < 1e-3  # projected: consistent


@pytest.mark.parametrize(
    "args,message",
    [
        (["stage=gan"], "Could not find 'stage/gan'"),
        (["trainer.max_steps=abc"], "trainer.max_steps must be an integer, got 'abc'"),
    ],
)
def test_config_errors_are_one_clear_line(tmp_path, args, message):
    """Two command lines (an error of Hydra's composition, one of gpsr's checks): one line,
    printed once, no traceback. `test_more_config_errors_are_one_line` checks more of gpsr's
    own errors in-process, through the same report."""
    proc = run_cli(
        "train", *args, "logger=csv", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, check=False
    )
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (proc.stdout + proc.stderr).count(message) == 1  # printed once, not also logged


def _reported(entry, cfg):
    """What an entry point's command line prints for `cfg`'s error: `user_error` of what
    it raises (the command line's `report_errors` prints exactly that, in one line)."""
    from gpsr.utils.cli import user_error
    from gpsr.utils.errors import GPSRError

    with pytest.raises(Exception) as err:
        entry(cfg)
    reported = user_error(err.value)
    assert isinstance(reported, GPSRError), err.value
    assert "\n" not in str(reported)
    return str(reported)


@pytest.mark.parametrize(
    "args,message",
    [
        (["data.size=36"], "data.size=36 of size 36x36 is not divisible by the scale 8"),
        (["stage=ddpm"], "stage=ddpm needs a trained flow: set flow_ckpt="),
        (
            ["stage=ddpm", "flow_ckpt=/nonexistent.ckpt"],
            "checkpoint /nonexistent.ckpt does not exist",
        ),
        (["scale=3", "data.size=30"], "flow scale must be an even integer"),
    ],
)
def test_more_config_errors_are_one_line(tmp_path, args, message):
    from gpsr.train import train

    cfg = compose_cfg([*args, "logger=csv"], output_dir=tmp_path / "run")
    assert message in _reported(train, cfg)


def test_a_missing_required_setting_is_one_line_naming_it(tmp_path):
    proc = run_cli(
        "sample", "ckpt=x.ckpt", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, check=False
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "gpsr: error: input is required: add input=..." in proc.stderr
    # The other entry points in-process, through the same report.
    from gpsr.convert import convert
    from gpsr.evaluate import evaluate

    for entry, name, key in ((evaluate, "evaluate", "ckpt"), (convert, "convert", "release")):
        cfg = compose_cfg([], name=name, output_dir=tmp_path / "run")
        assert _reported(entry, cfg) == f"{key} is required: add {key}=... to the command line"


def test_wrong_checkpoints_are_one_clear_line(tmp_path, flow_ckpt, ddpm_ckpt):
    proc = run_cli(
        "train", "stage=ddpm", f"flow_ckpt={ddpm_ckpt}", "logger=csv", cwd=tmp_path, check=False
    )
    assert "is a 'ddpm' checkpoint, but a 'flow' checkpoint is needed" in proc.stderr
    assert "Traceback" not in proc.stderr
    # The other wrong checkpoints in-process (the same code path up to the one-line report,
    # whose process-level behaviour the two command lines here check).
    from gpsr.train import train

    for args, words in [
        (["stage=ddpm", f"flow_ckpt={flow_ckpt}", "scale=4"],
         "trained for scale 8, but this run uses scale=4"),
        (["stage=flow", f"ckpt_path={flow_ckpt}", "scale=4"],
         "trained for scale 8, but this run uses scale=4"),
        (["stage=flow", f"ckpt_path={ddpm_ckpt}"],
         "is a 'ddpm' checkpoint, but a 'flow' checkpoint is needed"),
    ]:  # fmt: skip
        cfg = compose_cfg([*args, "logger=csv"], output_dir=tmp_path / "run")
        assert words in _reported(train, cfg)  # what the command line prints, in one line
    tampered = tmp_path / "tampered.ckpt"
    data = bytearray(flow_ckpt.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\x00" * 64
    tampered.write_bytes(bytes(data))
    proc = run_cli("evaluate", f"ckpt={tampered}", cwd=tmp_path, check=False)
    assert (
        proc.returncode == 1
        and "gpsr: error: checkpoint" in proc.stderr
        and "Traceback" not in proc.stderr
    )


def test_unwritable_output_dir_fails_early(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    proc = run_cli("train", "logger=csv", f"hydra.run.dir={blocker}/run", cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert (
        f"output directory {blocker}/run cannot be created ({blocker} is not a folder)"
        in proc.stderr
    )


def test_full_disk_is_reported_with_sizes(tmp_path):
    with pytest.raises(PermissionError, match=r"MiB free on the disk of .*needs about"):
        check_output_dir(tmp_path, need_bytes=2**62)
    assert check_output_dir(tmp_path / "new", need_bytes=1).is_dir()


@pytest.mark.slow
def test_optuna_search_runs_two_trials_and_reports_the_best(tmp_path):
    """`hparams_search=demo_optuna_flow`: two tiny flow trainings with settings Optuna drew
    (different), each in its own folder and with its own W&B run, each returning the
    configured metric; the sweeper's summary names the best of the two values, and the study
    is in <sweep>/optuna.db, which a rerun extends (resume)."""
    import optuna
    import yaml

    sweep = tmp_path / "search"
    args = [
        "-m", "hparams_search=demo_optuna_flow", "hydra.sweeper.n_trials=2",
        "hydra.sweeper.sampler.n_startup_trials=2", *FAST, "trainer.max_steps=4",
        "trainer.val_check_interval=4", "callbacks.model_checkpoint.every_n_train_steps=4",
        "test_after_fit=false", f"hydra.sweep.dir={sweep}",
    ]  # fmt: skip
    run_cli("train", *args, cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    trials = sorted(p for p in sweep.iterdir() if (p / "metrics.json").is_file())
    assert len(trials) == 2
    values, settings = [], []
    for trial in trials:
        metrics = json.loads((trial / "metrics.json").read_text())
        values.append(metrics["val/flow_sample/psnr"])
        overrides = yaml.safe_load((trial / ".hydra" / "overrides.yaml").read_text())
        settings.append(sorted(o for o in overrides if o.startswith(("stage.", "model."))))
        assert list((trial / "wandb").glob("offline-run-*")), trial
    assert settings[0] != settings[1] and len(settings[0]) == 2
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(max(values))
    study = optuna.load_study(study_name="gpsr_flow", storage=f"sqlite:///{sweep}/optuna.db")
    assert len(study.trials) == 2 and study.best_value == pytest.approx(max(values))
    # Resume: the same sweep folder continues the study in a new trial folder.
    args = [a.replace("n_trials=2", "n_trials=1") for a in args]
    run_cli("train", *args, cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    study = optuna.load_study(study_name="gpsr_flow", storage=f"sqlite:///{sweep}/optuna.db")
    assert len(study.trials) == 3
    assert len([p for p in sweep.iterdir() if (p / "metrics.json").is_file()]) == 3


class _Bar:
    """A stand-in for tqdm that records its total and the units it was advanced by."""

    made: list["_Bar"] = []

    def __init__(self, iterable=None, total=None, desc=None, disable=False, **kwargs):
        self.iterable, self.total, self.desc, self.disable, self.n = (
            iterable,
            total,
            desc,
            disable,
            0,
        )
        _Bar.made.append(self)

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.n += 1

    def update(self, n=1):
        self.n += n

    def set_postfix_str(self, s):
        pass

    @staticmethod
    def write(s, file=None):
        print(s, file=file)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("project", [False, True])
def test_sample_progress_total_is_the_true_work_of_a_tiled_image(
    tmp_path, ddpm_ckpt, monkeypatch, project
):
    """The per-image bar's total, computed before sampling (GPSR.work_units), equals the
    work done: the UNet calls counted on the network itself (several per step: the latent
    is larger than one tile), one decode per sample and the projection; and the bar is
    advanced by exactly that much."""
    from gpsr import progress
    from gpsr import sample as module

    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)).save(src / "a.png")
    calls = []
    load = module.load_from_config

    def counted_load(cfg):
        model = load(cfg)
        model.unet.register_forward_hook(lambda *a: calls.append(1))
        return model

    _Bar.made = []
    monkeypatch.setattr(module, "load_from_config", counted_load)
    monkeypatch.setattr(module, "tqdm", _Bar)
    monkeypatch.setattr(progress.sys.stderr, "isatty", lambda: True, raising=False)
    cfg = compose_cfg(
        [f"ckpt={ddpm_ckpt}", f"input={src}", f"output={tmp_path / 'sr'}", "sampler.steps=3",
         "sampler.samples=2", f"sampler.project={str(project).lower()}",
         "sampler.tile_batch=2"],
        name="sample", output_dir=tmp_path / "run",
    )  # fmt: skip
    assert module.sample_images(cfg) == 0
    images, bar = _Bar.made
    assert images.desc == "images" and images.n == 1 and not images.disable
    assert bar.desc == "a.png" and not bar.disable
    assert len(calls) > 2 * 3  # tiled: more than one UNet call per step
    assert bar.total == len(calls) + 2 + int(project) == bar.n


def test_progress_false_draws_no_bar_even_on_a_terminal(tmp_path, ddpm_ckpt, monkeypatch, capsys):
    from gpsr import progress
    from gpsr import sample as module

    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(src / "a.png")
    monkeypatch.setattr(progress.sys.stderr, "isatty", lambda: True, raising=False)
    assert progress.show_bars(True) and not progress.show_bars(False)
    cfg = compose_cfg(
        [f"ckpt={ddpm_ckpt}", f"input={src}", f"output={tmp_path / 'sr'}", "sampler.steps=1",
         "progress=false"],
        name="sample", output_dir=tmp_path / "run",
    )  # fmt: skip
    assert module.sample_images(cfg) == 0
    out = capsys.readouterr()
    assert "a.png: 16x16 ->" in out.out  # the plain line per image
    assert "\r" not in out.err + out.out and "it/s" not in out.err and "%|" not in out.err
