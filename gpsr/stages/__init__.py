"""LightningModules of the two training stages."""

from gpsr.stages.base import NonFiniteLossError, StageModule
from gpsr.stages.ddpm import LatentDiffusionModule
from gpsr.stages.flow import FlowModule, flow_loss_terms

__all__ = [
    "FlowModule",
    "LatentDiffusionModule",
    "NonFiniteLossError",
    "StageModule",
    "flow_loss_terms",
]
