"""Every power-of-two scale composes, trains both stages and super-resolves a bundled photo
of a size the model never saw (tiled, projected)."""

import pytest
import skimage.data
import torch

from gpsr import ops
from gpsr.inference import GPSR
from gpsr.tiling import Tiling
from tests.helpers import FAST, compose_cfg


@pytest.mark.slow
@pytest.mark.parametrize("scale", [2, 4, 8, 16])
def test_scale_trains_and_samples(scale, tmp_path):
    from gpsr.train import train

    common = ["experiment=demo", f"scale={scale}", "logger=csv", *FAST, "trainer.max_steps=6"]
    train(compose_cfg(["stage=flow", *common], output_dir=tmp_path / "flow"))
    flow_ckpt = tmp_path / "flow" / "checkpoints" / "last.ckpt"
    ddpm = compose_cfg(["stage=ddpm", f"flow_ckpt={flow_ckpt}", *common], output_dir=tmp_path / "d")
    assert ddpm.data.scale == scale and ddpm.stage.module.scale == scale
    train(ddpm)
    model = GPSR.load(tmp_path / "d" / "checkpoints" / "last.ckpt")
    assert model.scale == scale and model.flow.k == scale // 2
    # An LR photo whose latent (k x LR) is larger than a UNet tile on both sides, not square.
    h, w = (96 // scale * 2, 160 // scale * 2) if scale < 16 else (12, 20)
    photo = torch.from_numpy(skimage.data.chelsea()[: h * scale, : w * scale].copy())
    hr = photo.permute(2, 0, 1)[None].float() / 255
    lr = ops.degrade(hr, scale).clamp(0, 1)
    sr = model.super_resolve(lr, steps=2, seed=0, project=True, tiling=Tiling(flow_tile=16))
    assert sr.shape == (1, 3, h * scale, w * scale)
    assert 0 <= sr.min() and sr.max() <= 1
    consistency = ((ops.degrade(sr.double(), scale) - lr.double()) ** 2).mean()
    assert consistency < 1e-9
