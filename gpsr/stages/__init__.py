"""LightningModules of the training stages: the flow, the latent DDPM and the LR noise model."""

from gpsr.stages.base import NonFiniteLossError, StageModule
from gpsr.stages.ddpm import LatentDiffusionModule
from gpsr.stages.flow import FlowModule, flow_loss_terms
from gpsr.stages.noise import NoiseModule

__all__ = [
    "FlowModule",
    "LatentDiffusionModule",
    "NoiseModule",
    "NonFiniteLossError",
    "StageModule",
    "flow_loss_terms",
]
