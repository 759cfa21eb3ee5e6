"""Logger factories: W&B offline by default (no account, no network), online with a key."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from lightning.pytorch.loggers import WandbLogger

__all__ = ["wandb_logger", "wandb_offline"]

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
