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
from omegaconf import DictConfig, ListConfig, OmegaConf

from gpsr.utils.cli import CONFIG_DIR
from gpsr.utils.errors import ConfigError

__all__ = ["register", "signature_defaults", "stage_module_config", "check_setting_types"]

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


# Lightning Trainer settings that gpsr's configs set and that must be numbers.
_TRAINER_INTEGERS = (
    "max_steps", "max_epochs", "log_every_n_steps", "accumulate_grad_batches",
    "num_sanity_val_steps", "num_nodes",
)  # fmt: skip
_TRAINER_NUMBERS = ("val_check_interval", "gradient_clip_val")


def _kind(default: Any) -> str | None:
    """What a setting with this default must hold: "bool", "int", "number", "str" or None
    (no rule: a default of None says nothing about the type)."""
    if isinstance(default, bool):
        return "bool"
    if isinstance(default, int):
        return "int"
    if isinstance(default, float):
        return "number"
    return "str" if isinstance(default, str) else None


def _fits(value: Any, kind: str) -> bool:
    if value is None:  # null switches a setting off (e.g. grad_clip); the classes check the rest
        return True
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return number and (kind == "number" or isinstance(value, int))


_WORDS = {"bool": "true or false", "int": "an integer", "number": "a number", "str": "a string"}


def check_setting_types(cfg: DictConfig) -> None:
    """Refuse, in one line naming it, a setting of `gpsr.train` whose value has the wrong
    type (e.g. `trainer.max_steps=abc`): the stage's and the data's settings against the
    types of their defaults (the class signatures), the Trainer's numeric settings, and the
    optimiser's and scheduler's arguments (numbers, lists of numbers or booleans: never a
    word). Values are checked as composed, before anything is built."""
    checks: list[tuple[str, Any, str]] = []
    stage = cfg.get("stage") or {}
    classes = _classes()
    for prefix, node, cls in (
        ("stage.module", stage.get("module"), classes.get(f"{stage.get('name')}_module")),
        ("data", cfg.get("data"), classes["data_module"]),
    ):
        if node is None or cls is None:
            continue
        for key, default in signature_defaults(cls).items():
            kind = _kind(default)
            if kind is not None and key in node:
                checks.append((f"{prefix}.{key}", node.get(key), kind))
    trainer = cfg.get("trainer") or {}
    checks += [(f"trainer.{k}", trainer.get(k), "int") for k in _TRAINER_INTEGERS if k in trainer]
    checks += [(f"trainer.{k}", trainer.get(k), "number") for k in _TRAINER_NUMBERS if k in trainer]
    for key, value, kind in checks:
        if not _fits(value, kind):
            raise ConfigError(f"{key} must be {_WORDS[kind]}, got {value!r}")
    module = stage.get("module") or {}
    for part in ("optimizer", "scheduler"):
        node = module.get(part)
        if not isinstance(node, DictConfig):
            continue
        for key, value in node.items():
            values = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
            if not key.startswith("_") and any(isinstance(v, str) for v in values):
                raise ConfigError(
                    f"stage.module.{part}.{key} must be a number (or a list of numbers), "
                    f"got {value!r}"
                )
