"""Shared test helpers: Hydra composition and the command line as users run them, tiny
models with non-trivial random weights, small model settings."""

import os
import subprocess
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from gpsr.configs import register
from gpsr.models.flow import DegradationFlow
from gpsr.utils.cli import CONFIG_DIR

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
    register()
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


def randomize_(module: torch.nn.Module, std: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Overwrite every parameter with N(0, std^2) so nothing stays the identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
    return module


def tiny_flow(
    scale: int = 4, dtype=torch.float32, std: float = 0.05, position: bool = False
) -> DegradationFlow:
    flow = DegradationFlow(scale=scale, num_blocks=3, num_convs=3, growth=8, position=position)
    return randomize_(flow.to(dtype), std=std)


# Small model settings shared by the stage and resume tests.
SMALL_FLOW = {"num_blocks": 2, "num_convs": 3, "growth": 8}
SMALL_UNET = {
    "model_channels": 32,
    "channel_mult": [1, 2],
    "num_res_blocks": 1,
    "attention_resolutions": [8],
    "image_size": 16,
    "num_heads": 2,
    "dropout": 0.0,
}


def stage_module(stage: str, cls: type | None = None, **overrides):
    """The stage's LightningModule as `stage=<stage>` builds it (its YAML over the class's
    defaults: optimiser, scheduler, validation sampler), with `overrides` (any Python
    objects, e.g. a `functools.partial` optimiser); `cls` a subclass to build instead."""
    from hydra.utils import get_class, instantiate
    from omegaconf import OmegaConf

    node = compose_cfg([f"stage={stage}"]).stage.module
    params = OmegaConf.to_container(node, resolve=True)
    target = params.pop("_target_")
    params.pop("_convert_", None)
    for key in ("optimizer", "scheduler"):
        if params.get(key) is not None:
            params[key] = instantiate(params[key])
    return (cls or get_class(target))(**{**params, **overrides})
