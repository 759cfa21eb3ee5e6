"""Shared fixtures: Hydra composition for tests, and small trained checkpoints (session-wide)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from gpsr.utils.cli import CONFIG_DIR

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.pop("WANDB_API_KEY", None)

REPO = Path(__file__).resolve().parent.parent

# A few quick steps on the demo crops, no progress bars.
FAST = [
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "trainer.max_steps=24",
    "trainer.val_check_interval=12",
    "trainer.log_every_n_steps=4",
    "data.batch_size=8",
    "data.demo_count=64",
    "callbacks.model_checkpoint.every_n_train_steps=12",
]


def compose_cfg(
    overrides: list[str], name: str = "train", output_dir: Path | None = None
) -> DictConfig:
    """Compose a root config as the CLI would, with outputs under `output_dir`."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        extra = [f"paths.output_dir={output_dir}"] if output_dir is not None else []
        return compose(config_name=name, overrides=list(overrides) + extra)


def run_cli(
    module: str,
    *args: str,
    cwd: Path,
    timeout: int = 600,
    env: dict | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """`python -m gpsr.<module> args...` in a subprocess, outputs under `cwd`."""
    full_env = {**os.environ, "GPSR_ROOT": str(cwd), "PYTHONPATH": str(REPO), **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", f"gpsr.{module}", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"gpsr.{module} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


@pytest.fixture(scope="session")
def flow_ckpt(tmp_path_factory) -> Path:
    """A flow-stage checkpoint of the small flow, trained for a few steps on demo crops."""
    from gpsr.train import train

    out = tmp_path_factory.mktemp("flow_run")
    train(compose_cfg(["stage=flow", "logger=csv", *FAST], output_dir=out))
    return out / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="session")
def ddpm_ckpt(tmp_path_factory, flow_ckpt) -> Path:
    """A DDPM-stage checkpoint on top of `flow_ckpt`."""
    from gpsr.train import train

    out = tmp_path_factory.mktemp("ddpm_run")
    train(
        compose_cfg(["stage=ddpm", f"flow_ckpt={flow_ckpt}", "logger=csv", *FAST], output_dir=out)
    )
    return out / "checkpoints" / "last.ckpt"
