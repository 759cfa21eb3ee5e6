"""Train one stage: `python -m gpsr.train stage=flow` or `stage=ddpm flow_ckpt=...`.

Builds the datamodule, stage module, callbacks, loggers and trainer from the Hydra config,
fits (resuming from `ckpt_path`), tests, and writes `metrics.json` under the run folder.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from gpsr.callbacks import RandomState
from gpsr.configs import check_setting_types
from gpsr.configs import register as register_schemas
from gpsr.utils.checkpoint import checkpoint_step, find_last_checkpoint
from gpsr.utils.cli import (
    CONFIG_DIR,
    check_output_dir,
    first_process,
    lock_run_dir,
    preflight,
    report_errors,
)
from gpsr.utils.device import set_cpu_threads
from gpsr.utils.errors import ConfigError, InputNotFoundError
from gpsr.utils.loggers import RUN_ID_FILE, ResumableCSVLogger

log = logging.getLogger("gpsr.train")

__all__ = ["train", "main"]


def resolve_ckpt_path(ckpt_path: str | None, output_dir: Path) -> str | None:
    """ "auto" -> the last checkpoint of this run folder (None when there is none yet)."""
    if ckpt_path in (None, "", "null"):
        return None
    if ckpt_path == "auto":
        found = find_last_checkpoint(output_dir)
        log.info("resume=auto: %s", found or "no checkpoint yet, starting fresh")
        return str(found) if found else None
    if Path(ckpt_path).is_dir():
        raise InputNotFoundError(f"ckpt_path={ckpt_path} is a folder; give a checkpoint file")
    if not Path(ckpt_path).is_file():
        raise InputNotFoundError(f"ckpt_path={ckpt_path} does not exist")
    return ckpt_path


def _plain(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        v = float(v.item() if isinstance(v, torch.Tensor) else v)
        out[k] = v if math.isfinite(v) else None
    return out


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit (and test) one stage as configured; returns the final validation/test metrics."""
    check_setting_types(cfg)
    output_dir = Path(cfg.paths.output_dir)
    check_output_dir(output_dir)
    lock_run_dir(output_dir)
    if cfg.trainer.get("accelerator") == "cpu" or not torch.cuda.is_available():
        devices = cfg.trainer.get("devices", 1)
        set_cpu_threads(devices if isinstance(devices, int) and devices > 0 else 1)
    L.seed_everything(cfg.seed, workers=True)

    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.stage.module)
    n_params = sum(p.numel() for p in module.parameters())
    # last.ckpt plus one periodic checkpoint: weights and two Adam moments each, twice over.
    check_output_dir(output_dir, need_bytes=2 * 3 * 4 * n_params + 2**20)
    log.info(
        "stage=%s: %s parameters (%s trainable)",
        cfg.stage.name,
        f"{n_params:,}",
        f"{sum(p.numel() for p in module.trainable_parameters()):,}",
    )

    # Where the run starts decides the loggers' history: a resume continues it, a fresh
    # start (no checkpoint yet, even in the folder of a run killed before its first one)
    # begins a new one: a new W&B run, and the CSV rows of the killed run are dropped.
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, output_dir)
    step = checkpoint_step(ckpt_path) if ckpt_path else 0
    if not ckpt_path and first_process():
        (output_dir / RUN_ID_FILE).unlink(missing_ok=True)
    callbacks = [instantiate(c) for c in (cfg.callbacks or {}).values() if c is not None]
    callbacks.append(RandomState())  # part of every checkpoint: a resume draws what comes next
    loggers = [instantiate(c) for c in (cfg.logger or {}).values() if c is not None]
    if not loggers:  # logger=none: nothing to send learning rates to (Lightning refuses)
        callbacks = [
            c for c in callbacks if not isinstance(c, L.pytorch.callbacks.LearningRateMonitor)
        ]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    for lg in loggers:
        if isinstance(lg, ResumableCSVLogger):
            lg.resume_at(step)  # step 0: a fresh history
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics = _plain(trainer.callback_metrics)
    if cfg.test_after_fit and not datamodule.has_split("test"):
        log.warning(
            "no test split in this data (data.test_fraction / data.test_root): the test after "
            "training is skipped; evaluate with python -m gpsr.evaluate (e.g. data=celebahq)"
        )
    elif cfg.test_after_fit and trainer.state.status == "finished":
        test = trainer.test(module, datamodule=datamodule, verbose=False)
        metrics.update(_plain(test[0]) if test else {})
    if trainer.is_global_zero:
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        log.info("metrics: %s", json.dumps(metrics, sort_keys=True))
    return metrics


register_schemas()  # the defaults that conf/stage and conf/data extend


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
@report_errors
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    key = cfg.get("optimized_metric")
    if not key:
        return None
    if key not in metrics:
        raise ConfigError(
            f"optimized_metric={key} was not logged by this run; it logged "
            f"{', '.join(sorted(k for k in metrics if k.startswith('val/')))}"
        )
    log.info("optimized_metric %s = %.6g", key, metrics[key])
    return metrics[key]


if __name__ == "__main__":
    preflight(sys.argv[1:])
    main()
