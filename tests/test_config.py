"""Every config group composes, resolves and builds; paper configs give the paper's counts."""

import itertools
import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from gpsr.models.unet import UNet
from gpsr.utils.cli import CONFIG_DIR
from tests.helpers import REPO, compose_cfg


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))


GROUPS = [
    "speed",
    "stage",
    "data",
    "model/flow",
    "model/unet",
    "model/diffusion",
    "model/noise",
    "sampler",
    "trainer",
    "logger",
    "callbacks",
    "experiment",
    "hparams_search",
    "debug",
]


# Folders of conf/ that are not groups a run selects: Hydra's own, the optional local
# overrides, the paths, and the base that the paper experiments extend.
NOT_SELECTED = {"hydra", "hydra/launcher", "local", "paths", "experiment/base"}


def test_the_tested_groups_are_the_config_groups_and_their_options_differ(tmp_path):
    """The groups the tests walk are exactly the folders under conf/ (a new group cannot go
    untested), and no two options of a group compose to the same config (a copy left
    unedited)."""
    folders = {
        p.parent.relative_to(CONFIG_DIR).as_posix() for p in Path(CONFIG_DIR).rglob("*.yaml")
    }
    assert folders - {"."} - NOT_SELECTED == set(GROUPS)
    for group in GROUPS:
        seen: dict[str, str] = {}
        for option in _options(group):
            cfg = compose_cfg([f"{group}={option}"], output_dir=tmp_path)
            plain = OmegaConf.to_container(cfg, resolve=False)
            key = json.dumps(plain, sort_keys=True, default=str)
            assert key not in seen, f"{group}={option} is the same config as {group}={seen[key]}"
            seen[key] = option


def _all_pairs(*factors: list[str]) -> list[tuple[str, ...]]:
    """Combinations in which every pair of options of every two factors occurs at least once
    (greedy covering array: 25 of the 300 combinations of the four core groups), in a fixed
    order. Each group's options interact in pairs (a stage with a data set, a trainer with a
    logger); a pairwise set catches any such clash at a twelfth of the full product's cost."""
    full = list(itertools.product(*factors))

    def pairs(combo):
        return {(i, a, j, b) for i, a in enumerate(combo) for j, b in enumerate(combo) if i < j}

    todo, chosen = set().union(*(pairs(c) for c in full)), []
    while todo:
        best = max(full, key=lambda c: len(pairs(c) & todo))
        chosen.append(best)
        todo -= pairs(best)
    return chosen


