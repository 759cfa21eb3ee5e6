"""bfloat16 copies of the sampler's networks (`sampler.precision=bf16`, docs/benchmarks.md):
the UNet (`GPSR.sampling_unet`) and the flow's coupling subnets (`DegradationFlow.bf16_copy`)."""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict

import torch
from torch import nn

__all__ = ["BF16Copy", "BF16_REVISION", "PackedConv2d", "PackedConv1d", "pack_convolutions"]

# The bf16 sampler's arithmetic may change from release to release (fp32's does not: it is
# kept bit-identical), so `gpsr.calibrate` records this revision with a bf16 calibration and
# a calibration of another revision is refused. 1: the UNet in bf16; 2: also the flow's
# coupling subnets; 3: GroupNorm of small channels-last maps from a channels-first copy, and
# the UNet's timestep embedding in float32. (Packed convolution weights and the flow's
# per-image decode kept revision 3's values.)
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
    float32. Its convolutions keep their weights packed in oneDNN's layout per input shape
    (`pack_convolutions`: the same values, no weight reorder at each call; up to
    `PACKED_SHAPES` extra copies of the convolution weights in memory). Inference only: the
    copy does not follow later changes of the source's weights.
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
        pack_convolutions(self.net)

    def forward(self, x: torch.Tensor, *rest) -> torch.Tensor:
        h = x.to(torch.bfloat16)
        if self.channels_last:
            h = h.contiguous(memory_format=torch.channels_last)
        return self.net(h, *rest).float().contiguous()


# Weights packed per input shape and convolution: the most recent shapes are kept (a tiled
# sampler alternates a full batch of tiles and a remainder).
PACKED_SHAPES = 2
_pack_lock = threading.Lock()


class _PackedWeights(OrderedDict):
    """Packed weights by input shape; copies and pickles of a module start empty (oneDNN's
    opaque tensors can be neither)."""

    def __reduce__(self):
        return (type(self), ())

    def __deepcopy__(self, memo):
        return type(self)()


def _reorder_weight(*args) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_convolution_weight(*args)


def _packed_convolution(*args) -> torch.Tensor:
    return torch.ops.mkldnn._convolution_pointwise(*args)


def _can_pack() -> bool:
    ops = getattr(torch.ops, "mkldnn", None)
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(ops, "_reorder_convolution_weight")
        and hasattr(ops, "_convolution_pointwise")
    )


class PackedConv2d(nn.Conv2d):
    """A CPU convolution whose weight is reordered once into oneDNN's layout for each input
    shape (the `PACKED_SHAPES` most recent are kept) instead of at every call:
    x (N, C_in, H, W) -> (N, C_out, H', W'), the same values as `nn.Conv2d` (the same oneDNN
    kernel, given the weight it would reorder itself).

    `F.conv2d` reorders the weight on each call. For small maps that reorder is most of the
    time: the paper UNet's 384-channel 3 x 3 convolutions on 4 x 4 maps took 2.7 to 4.3 times
    as long in bfloat16 here. A weight packed for one shape must not serve another: packed
    for 64 x 64 inputs and used on 4 x 4 ones, a convolution took 76 ms instead of 1.3 ms,
    hence one packing per shape. Made by `pack_convolutions` (inference copies only: the
    packed weights do not follow later changes of `weight`). Other inputs (not CPU, another
    dtype, gradients enabled) take `nn.Conv2d.forward`, and so does every call after the
    packed kernel failed once (a oneDNN build without it for this case)."""

    _packed: _PackedWeights | None  # None: packing failed once, torch's convolution from then on

    def _pointwise(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        key = tuple(x.shape)
        with _pack_lock:
            packed = self._packed.get(key)
            if packed is not None:
                self._packed.move_to_end(key)
        if packed is None:
            packed = _reorder_weight(
                weight, self._pad, self._stride, self._dilation, self.groups, list(x.shape)
            )
            with _pack_lock:
                self._packed[key] = packed
                while len(self._packed) > PACKED_SHAPES:
                    self._packed.popitem(last=False)
        return _packed_convolution(
            x, packed, self.bias, self._pad, self._stride, self._dilation, self.groups,
            "none", [], None,
        )  # fmt: skip

    def _packable(self, x: torch.Tensor) -> bool:
        return (
            self._packed is not None
            and x.device.type == "cpu"
            and x.dtype == self.weight.dtype
            and x.dim() == self.weight.dim()
            and not torch.is_grad_enabled()
        )

    def _fallback(self) -> None:
        # A CPU whose oneDNN build lacks the packed kernel for this case (e.g. bf16 forced
        # where it has no bf16 support): torch's own convolution, which raises its own clear
        # error if the input itself is wrong.
        self._packed = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packable(x):
            try:
                return self._pointwise(x, self.weight)
            except RuntimeError:
                self._fallback()
        return super().forward(x)


class PackedConv1d(nn.Conv1d):
    """`PackedConv2d` for a 1-d convolution (the UNet attention's 1 x 1 projections):
    x (N, C_in, L) -> (N, C_out, L'), computed as a 2-d one on (N, C_in, 1, L)."""

    _packed: _PackedWeights | None
    _pointwise = PackedConv2d._pointwise
    _packable = PackedConv2d._packable
    _fallback = PackedConv2d._fallback

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packable(x):
            try:
                return self._pointwise(x.unsqueeze(2), self.weight.unsqueeze(2)).squeeze(2)
            except RuntimeError:
                self._fallback()
        return super().forward(x)


def pack_convolutions(net: nn.Module) -> int:
    """In place: every `nn.Conv1d` / `nn.Conv2d` of `net` with zero padding given as numbers
    becomes a `PackedConv1d` / `PackedConv2d` (same parameters and state-dict keys), where
    torch has oneDNN's convolution operators; returns how many were changed."""
    if not _can_pack():
        return 0
    count = 0
    for module in net.modules():
        kind = {nn.Conv2d: PackedConv2d, nn.Conv1d: PackedConv1d}.get(type(module))
        if kind is None or module.padding_mode != "zeros" or isinstance(module.padding, str):
            continue
        module.__class__ = kind
        module._packed = _PackedWeights()
        pad1 = kind is PackedConv1d
        module._pad = [0, *module.padding] if pad1 else list(module.padding)
        module._stride = [1, *module.stride] if pad1 else list(module.stride)
        module._dilation = [1, *module.dilation] if pad1 else list(module.dilation)
        count += 1
    return count
