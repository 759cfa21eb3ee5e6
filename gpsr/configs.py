"""Each setting's default is stated once: in the signature of the class it configures.

`register()` stores, for every class that Hydra builds from a config group of ours, a node
of its keyword defaults in Hydra's ConfigStore under `schema/<name>`. The YAML files extend
that node (`defaults: [/schema/<name>@<package>, _self_]`) and state only what they set
differently or interpolate, so `python -m gpsr.train ... --cfg job` still shows every
setting and `key=value` overrides work for all of them without a `+`.

Entry points that compose these groups call `register()` before Hydra runs.
"""

from __future__ import annotations

import inspect
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from gpsr.utils.cli import CONFIG_DIR

__all__ = ["register", "signature_defaults", "stage_module_config"]

_PRIMITIVE = (type(None), bool, int, float, str)


def signature_defaults(cls: type) -> dict[str, Any]:
    """The keyword defaults of `cls(...)` that a config can hold (None, bool, int, float,
    str), by name; parameters without a default are left to the YAML."""
    params = inspect.signature(cls.__init__).parameters.values()
    return {
        p.name: p.default
        for p in params
        if p.default is not inspect.Parameter.empty and isinstance(p.default, _PRIMITIVE)
    }


def _classes() -> dict[str, type]:
    """The classes with a schema, by schema name (imported on first use)."""
    from gpsr.data import GPSRDataModule
    from gpsr.stages import FlowModule, LatentDiffusionModule, NoiseModule

    return {
        "flow_module": FlowModule,
        "ddpm_module": LatentDiffusionModule,
        "noise_module": NoiseModule,
        "data_module": GPSRDataModule,
    }


_registered = False


def register() -> None:
    """Store the schema nodes (idempotent)."""
    global _registered
    if _registered:
        return
    store = ConfigStore.instance()
    for name, cls in _classes().items():
        store.store(group="schema", name=name, node=signature_defaults(cls))
    _registered = True


def stage_module_config(stage: str) -> DictConfig:
    """The `module` node of conf/stage/<stage>.yaml over its schema (interpolations left
    unresolved): what the stage's LightningModule is built with."""
    yaml = OmegaConf.load(f"{CONFIG_DIR}/stage/{stage}.yaml").module
    schema = OmegaConf.create(signature_defaults(_classes()[f"{stage}_module"]))
    return OmegaConf.merge(schema, yaml)
