"""bfloat16 copies of the sampler's networks (`sampler.precision=bf16`, docs/benchmarks.md):
the UNet (`GPSR.sampling_unet`) and the flow's coupling subnets (`DegradationFlow.bf16_copy`)."""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["BF16Copy", "BF16_REVISION"]

# The bf16 sampler's arithmetic may change from release to release (fp32's does not: it is
# kept bit-identical), so `gpsr.calibrate` records this revision with a bf16 calibration and
# a calibration of another revision is refused. 1: the UNet in bf16; 2: also the flow's
# coupling subnets; 3: GroupNorm of small channels-last maps from a channels-first copy, and
# the UNet's timestep embedding in float32.
BF16_REVISION = 3


class BF16Copy(nn.Module):
    """A bfloat16 copy of a network for sampling: x (N, C_in, H, W) float and any further
    arguments (the UNet's timesteps t (N,)) -> (N, C_out, H, W) float32, contiguous NCHW.

    Weights in bfloat16 except the GroupNorms' (float32, so their statistics accumulate in
    float32: `GroupNorm32`'s mixed-dtype path) and the linear layers' (the UNet's timestep
    embedding, a few rows per call: float32 took a third to a half of bfloat16's time on
    such products here), the NHWC layout when `channels_last`; x is
    cast on the way in and the output back to float32 on the way out, so what surrounds the
    network (the DDIM update, the latent statistics, the couplings' affine maps) stays
    float32. Inference only: the copy does not follow later changes of the source's weights.
    """

    def __init__(self, net: nn.Module, channels_last: bool = False):
        super().__init__()
        self.net = copy.deepcopy(net).to(torch.bfloat16)
        for module in self.net.modules():
            if isinstance(module, (nn.GroupNorm, nn.Linear)):
                module.float()
        # Inference only: a SiLU right after a GroupNorm overwrites the norm's fresh output,
        # which nothing else reads (4 % of a demo UNet call here; same values).
        for module in self.net.modules():
            if isinstance(module, nn.Sequential):
                for before, after in zip(module, list(module)[1:]):
                    if isinstance(before, nn.GroupNorm) and isinstance(after, nn.SiLU):
                        after.inplace = True
        self.channels_last = channels_last
        if channels_last:
            self.net.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor, *rest) -> torch.Tensor:
        h = x.to(torch.bfloat16)
        if self.channels_last:
            h = h.contiguous(memory_format=torch.channels_last)
        return self.net(h, *rest).float().contiguous()
