"""Inference for users: `from gpsr.inference import GPSR`, then
`GPSR.load(ckpt).super_resolve(lr, steps=7)` (LR in [0, 1]). The class lives in
`gpsr.models.gpsr`."""

from gpsr.models.gpsr import GPSR

__all__ = ["GPSR"]
