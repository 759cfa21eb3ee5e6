"""Loggers: W&B offline by default (no account, no network), online with a key; a CSV logger
whose history survives a resume."""

from __future__ import annotations

import csv
import os
import uuid
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

__all__ = ["wandb_logger", "wandb_offline", "ResumableCSVLogger"]


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing metrics.csv; this one keeps its rows and
    header and appends, so a resumed run's history continues in the same file."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as fh:
                header = next(csv.reader(fh), [])
            self.metrics_keys = sorted(set(header))


class ResumableCSVLogger(CSVLogger):
    """`lightning.pytorch.loggers.CSVLogger` that appends to the metrics.csv of its folder."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


RUN_ID_FILE = "wandb_run_id.txt"


def wandb_offline(offline: bool | None) -> bool:
    """Explicit setting wins; otherwise offline unless WANDB_API_KEY is set."""
    if offline is not None:
        return bool(offline)
    return not os.environ.get("WANDB_API_KEY")


def wandb_logger(
    save_dir: str,
    project: str = "gpsr",
    entity: str | None = None,
    group: str | None = None,
    tags: list[str] | None = None,
    name: str | None = None,
    offline: bool | None = None,
    log_model: bool = False,
) -> WandbLogger:
    """A WandbLogger writing under `save_dir`; a resumed run (same output folder) continues
    the same W&B run, whose id is kept in `<save_dir>/wandb_run_id.txt`."""

    save = Path(save_dir)
    save.mkdir(parents=True, exist_ok=True)
    id_file = save / RUN_ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id)
    return WandbLogger(
        save_dir=str(save),
        project=project,
        entity=entity,
        group=group,
        tags=list(tags or []),
        name=name,
        id=run_id,
        resume="allow",
        offline=wandb_offline(offline),
        log_model=log_model,
    )
