"""Shared test helpers: tiny models with non-trivial random weights."""

import torch

from gpsr.models.flow import DegradationFlow


def randomize_(module: torch.nn.Module, std: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Overwrite every parameter with N(0, std^2) so nothing stays the identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
    return module


def tiny_flow(scale: int = 4, dtype=torch.float32, std: float = 0.05) -> DegradationFlow:
    flow = DegradationFlow(scale=scale, num_blocks=3, num_convs=3, growth=8).to(dtype)
    return randomize_(flow, std=std)


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