@pytest.mark.parametrize(
    "stage,data,trainer,logger",
    _all_pairs(_options("stage"), _options("data"), _options("trainer"), _options("logger")),
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


# What each option of the remaining groups must build: checked on the built objects, with
# the paper's numbers where there are some.
PAPER_FLOW_PARAMETERS, PAPER_UNET_PARAMETERS = 30_761_280, 79_367_049


@pytest.mark.parametrize(
    "group",
    [
        "model/flow",
        "model/unet",
        "model/diffusion",
        "model/noise",
        "sampler",
        "callbacks",
        "experiment",
        "debug",
    ],
)
def test_remaining_groups_build_what_they_describe(tmp_path, group):
    """Each option composes, resolves, and builds what it says: a flow that inverts (the
    paper's with its parameter count), a UNet whose output has its shape and depends on its
    input (the paper's with its count), the paper's linear eps diffusion, the paper's 7+1
    sampler, callbacks of the named classes, experiments that set their stage, scale, data
    and models, a debug run of a few steps."""
    from gpsr.callbacks import FinalCheckpoint
    from gpsr.diffusion import GaussianDiffusion, linear_betas
    from gpsr.models.flow import DegradationFlow
    from gpsr.models.noise import LRNoiseModel

    for option in _options(group):
        cfg = compose_cfg([f"{group}={option}"], output_dir=tmp_path)
        if cfg.data.source == "folder":
            cfg.data.root = "/some/images"
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        if group == "model/flow":
            flow = DegradationFlow(scale=cfg.scale, **cfg.model.flow).double()
            if option == "paper":
                assert sum(p.numel() for p in flow.parameters()) == PAPER_FLOW_PARAMETERS
            else:
                x = torch.rand(1, 3, 16, 16, dtype=torch.float64) * 2 - 1
                assert torch.allclose(flow.inverse(*flow(x)[:2]), x, atol=1e-10)
        elif group == "model/unet":
            u = cfg.model.unet
            net = UNet(**u)
            if option == "paper":
                assert sum(p.numel() for p in net.parameters()) == PAPER_UNET_PARAMETERS
                continue
            for p in net.parameters():  # leave the zero-initialised output layer behind
                torch.nn.init.normal_(p, std=0.02)
            x = torch.randn(2, net.in_channels, u.image_size, u.image_size)
            out = net(x, torch.tensor([3.0, 700.0]))
            assert out.shape == (2, net.out_channels, u.image_size, u.image_size)
            assert not torch.allclose(out[0], net(x.flip(0), torch.tensor([3.0, 700.0]))[0])
        elif group == "model/diffusion":
            d = GaussianDiffusion(**cfg.model.diffusion)
            assert d.prediction == "eps" and d.num_timesteps == 1000
            assert torch.allclose(d.betas, linear_betas(1000))
            assert float(d.betas[0]) == pytest.approx(1e-4) and float(d.betas[-1]) == 0.02
        elif group == "model/noise":
            model = LRNoiseModel(**cfg.model.noise)
            y = torch.rand(2, 3, 8, 8)
            assert torch.equal(model.denoise(y, torch.zeros(2)), y)
            assert model.estimate(y).shape == (2,) and model.sigma_max == cfg.model.noise.sigma_max
        elif group == "sampler":
            assert (cfg.sampler.steps, cfg.sampler.eta, cfg.sampler.spacing) == (7, 1.0, "linspace")
            assert cfg.sampler.sigma_y == 0  # the paper's noise-free sampler
            assert cfg.stage.module.get("val_steps") in (None, 7)
        elif group == "callbacks":
            built = [instantiate(c) for c in (cfg.callbacks or {}).values() if c is not None]
            if option == "none":
                assert built == []
            else:
                assert any(isinstance(c, FinalCheckpoint) for c in built)
        elif group == "experiment":
            if option.startswith("ffhq128_8x_"):
                assert cfg.stage.name == option.rsplit("_", 1)[-1] and cfg.scale == 8
                assert (cfg.data.size, cfg.data.val_fraction) == (128, 0.01)  # data=ffhq
                assert cfg.model.flow.num_blocks == 16
                assert cfg.trainer.precision == "bf16-mixed"
            else:  # the demo
                assert cfg.scale == 4 and cfg.model.diffusion.prediction == "x0"
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


def test_demo_flow_has_block_position_and_its_documented_size(tmp_path):
    """experiment=demo turns the block position on (docs/demo_results.md, docs/method.md §8: 130,512
    parameters, 121,872 without); the paper experiment keeps it off (count above)."""
    cfg = compose_cfg(["experiment=demo", "stage=flow"], output_dir=tmp_path)
    flow = instantiate(cfg.stage.module).flow
    assert flow.position and sum(p.numel() for p in flow.parameters()) == 130_512
    off = compose_cfg(
        ["experiment=demo", "stage=flow", "model.flow.position=false"], output_dir=tmp_path
    )
    assert sum(p.numel() for p in instantiate(off.stage.module).flow.parameters()) == 121_872


def test_demo_datamodule_builds_from_config(tmp_path):
    cfg = compose_cfg(["data.demo_count=24"], output_dir=tmp_path)
    dm = instantiate(cfg.data)
    batch = next(iter(dm.eval_dataloader("test")))
    assert (
        batch["hr"].shape[-1] == cfg.data.size
        and batch["lr"].shape[-1] == cfg.data.size // cfg.scale
    )


def test_each_setting_default_is_stated_once():
    """The stage and data YAML files extend their classes' signature defaults
    (gpsr/configs.py): no YAML key restates a default, every parameter without a default is
    set by the YAML, every default can be overridden without '+' and is documented."""
    import inspect

    from omegaconf import OmegaConf

    from gpsr.configs import _classes, signature_defaults

    files = {
        "flow_module": ("stage/flow.yaml", "module"),
        "ddpm_module": ("stage/ddpm.yaml", "module"),
        "noise_module": ("stage/noise.yaml", "module"),
        "data_module": ("data/demo.yaml", None),
        "data_module ": ("data/folder.yaml", None),
    }
    docs = (REPO / "docs" / "configuration.md").read_text()
    for name, (path, key) in files.items():
        cls = _classes()[name.strip()]
        defaults = signature_defaults(cls)
        node = OmegaConf.load(Path(CONFIG_DIR) / path)
        assert f"/schema/{name.strip()}" in str(node.defaults)
        node = node[key] if key else node
        restated = {
            k for k, v in node.items_ex(resolve=False) if k in defaults and v == defaults[k]
        }
        assert not restated, f"{path} restates defaults of {cls.__name__}: {restated}"
        required = {
            p.name
            for p in inspect.signature(cls.__init__).parameters.values()
            if p.default is inspect.Parameter.empty
            and p.name != "self"
            and p.kind is p.KEYWORD_ONLY
        }
        assert required <= set(node.keys()), f"{path} misses {required - set(node.keys())}"
        for k in defaults:
            assert f"`{k}`" in docs, f"docs/configuration.md does not describe {k}"
    stage = compose_cfg(["stage=ddpm", "stage.module.ema_decay=0.5"]).stage.module
    assert stage.ema_decay == 0.5 and stage.diagnostic_buckets == 10
    data = compose_cfg(["data=folder", "data.root=/r", "data.skip_small=true"]).data
    assert data.skip_small is True and data.eval_batch_size == 32 and data.val_fraction == 0.05


@pytest.mark.parametrize(
    "override,message",
    [
        ("trainer.max_steps=abc", "trainer.max_steps must be an integer, got 'abc'"),
        ("trainer.val_check_interval=often", "trainer.val_check_interval must be a number"),
        ("stage.module.optimizer.lr=abc", "stage.module.optimizer.lr must be a number"),
        ("stage.module.grad_clip=big", "stage.module.grad_clip must be a number, got 'big'"),
        ("stage.module.ema_decay=slow", "stage.module.ema_decay must be a number"),
        ("data.cache=maybe", "data.cache must be true or false, got 'maybe'"),
        ("stage.module.max_skipped_steps=2.5", "stage.module.max_skipped_steps must be an integer"),
    ],
)
def test_mistyped_settings_are_refused_by_name_before_anything_is_built(
    tmp_path, override, message
):
    """A word where gpsr.train needs a number (or the reverse) is one ConfigError naming
    the setting, checked on the composed config against the types of the defaults."""
    from gpsr.train import train
    from gpsr.utils.errors import ConfigError

    cfg = compose_cfg(["stage=ddpm", "flow_ckpt=x.ckpt", override], output_dir=tmp_path / "r")
    with pytest.raises(ConfigError) as err:
        train(cfg)
    assert message in str(err.value)
    assert not (tmp_path / "r").exists()  # refused before the run folder is made


def test_every_shipped_config_passes_the_type_check(tmp_path):
    from gpsr.configs import check_setting_types

    for stage in _options("stage"):
        for extra in ([], *([f"experiment={e}"] for e in _options("experiment"))):
            cfg = compose_cfg(
                [f"stage={stage}", "flow_ckpt=x.ckpt", "data.root=/r", *extra],
                output_dir=tmp_path,
            )
            check_setting_types(cfg)


def test_cpu_threads_follow_the_affinity_mask_omp_and_the_processes(monkeypatch):
    """The cores this process may use (affinity), at most the physical ones torch found,
    shared by the run's processes; OMP_NUM_THREADS wins when set."""
    from gpsr.utils import device

    monkeypatch.setattr(device, "_TORCH_DEFAULT_THREADS", 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(device.os, "sched_getaffinity", lambda pid: set(range(16)))
    assert device.cpu_threads()[0] == 8  # 16 logical CPUs, 8 physical: 8
    assert device.cpu_threads(processes=2)[0] == 4  # two DDP processes share them
    monkeypatch.setattr(device.os, "sched_getaffinity", lambda pid: {0, 1, 2})
    assert device.cpu_threads()[0] == 3  # a 3-core allocation (SLURM, a container)
    assert device.cpu_threads(processes=4)[0] == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert device.cpu_threads(processes=2) == (5, "OMP_NUM_THREADS")
    before = torch.get_num_threads()
    try:
        assert device.set_cpu_threads() == 5 and torch.get_num_threads() == 5
    finally:
        torch.set_num_threads(before)


_FAULTS = """
import resource, sys, torch
from gpsr.utils.device import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else "default"
for _ in range(10):  # 64 MiB, allocated, touched and freed before counting (glibc settles
    torch.empty(2**24).fill_(1.0)  # its aligned blocks within a few rounds)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    torch.empty(2**24).fill_(1.0)
print(kept is not None, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


def test_keep_freed_memory_stops_faulting_large_blocks_in_again():
    """Counted by the kernel (minor page faults, each process on its own): by default a
    64 MiB tensor allocated, filled and freed over and over is faulted in afresh each time
    (16,384 pages of 4 KiB); after `keep_freed_memory` it reuses the same pages (after a
    few rounds)."""
    import subprocess
    import sys

    def faults(mode):
        run = subprocess.run(
            [sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True
        )
        ok, count = run.stdout.split()
        return ok == "True", float(count)

    supported, kept = faults("keep")
    if not supported:
        pytest.skip("no glibc mallopt on this system")
    _, default = faults("default")
    assert default > 10_000 and kept < 100, (default, kept)
