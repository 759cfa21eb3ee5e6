"""Importing the authors' release: a release-format checkpoint built here (keys, shapes and
buffers as the release writes them, random values), converted, and compared with an
independent float64 implementation of the release's modules written in this file."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gpsr.convert import convert, convert_release, gpsr_settings
from gpsr.inference import GPSR
from gpsr.utils.checkpoint import CheckpointError, load_checkpoint

# A small model in the release's own config format (scale 8, 32 x 32 HR, latent 16 x 16).
CONFIG = {
    "num_channels": 3,
    "scale": 8,
    "flow": {"transform": {"num_inv": 2, "num_convs": 3, "growth_rate": 8}},
    "dpm": {
        "ema_decay": 0.999,
        "diffuser": {
            "T": 1000,
            "linear": True,
            "unet": {
                "base_channels": 32,
                "num_res_attn_blocks": 1,
                "channel_mults": [2],
                "is_attn": [False, True],
                "num_heads": 2,
                "dropout": 0.0,
                "use_scale_shift_norm": False,
            },
        },
    },
}


# ------------------------------------------------------------------ the release's key layout
def release_flow_shapes(cfg):
    c, tr = cfg["num_channels"], cfg["flow"]["transform"]
    g, n = tr["growth_rate"], tr["num_convs"]
    shapes = {}
    for i in range(tr["num_inv"]):
        for net, cin, cout in (("p", c, 6 * c), ("u", 3 * c, 2 * c)):
            for j in range(n - 1):
                shapes[f"flow.transform.blocks.{i}.{net}.blocks.{j}.weight"] = (
                    g,
                    cin + j * g,
                    3,
                    3,
                )
                shapes[f"flow.transform.blocks.{i}.{net}.blocks.{j}.bias"] = (g,)
            shapes[f"flow.transform.blocks.{i}.{net}.conv_out.weight"] = (
                cout,
                cin + (n - 1) * g,
                3,
                3,
            )
            shapes[f"flow.transform.blocks.{i}.{net}.conv_out.bias"] = (cout,)
    return shapes


def unet_plan(cfg):
    """improved-diffusion's UNetModel layout: [(kind, prefix, c_in, c_out)] in forward order."""
    u, c = cfg["dpm"]["diffuser"]["unet"], cfg["num_channels"]
    base, mults, nres = u["base_channels"], [1, *u["channel_mults"]], u["num_res_attn_blocks"]
    attn = {2**i for i, on in enumerate(u["is_attn"]) if on}
    plan = [("conv_in", "input_blocks.0.0", 4 * c, base), ("push", "", base, base)]
    chans, ch, ds, idx = [base], base, 1, 1
    for level, m in enumerate(mults):
        for _ in range(nres):
            plan.append(("res", f"input_blocks.{idx}.0", ch, m * base))
            ch = m * base
            if ds in attn:
                plan.append(("attn", f"input_blocks.{idx}.1", ch, ch))
            plan.append(("push", "", ch, ch))
            chans.append(ch)
            idx += 1
        if level != len(mults) - 1:
            plan.append(("down", f"input_blocks.{idx}.0", ch, ch))
            plan.append(("push", "", ch, ch))
            chans.append(ch)
            idx, ds = idx + 1, ds * 2
    plan += [("res", "middle_block.0", ch, ch), ("attn", "middle_block.1", ch, ch)]
    plan += [("res", "middle_block.2", ch, ch)]
    idx = 0
    for level, m in list(enumerate(mults))[::-1]:
        for i in range(nres + 1):
            plan.append(("pop", "", 0, 0))
            plan.append(("res", f"output_blocks.{idx}.0", ch + chans.pop(), m * base))
            ch, sub = m * base, 1
            if ds in attn:
                plan.append(("attn", f"output_blocks.{idx}.{sub}", ch, ch))
                sub += 1
            if level and i == nres:
                plan.append(("up", f"output_blocks.{idx}.{sub}", ch, ch))
                ds //= 2
            idx += 1
    plan.append(("conv_out", "out", ch, 3 * c))
    return plan


