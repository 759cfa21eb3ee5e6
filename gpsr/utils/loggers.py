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
    header and appends, so a resumed run's history continues in the same file. Rewrites
    (a new column, a resume) go through a temporary file and a rename, so a kill at any
    moment leaves the old file or the new one."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as fh:
                header = next(csv.reader(fh), [])
            self.metrics_keys = sorted(set(header))

    def log_metrics(self, metrics_dict: dict, step: int | None = None) -> None:
        """Record a row, unless it repeats the previous one exactly (same step and values:
        see `gpsr.callbacks.FinalCheckpoint`)."""
        super().log_metrics(metrics_dict, step)
        if self.metrics[-1] == self._last:
            self.metrics.pop()
        else:
            self._last = self.metrics[-1]

    _last: dict | None = None  # the last row recorded (it may already be on disk)

    def _rows(self) -> list[dict[str, str]]:
        if not os.path.isfile(self.metrics_file_path):
            return []
        with open(self.metrics_file_path, newline="") as fh:
            return list(csv.DictReader(fh))

    def _write_all(self, fieldnames: list[str], rows: list[dict[str, str]]) -> None:
        tmp = f"{self.metrics_file_path}.tmp"
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.metrics_file_path)

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        self._write_all(fieldnames, self._rows())

    def drop_from(self, step: int) -> None:
        """Forget every row logged at `step` or later (written or not)."""
        self.metrics = [m for m in self.metrics if int(m["step"]) < step]
        rows = self._rows()
        kept = [r for r in rows if int(float(r["step"])) < step]
        if len(kept) != len(rows):
            self._write_all(self.metrics_keys, kept)


class ResumableCSVLogger(CSVLogger):
    """`lightning.pytorch.loggers.CSVLogger` that appends to the metrics.csv of its folder.

    A run resumed from a checkpoint at step G calls `resume_at(G)`: rows of steps G and
    later, logged by the run that was stopped after that checkpoint, are dropped, since the
    resumed run logs those steps again. Checkpoints flush the rows logged so far
    (`gpsr.callbacks.FinalCheckpoint`), so every step up to a checkpoint is on disk: one row
    per step in the resumed history.
    """

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment

    def resume_at(self, step: int) -> None:
        if self.experiment is not None:  # None on processes other than rank zero
            self.experiment.drop_from(step)


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
