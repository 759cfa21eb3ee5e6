"""DDP with 2 CPU processes (gloo) and submitit's local launcher (slow)."""

import json

import lightning as L
import pytest
import torch

from gpsr.callbacks import SRMetricsCallback
from gpsr.data import GPSRDataModule
from gpsr.stages import FlowModule, LatentDiffusionModule
from gpsr.utils.checkpoint import load_checkpoint
from tests.helpers import compose_cfg, run_cli

pytestmark = pytest.mark.slow

# 5 validation images: an odd count that a padding sampler would distort.
DDP = [
    "trainer=ddp",
    "trainer.accelerator=cpu",
    "trainer.devices=2",
    "logger=csv",
    "trainer.enable_progress_bar=false",
    "trainer.max_steps=8",
    "trainer.val_check_interval=4",
    "data.batch_size=4",
    "data.demo_count=64",
    "data.demo_val=5",
    "test_after_fit=false",
]


def _validate_single_process(module: L.LightningModule) -> dict[str, float]:
    cfg = compose_cfg(
        ["data.demo_count=64", "data.demo_val=5", "data.batch_size=4"], output_dir="/tmp"
    )
    dm = GPSRDataModule(**{k: v for k, v in cfg.data.items() if k != "_target_"})
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        callbacks=[SRMetricsCallback()],
        enable_model_summary=False,
    )
    return {
        k: float(v) for k, v in trainer.validate(module, datamodule=dm, verbose=False)[0].items()
    }


def _module_from(ckpt, cls):
    data = load_checkpoint(ckpt)
    hp = dict(data["hyper_parameters"])
    if cls is LatentDiffusionModule:
        hp.pop("flow_ckpt")
    module = cls(**hp, optimizer=torch.optim.Adam)  # validation only: no optimiser step
    module.load_state_dict(data["state_dict"])
    return module


def _assert_same(ddp: dict, single: dict, prefix: str):
    keys = [k for k in single if k.startswith(prefix)]
    assert keys
    for k in keys:
        assert ddp[k] == pytest.approx(single[k], rel=1e-4, abs=1e-6), k


def test_ddp_training_matches_single_process_metrics(tmp_path):
    flow_dir, ddpm_dir = tmp_path / "flow", tmp_path / "ddpm"
    run_cli("train", "stage=flow", *DDP, f"hydra.run.dir={flow_dir}", cwd=tmp_path)
    ddp_flow = json.loads((flow_dir / "metrics.json").read_text())
    ckpt = flow_dir / "checkpoints" / "last.ckpt"
    saved = load_checkpoint(ckpt)
    assert saved["global_step"] == 8
    # Both processes' random generators are in the checkpoint rank 0 wrote (exact resume).
    assert len(saved["callbacks"]["RandomState"]["ranks"]) == 2
    single = _validate_single_process(_module_from(ckpt, FlowModule))
    _assert_same(ddp_flow, single, "val/flow_")
    assert ddp_flow["val/coarse_mse"] == pytest.approx(single["val/coarse_mse"], rel=1e-4)

    run_cli(
        "train", "stage=ddpm", f"flow_ckpt={ckpt}", *DDP, f"hydra.run.dir={ddpm_dir}", cwd=tmp_path
    )
    ddp_ddpm = json.loads((ddpm_dir / "metrics.json").read_text())
    ddpm_ckpt = ddpm_dir / "checkpoints" / "last.ckpt"
    module = _module_from(ddpm_ckpt, LatentDiffusionModule)
    # Latent statistics were all-reduced over both shards of the training split.
    stats = load_checkpoint(ddpm_ckpt)["state_dict"]
    assert bool(stats["stats.ready"]) and int(module.ema.n_averaged) == 8
    single = _validate_single_process(module)
    _assert_same(ddp_ddpm, single, "val/gpsr/")


def test_submitit_local_launcher_runs_a_job(tmp_path):
    sweep = tmp_path / "sweep"
    run_cli(
        "train",
        "-m",
        "hydra/launcher=local",
        "logger=csv",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "trainer.enable_progress_bar=false",
        "data.demo_count=48",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert (sweep / "0" / "checkpoints" / "last.ckpt").is_file()
    assert "val/flow_zero/psnr" in json.loads((sweep / "0" / "metrics.json").read_text())
    assert list((sweep / ".submitit").rglob("*_log.out"))


def test_slurm_launcher_ties_tasks_to_devices(tmp_path):
    from hydra import compose, initialize_config_dir

    from gpsr.utils.cli import CONFIG_DIR

    overrides = [
        "hydra/launcher=slurm",
        "trainer=slurm",
        "trainer.devices=4",
        "trainer.num_nodes=2",
        f"paths.output_dir={tmp_path}",
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.tasks_per_node, launcher.gpus_per_node, launcher.nodes) == (4, 4, 2)
    assert launcher.max_num_timeout > 0  # submitit requeues ...
    env = next(p for p in cfg.trainer.plugins if p._target_.endswith("SLURMEnvironment"))
    assert env.auto_requeue is False  # ... and Lightning does not