def release_unet_shapes(cfg):
    base = cfg["dpm"]["diffuser"]["unet"]["base_channels"]
    emb = 4 * base
    s = {
        "time_embed.0.weight": (emb, base),
        "time_embed.0.bias": (emb,),
        "time_embed.2.weight": (emb, emb),
        "time_embed.2.bias": (emb,),
    }
    for kind, p, ci, co in unet_plan(cfg):
        if kind == "conv_in":
            s[f"{p}.weight"], s[f"{p}.bias"] = (co, ci, 3, 3), (co,)
        elif kind == "res":
            s.update({f"{p}.in_layers.0.weight": (ci,), f"{p}.in_layers.0.bias": (ci,)})
            s.update({f"{p}.in_layers.2.weight": (co, ci, 3, 3), f"{p}.in_layers.2.bias": (co,)})
            s.update({f"{p}.emb_layers.1.weight": (co, emb), f"{p}.emb_layers.1.bias": (co,)})
            s.update({f"{p}.out_layers.0.weight": (co,), f"{p}.out_layers.0.bias": (co,)})
            s.update({f"{p}.out_layers.3.weight": (co, co, 3, 3), f"{p}.out_layers.3.bias": (co,)})
            if ci != co:
                s[f"{p}.skip_connection.weight"] = (co, ci, 1, 1)
                s[f"{p}.skip_connection.bias"] = (co,)
        elif kind == "attn":
            s.update({f"{p}.norm.weight": (ci,), f"{p}.norm.bias": (ci,)})
            s.update({f"{p}.qkv.weight": (3 * ci, ci, 1), f"{p}.qkv.bias": (3 * ci,)})
            s.update({f"{p}.proj_out.weight": (ci, ci, 1), f"{p}.proj_out.bias": (ci,)})
        elif kind == "down":
            s[f"{p}.op.weight"], s[f"{p}.op.bias"] = (co, ci, 3, 3), (co,)
        elif kind == "up":
            s[f"{p}.conv.weight"], s[f"{p}.conv.bias"] = (co, ci, 3, 3), (co,)
        elif kind == "conv_out":
            s.update({"out.0.weight": (ci,), "out.0.bias": (ci,)})
            s.update({"out.2.weight": (co, ci, 3, 3), "out.2.bias": (co,)})
    return {f"dpm.unet.{k}": v for k, v in s.items()}


def random_tensors(shapes, seed, std=0.1):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in shapes.items():
        t = torch.randn(shape, generator=g, dtype=torch.float64) * std
        if k.endswith(("norm.weight", "in_layers.0.weight", "out_layers.0.weight", "out.0.weight")):
            t = 1.0 + t  # GroupNorm scales near 1, as trained
        out[k] = t.float()
    return out


def release_checkpoint(cfg=CONFIG, seed=0):
    """What the release's `utils.save_state` writes for a trained SuperResolver."""
    model = random_tensors({**release_flow_shapes(cfg), **release_unet_shapes(cfg)}, seed)
    c3 = 3 * cfg["num_channels"]
    g = torch.Generator().manual_seed(seed + 1)
    model["flow.transform.details_mean"] = torch.randn(1, c3, 1, 1, generator=g) * 0.01
    model["flow.transform.details_var"] = torch.rand(1, c3, 1, 1, generator=g) * 0.01 + 0.005
    model["flow.transform.details_min"] = torch.full((1, c3, 1, 1), -0.9)
    model["flow.transform.details_max"] = torch.full((1, c3, 1, 1), 0.8)
    T = cfg["dpm"]["diffuser"]["T"]
    betas = torch.linspace(0.1 / T, 20 / T, T, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    for name, v in {
        "betas": betas,
        "sqrt_betas": betas.sqrt(),
        "alphas": 1 - betas,
        "alphas_cumprod": abar,
        "one_minus_alphas_cumprod": 1 - abar,
        "sqrt_alphas": (1 - betas).sqrt(),
        "sqrt_alphas_cumprod": abar.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1 - abar).sqrt(),
    }.items():
        model[f"dpm.{name}"] = v.float()
    model["dpm.T"] = torch.tensor([float(T)])
    ema_unet = random_tensors(release_unet_shapes(cfg), seed + 2)
    ema = {f"module.{k}": v for k, v in {**model, **ema_unet}.items()}
    ema["n_averaged"] = torch.tensor(1234)
    return {
        "model_state_dict": model,
        "ema_state_dict": ema,
        "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]},
    }


