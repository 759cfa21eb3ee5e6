"""Every config group composes, resolves and builds; paper configs give the paper's counts."""

import itertools
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from gpsr.models.unet import UNet
from gpsr.utils.cli import CONFIG_DIR
from tests.conftest import compose_cfg


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))


GROUPS = [
    "speed",
    "stage",
    "data",
    "model/flow",
    "model/unet",
    "trainer",
    "logger",
    "callbacks",
    "experiment",
    "debug",
]


def test_every_group_has_options():
    for group in GROUPS:
        assert _options(group), group


@pytest.mark.parametrize(
    "stage,data,trainer,logger",
    list(
        itertools.product(
            _options("stage"), _options("data"), _options("trainer"), _options("logger")
        )
    ),
)
def test_core_group_combinations_compose(tmp_path, stage, data, trainer, logger):
    root = [] if data == "demo" else ["data.root=/some/images"]
    cfg = compose_cfg(
        [f"stage={stage}", f"data={data}", f"trainer={trainer}", f"logger={logger}", *root],
        output_dir=tmp_path,
    )
    plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert plain["stage"]["name"] == stage
    assert plain["data"]["scale"] == plain["scale"]
    assert plain["trainer"]["default_root_dir"] == str(tmp_path)


@pytest.mark.parametrize("group", ["model/flow", "model/unet", "callbacks", "experiment", "debug"])
def test_remaining_groups_build_what_they_describe(tmp_path, group):
    """Each option composes and what it configures works: the flow inverts, the UNet maps its
    input to its output shape, callbacks instantiate, experiments and debug set their stage."""
    from gpsr.models.flow import DegradationFlow

    for option in _options(group):
        cfg = compose_cfg([f"{group}={option}"], output_dir=tmp_path)
        if cfg.data.source == "folder":
            cfg.data.root = "/some/images"
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        if group == "model/flow" and option == "small":
            flow = DegradationFlow(scale=cfg.scale, **cfg.model.flow).double()
            x = torch.rand(1, 3, 16, 16, dtype=torch.float64) * 2 - 1
            assert torch.allclose(flow.inverse(*flow(x)[:2]), x, atol=1e-10)
        elif group == "model/unet" and option == "small":
            u = cfg.model.unet
            net = UNet(**u)
            out = net(torch.zeros(1, net.in_channels, u.image_size, u.image_size), torch.zeros(1))
            assert out.shape == (1, net.out_channels, u.image_size, u.image_size)
        elif group == "callbacks":
            wanted = [c for c in (cfg.callbacks or {}).values() if c is not None]
            assert len([instantiate(c) for c in wanted]) == len(wanted)
        elif group == "experiment" and option.startswith("ffhq128_8x_"):
            assert cfg.stage.name == option.rsplit("_", 1)[-1] and cfg.scale == 8
        elif group == "debug":
            assert cfg.trainer.max_steps <= 10


def test_other_entry_points_compose_with_their_defaults(tmp_path):
    ev = compose_cfg(["ckpt=x.ckpt"], name="evaluate", output_dir=tmp_path)
    OmegaConf.to_container(ev, resolve=True, throw_on_missing=True)
    assert ev.sampler.steps == 7 and ev.sampler.eta == 1.0 and ev.split == "test"
    assert set(ev.baselines) == {"bicubic", "pseudoinverse", "flow"}
    sa = compose_cfg(["ckpt=x.ckpt", "input=in"], name="sample", output_dir=tmp_path)
    OmegaConf.to_container(sa, resolve=True, throw_on_missing=True)
    assert sa.overwrite is False and sa.output.startswith(str(tmp_path))
    be = compose_cfg([], name="benchmark", output_dir=tmp_path)
    OmegaConf.to_container(be, resolve=True, throw_on_missing=True)
    assert list(be.batches.ddpm_train) == [64, 256] and list(be.batches.sample_7) == [64]


def test_paper_parameter_counts_through_hydra(tmp_path):
    cfg = compose_cfg(["experiment=ffhq128_8x_flow", "trainer=cpu"], output_dir=tmp_path)
    module = instantiate(cfg.stage.module)
    assert sum(p.numel() for p in module.flow.parameters()) == 30_761_280
    cfg = compose_cfg(["experiment=ffhq128_8x_ddpm"], output_dir=tmp_path)
    assert sum(p.numel() for p in UNet(**cfg.model.unet).parameters()) == 79_367_049
    assert cfg.stage.module.ema_decay == 0.9999 and cfg.stage.module.grad_clip == 1.0
    flow_cfg = compose_cfg(["experiment=ffhq128_8x_flow"], output_dir=tmp_path)
    opt = flow_cfg.stage.module.optimizer
    assert (opt.lr, opt.weight_decay, flow_cfg.stage.module.grad_clip) == (1e-4, 1e-5, 10.0)
    assert flow_cfg.stage.module.scheduler.step_size == 100_000 and flow_cfg.data.batch_size == 16


def test_demo_datamodule_builds_from_config(tmp_path):
    cfg = compose_cfg(["data.demo_count=24"], output_dir=tmp_path)
    dm = instantiate(cfg.data)
    batch = next(iter(dm.eval_dataloader("test")))
    assert (
        batch["hr"].shape[-1] == cfg.data.size
        and batch["lr"].shape[-1] == cfg.data.size // cfg.scale
    )
