"""Shared fixtures: small trained checkpoints (session-wide); helpers live in tests/helpers.py."""

import os
from pathlib import Path

import pytest

from tests.helpers import FAST, compose_cfg

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.pop("WANDB_API_KEY", None)


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


@pytest.fixture(scope="session")
def noise_ckpt(tmp_path_factory) -> Path:
    """A `stage=noise` checkpoint (the LR noise model) at scale 8, a few steps on demo crops."""
    from gpsr.train import train

    out = tmp_path_factory.mktemp("noise_run")
    train(compose_cfg(["stage=noise", "logger=csv", *FAST], output_dir=out))
    return out / "checkpoints" / "last.ckpt"