# ------------------------------------------------------------------ independent float64 reference
def ref_haar(x):
    tl, bl, tr, br = x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]
    coarse = (tl + bl + tr + br) / 4
    d = torch.cat([(tl + tr - bl - br) / 4, (tl + bl - tr - br) / 4, (tl + br - tr - bl) / 4], 1)
    return coarse, d


def ref_ihaar(c, d):
    d1, d2, d3 = d.chunk(3, 1)
    x = torch.empty(c.shape[0], c.shape[1], 2 * c.shape[2], 2 * c.shape[3], dtype=c.dtype)
    x[..., ::2, ::2] = c + d1 + d2 + d3
    x[..., 1::2, ::2] = c - d1 + d2 - d3
    x[..., ::2, 1::2] = c + d1 - d2 - d3
    x[..., 1::2, 1::2] = c - d1 - d2 + d3
    return x


def ref_dense(sd, prefix, x, num_convs):
    for j in range(num_convs - 1):
        y = F.conv2d(
            x, sd[f"{prefix}.blocks.{j}.weight"], sd[f"{prefix}.blocks.{j}.bias"], padding=1
        )
        x = torch.cat([x, F.leaky_relu(y, 0.2)], 1)
    return F.conv2d(x, sd[f"{prefix}.conv_out.weight"], sd[f"{prefix}.conv_out.bias"], padding=1)


def soft(s):
    return 2 / math.pi * 2.0 * torch.atan(s / 2.0)


def ref_flow(sd, coarse, details, cfg, forward):
    tr = cfg["flow"]["transform"]
    order = range(tr["num_inv"]) if forward else reversed(range(tr["num_inv"]))
    for i in order:
        p, u = f"flow.transform.blocks.{i}.p", f"flow.transform.blocks.{i}.u"
        if forward:
            s1, t1 = ref_dense(sd, p, coarse, tr["num_convs"]).chunk(2, 1)
            details = soft(s1).exp() * details + t1
            s2, t2 = ref_dense(sd, u, details, tr["num_convs"]).chunk(2, 1)
            coarse = soft(s2).exp() * coarse + t2
        else:
            s2, t2 = ref_dense(sd, u, details, tr["num_convs"]).chunk(2, 1)
            coarse = (coarse - t2) / soft(s2).exp()
            s1, t1 = ref_dense(sd, p, coarse, tr["num_convs"]).chunk(2, 1)
            details = (details - t1) / soft(s1).exp()
    return coarse, details


def ref_unet(sd, x, t, cfg):
    u = cfg["dpm"]["diffuser"]["unet"]
    base, heads = u["base_channels"], u["num_heads"]

    def W(k):
        return sd[f"dpm.unet.{k}"]

    def gn(h, k):
        return F.group_norm(h, 32, W(f"{k}.weight"), W(f"{k}.bias"))

    half = base // 2
    # The release computes the sinusoidal embedding in float32 (improved-diffusion's code).
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], 1).double()
    emb = F.linear(
        F.silu(F.linear(emb, W("time_embed.0.weight"), W("time_embed.0.bias"))),
        W("time_embed.2.weight"),
        W("time_embed.2.bias"),
    )
    h, stack = x, []
    for kind, p, _, _ in unet_plan(cfg):
        if kind in ("conv_in", "down"):
            key = p if kind == "conv_in" else f"{p}.op"
            h = F.conv2d(
                h,
                W(f"{key}.weight"),
                W(f"{key}.bias"),
                stride=1 if kind == "conv_in" else 2,
                padding=1,
            )
        elif kind == "push":
            stack.append(h)
        elif kind == "pop":
            h = torch.cat([h, stack.pop()], 1)
        elif kind == "res":
            a = F.conv2d(
                F.silu(gn(h, f"{p}.in_layers.0")),
                W(f"{p}.in_layers.2.weight"),
                W(f"{p}.in_layers.2.bias"),
                padding=1,
            )
            a = (
                a
                + F.linear(F.silu(emb), W(f"{p}.emb_layers.1.weight"), W(f"{p}.emb_layers.1.bias"))[
                    ..., None, None
                ]
            )
            a = F.conv2d(
                F.silu(gn(a, f"{p}.out_layers.0")),
                W(f"{p}.out_layers.3.weight"),
                W(f"{p}.out_layers.3.bias"),
                padding=1,
            )
            skip = f"dpm.unet.{p}.skip_connection.weight"
            h = (F.conv2d(h, sd[skip], W(f"{p}.skip_connection.bias")) if skip in sd else h) + a
        elif kind == "attn":
            b, c, hh, ww = h.shape
            xs = h.reshape(b, c, -1)
            qkv = F.conv1d(gn(xs, f"{p}.norm"), W(f"{p}.qkv.weight"), W(f"{p}.qkv.bias"))
            qkv = qkv.reshape(b * heads, -1, qkv.shape[-1])  # heads first, then q, k, v
            ch = qkv.shape[1] // 3
            q, k, v = torch.split(qkv, ch, 1)
            scale = 1 / math.sqrt(math.sqrt(ch))
            w = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), -1)
            a = torch.einsum("bts,bcs->bct", w, v).reshape(b, -1, xs.shape[-1])
            a = F.conv1d(a, W(f"{p}.proj_out.weight"), W(f"{p}.proj_out.bias"))
            h = (xs + a).reshape(b, c, hh, ww)
        elif kind == "up":
            h = F.conv2d(
                F.interpolate(h, scale_factor=2, mode="nearest"),
                W(f"{p}.conv.weight"),
                W(f"{p}.conv.bias"),
                padding=1,
            )
        elif kind == "conv_out":
            h = F.conv2d(F.silu(gn(h, "out.0")), W("out.2.weight"), W("out.2.bias"), padding=1)
    return h


def ref_sample(sd, y, init, steps, cfg):
    """The release's `SuperResolver.sample` with eta = 0: DDIM in the normalised latent."""
    T = cfg["dpm"]["diffuser"]["T"]
    abar = torch.cumprod(1 - torch.linspace(0.1 / T, 20 / T, T, dtype=torch.float64), 0)
    mean, var = (
        sd["flow.transform.details_mean"].double(),
        sd["flow.transform.details_var"].double(),
    )
    lo = (sd["flow.transform.details_min"].double() - mean) / (2 * var.sqrt())
    hi = (sd["flow.transform.details_max"].double() - mean) / (2 * var.sqrt())
    k = cfg["scale"] // 2
    cond = y.repeat_interleave(k, 2).repeat_interleave(k, 3)  # nearest upsampling by k
    x = init
    times = np.linspace(T - 1, 0, steps).astype(int)
    for i, t in enumerate(times):
        a = abar[t]
        eps = ref_unet(sd, torch.cat([x, cond], 1), torch.full((x.shape[0],), t * 1000.0 / T), cfg)
        x0 = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(lo, hi)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        if i == len(times) - 1:
            break
        ap = abar[times[i + 1]]
        x = ap.sqrt() * x0 + (1 - ap).sqrt() * eps
    details = x0 * (2 * var.sqrt()) + mean
    return ref_ihaar(*ref_flow(sd, cond, details, cfg, forward=False))


def convert_cli(*args: str) -> int:
    """`python -m gpsr.convert args...` as the command line runs it (its Hydra config, errors
    as one line on stderr), in this process: -> the exit code."""
    from gpsr.utils.cli import report_errors
    from tests.helpers import compose_cfg

    try:
        report_errors(convert)(compose_cfg(list(args), name="convert"))
    except SystemExit as exc:
        return int(exc.code)
    return 0


# ------------------------------------------------------------------ tests
@pytest.fixture(scope="module")
def release():
    return release_checkpoint()


@pytest.fixture(scope="module")
def converted(release, tmp_path_factory):
    path = tmp_path_factory.mktemp("convert") / "release.pt"
    torch.save(release, path)
    cfg = path.with_suffix(".json")
    cfg.write_text(json.dumps(CONFIG))
    out = path.with_name("gpsr.ckpt")
    assert convert_cli(f"release={path}", f"out={out}", f"config={cfg}") == 0
    return out


def _double_model(path, ema=True):
    model = GPSR.load(path, ema=ema)
    return model.double()


def test_conversion_maps_every_key(release, converted):
    data = load_checkpoint(converted)  # weights_only, seal verified
    state = data["state_dict"]
    model = release["model_state_dict"]
    n_release = sum(1 for k in model if k.startswith(("flow.transform.blocks", "dpm.unet.")))
    n_ours = sum(1 for k in state if k.startswith(("flow.", "unet.")))
    assert n_ours == n_release
    assert data["gpsr"]["stage"] == "ddpm" and data["gpsr"]["scale"] == 8
    assert int(state["ema.n_averaged"]) == 1234
    # Statistics exactly as the release computed them (unbiased variance kept).
    assert torch.equal(state["stats.mean"], model["flow.transform.details_mean"].flatten())
    assert torch.equal(state["stats.var"], model["flow.transform.details_var"].flatten())
    assert state["stats.zmin"].item() == pytest.approx(-0.9)
    assert state["stats.zmax"].item() == pytest.approx(0.8)


def test_converted_flow_equals_release_flow(release, converted):
    sd = {k: v.double() for k, v in release["model_state_dict"].items()}
    model = _double_model(converted)
    x = (
        torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        * 2
        - 1
    )
    coarse, latent, _ = model.flow(x)
    rc, rd = ref_flow(sd, *ref_haar(x), CONFIG, forward=True)
    assert torch.allclose(coarse, rc, atol=1e-10) and torch.allclose(latent, rd, atol=1e-10)
    assert (rc - ref_haar(x)[0]).abs().max() > 1e-2  # the couplings are not the identity
    back = model.flow.inverse(coarse, latent)
    assert torch.allclose(back, ref_ihaar(*ref_flow(sd, rc, rd, CONFIG, forward=False)), atol=1e-10)


@pytest.mark.parametrize("ema", [True, False])
def test_converted_unet_equals_release_unet(release, converted, tmp_path, ema):
    path = converted
    if not ema:
        raw = tmp_path / "raw.pt"
        torch.save(release, raw)
        (tmp_path / "c.json").write_text(json.dumps(CONFIG))
        path = tmp_path / "raw.ckpt"
        assert (
            convert_cli(
                f"release={raw}", f"out={path}", f"config={tmp_path / 'c.json'}", "ema=false"
            )
            == 0
        )
    source = release["ema_state_dict"] if ema else release["model_state_dict"]
    prefix = "module." if ema else ""
    sd = {k[len(prefix) :]: v.double() for k, v in source.items() if k.startswith(prefix)}
    model = _double_model(path)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 12, 16, 16, generator=g, dtype=torch.float64)
    t = torch.tensor([3.0, 870.0], dtype=torch.float64)
    ours, ref = model.unet(x, t), ref_unet(sd, x, t, CONFIG)
    assert ref.abs().mean() > 1e-2
    assert torch.allclose(ours, ref, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("steps", [1, 7])
def test_converted_samples_equal_the_release_sampler(release, converted, steps):
    sd = {
        k[len("module.") :]: v.double()
        for k, v in release["ema_state_dict"].items()
        if k.startswith("module.")
    }
    model = _double_model(converted)
    g = torch.Generator().manual_seed(2)
    y = torch.rand(2, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    init = torch.randn(2, 9, 16, 16, generator=g, dtype=torch.float64)
    ours = model.sample_signed(y, steps, eta=0.0, noise_fn=lambda s: init.clone())
    ref = ref_sample(sd, y, init, steps, CONFIG)
    assert torch.allclose(ours, ref, atol=1e-8, rtol=1e-8)


def test_settings_of_the_paper_model():
    from gpsr.convert import PAPER_RELEASE_CONFIG
    from gpsr.models.flow import DegradationFlow
    from gpsr.models.unet import UNet

    s = gpsr_settings(PAPER_RELEASE_CONFIG)
    assert s["unet"]["attention_resolutions"] == [16, 8] and s["unet"]["channel_mult"] == [
        1,
        1,
        2,
        3,
        4,
    ]
    assert sum(p.numel() for p in UNet(**s["unet"]).parameters()) == 79_367_049
    assert sum(p.numel() for p in DegradationFlow(scale=8, **s["flow"]).parameters()) == 30_761_280


def test_bad_release_files_get_one_line(release, tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(CONFIG))

    def run(obj, *extra):
        src = tmp_path / "in.pt"
        torch.save(obj, src)
        out = tmp_path / "out.ckpt"
        out.unlink(missing_ok=True)
        code = convert_cli(f"release={src}", f"out={out}", f"config={cfg}", *extra)
        err = capsys.readouterr().err.strip()
        assert code == 1 and len(err.splitlines()) == 1 and not out.exists()
        return err

    assert "not a checkpoint of the authors' release" in run({"weights": torch.zeros(2)})
    flow_only = {
        "model_state_dict": {
            k[len("flow.") :]: v
            for k, v in release["model_state_dict"].items()
            if k.startswith("flow.")
        }
    }
    assert "flow-only release checkpoint" in run(flow_only)
    assert "no EMA weights" in run({"model_state_dict": release["model_state_dict"]})
    extra = dict(
        release, model_state_dict={**release["model_state_dict"], "dpm.extra": torch.zeros(1)}
    )
    assert "unexpected release weights ['dpm.extra']" in run(extra)
    missing = {k: v for k, v in release["model_state_dict"].items() if "out.2" not in k}
    assert "missing" in run(dict(release, model_state_dict=missing))
    no_schedule = {
        k: v for k, v in release["model_state_dict"].items() if k != "dpm.alphas_cumprod"
    }
    assert "schedule buffers ['dpm.alphas_cumprod'] are missing" in run(
        dict(release, model_state_dict=no_schedule)
    )
    assert "scale=4 but the release model is 8x" in run(release, "scale=4")
    # Not the paper's shapes: without config= the paper's settings are assumed.
    src = tmp_path / "in.pt"
    assert convert_cli(f"release={src}", f"out={tmp_path / 'x.ckpt'}") == 1
    assert "does not match the model settings" in capsys.readouterr().err
    # Not a torch file at all, and an arbitrary pickle.
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert convert_cli(f"release={tmp_path / 'junk.pt'}", f"out={tmp_path / 'y.ckpt'}") == 1
    assert "junk.pt is not a torch checkpoint (neither a zip archive nor a pickle)" in (
        capsys.readouterr().err
    )
    torch.save({"model_state_dict": {"x": torch.zeros(64)}}, tmp_path / "whole.pt")
    data = (tmp_path / "whole.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    assert convert_cli(f"release={tmp_path / 'cut.pt'}", f"out={tmp_path / 'c.ckpt'}") == 1
    assert "cut.pt is a damaged or truncated zip archive" in capsys.readouterr().err
    torch.save({"model_state_dict": object.__new__(json.JSONDecoder)}, tmp_path / "evil.pt")
    assert convert_cli(f"release={tmp_path / 'evil.pt'}", f"out={tmp_path / 'z.ckpt'}") == 1
    assert "weights_only=True" in capsys.readouterr().err


def test_convert_refuses_to_overwrite(converted, tmp_path, capsys):
    assert convert_cli(f"release={converted}", f"out={converted}") == 1
    assert "already exists" in capsys.readouterr().err


def test_convert_release_rejects_non_dicts():
    with pytest.raises(CheckpointError, match="not a checkpoint of the authors' release"):
        convert_release([1, 2], "x.pt")


@pytest.mark.slow
def test_converted_checkpoint_evaluates_samples_and_fine_tunes(converted, tmp_path):
    from tests.helpers import run_cli

    run_cli(
        "evaluate",
        f"ckpt={converted}",
        "data.demo_test=2",
        "sampler.steps=2",
        "progress=false",
        f"hydra.run.dir={tmp_path / 'eval'}",
        cwd=tmp_path,
    )
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert {"gpsr", "flow", "bicubic"} <= set(metrics["methods"])
    assert metrics["prediction"] == "eps" and len(metrics["loss_by_t"]["t"]) == 10
    lr_dir = tmp_path / "lr"
    lr_dir.mkdir()
    from PIL import Image

    Image.fromarray((np.random.default_rng(0).random((4, 4, 3)) * 255).astype("uint8")).save(
        lr_dir / "a.png"
    )
    run_cli(
        "sample",
        f"ckpt={converted}",
        f"input={lr_dir}",
        f"output={tmp_path / 'sr'}",
        "sampler.steps=2",
        cwd=tmp_path,
    )
    assert (tmp_path / "sr" / "a_sr.png").is_file()
    run_cli(
        "train",
        "stage=ddpm",
        f"init_ckpt={converted}",
        "logger=csv",
        "trainer.accelerator=cpu",
        "trainer.max_steps=2",
        "trainer.val_check_interval=1",
        "trainer.enable_progress_bar=false",
        "data.batch_size=4",
        "data.demo_val=2",
        "data.demo_test=2",
        "test_after_fit=false",
        f"hydra.run.dir={tmp_path / 'ft'}",
        cwd=tmp_path,
    )
    tuned = load_checkpoint(tmp_path / "ft" / "checkpoints" / "last.ckpt")["state_dict"]
    start = load_checkpoint(converted)["state_dict"]
    assert torch.equal(
        tuned["flow.blocks.0.predict.out.weight"], start["flow.blocks.0.predict.out.weight"]
    )
    assert not torch.equal(tuned["unet.out.2.weight"], start["unet.out.2.weight"])


def test_convert_is_a_hydra_app_like_the_others(release, tmp_path):
    """`hydra.run.dir=` (refused by the old hand-written parser) is accepted, the run folder
    gets the job's log, and a missing required setting is one line naming it."""
    from tests.helpers import run_cli

    src = tmp_path / "release.pt"
    torch.save(release, src)
    (tmp_path / "c.json").write_text(json.dumps(CONFIG))
    run_dir = tmp_path / "run"
    proc = run_cli(
        "convert", f"release={src}", f"out={tmp_path / 'out.ckpt'}",
        f"config={tmp_path / 'c.json'}", f"hydra.run.dir={run_dir}", cwd=tmp_path,
    )  # fmt: skip
    assert (tmp_path / "out.ckpt").is_file()
    assert "wrote" in (run_dir / "convert.log").read_text()
    assert GPSR.load(tmp_path / "out.ckpt").scale == 8
    proc = run_cli("convert", f"release={src}", cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "out" in proc.stderr and "Traceback" not in proc.stderr
