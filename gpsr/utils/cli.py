"""Shared plumbing of the command-line entry points: config location, output checks, and
turning gpsr's own errors into one clear line."""

from __future__ import annotations

import fcntl
import functools
import logging
import os
import shutil
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gpsr.utils.errors import ConfigError, GPSRError, OutputError

log = logging.getLogger("gpsr")

__all__ = [
    "CONFIG_DIR",
    "check_output_dir",
    "lock_run_dir",
    "first_process",
    "run_dir_owner",
    "report_errors",
    "finish_wandb",
    "preflight",
]

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def per_device_batch(global_batch: int, devices: Any, nodes: Any, accumulate: Any) -> int:
    """`${gpsr.per_device_batch:...}`: the per-device batch of a global batch split over
    devices x nodes x gradient-accumulation steps; an uneven split is a ConfigError."""
    try:
        world = int(devices) * int(nodes) * int(accumulate)
    except (TypeError, ValueError):
        raise ConfigError(
            f"global_batch_size={global_batch} needs trainer.devices, trainer.num_nodes and "
            f"trainer.accumulate_grad_batches as integers (got {devices!r}, {nodes!r}, "
            f"{accumulate!r})"
        ) from None
    if world < 1 or int(global_batch) % world:
        raise ConfigError(
            f"global_batch_size={global_batch} does not split evenly over {devices} device(s) x "
            f"{nodes} node(s) x {accumulate} accumulation step(s); change one of them"
        )
    return int(global_batch) // world


def study_storage(folder: str) -> str:
    """`${gpsr.study_storage:<folder>}`: the SQLite URL of an Optuna study kept in `folder`
    (conf/hparams_search/: the sweep folder), creating the folder, which Hydra makes only when
    the first trial starts, after the sweeper has opened the study."""
    path = Path(folder).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path / 'optuna.db'}"


def _register_resolvers() -> None:
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("gpsr.per_device_batch", per_device_batch, replace=True)
    OmegaConf.register_new_resolver("gpsr.study_storage", study_storage, replace=True)


_register_resolvers()


def one_line(err: BaseException) -> str:
    """The message of a gpsr error as one line. An error raised in a DataLoader worker
    reaches the main process with the worker's traceback in its message; keep the error's
    own last line."""
    text = str(err)
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if last.split(": ", 1)[0].endswith("Error") else last
    return text


def user_error(exc: BaseException) -> GPSRError | None:
    """The `GPSRError` behind `exc` (raised by gpsr's own checks, possibly wrapped by Hydra,
    Lightning or a re-raise), or None: anything else is not the user's and keeps its traceback."""
    from omegaconf.errors import MissingMandatoryValue

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, GPSRError):
            return exc
        if isinstance(exc, MissingMandatoryValue):  # a `???` setting left unset
            key = exc.full_key or "a required setting"
            return ConfigError(f"{key} is required: add {key}=... to the command line")
        exc = exc.__cause__ or exc.__context__
    return None


def finish_wandb(exit_code: int = 0) -> None:
    """Close the W&B run if one is open, so multirun jobs never merge into one run."""
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=exit_code)


def report_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run an entry point; a `GPSRError` becomes one line and exit status 1 (set
    GPSR_DEBUG=1 for the traceback); any other exception keeps its traceback, logged once
    (console and the run's log file) before exit status 1: Hydra, which would print it a
    second time, never sees it (with GPSR_DEBUG=1 it is raised to Hydra instead, unlogged).
    W&B is always closed."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        code = 0
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            code = 1
            err = user_error(exc)
            if os.environ.get("GPSR_DEBUG"):
                raise
            if err is None:
                log.error("".join(traceback.format_exception(exc)))
                raise SystemExit(1) from None
            print(f"gpsr: error: {one_line(err)}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None
        finally:
            finish_wandb(code)

    return wrapper


def check_output_dir(
    path: str | Path, need_bytes: int = 0, setting: str = "paths.log_dir or hydra.run.dir"
) -> Path:
    """Fail early, with the path in the message, if `path` cannot be created or written, or
    its disk has less than `need_bytes` free; `setting` names what the user can change."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise OutputError(
            f"output directory {path} is not writable ({err.strerror or err}); set "
            f"{setting} to a writable place"
        ) from None
    free = shutil.disk_usage(path).free
    if free < need_bytes:
        raise OutputError(
            f"only {free / 2**20:.0f} MiB free on the disk of {path}, but this run needs about "
            f"{need_bytes / 2**20:.0f} MiB for its checkpoints; free space or move paths.log_dir"
        )
    return path


_LOCKS: dict[Path, object] = {}


def first_process() -> bool:
    """Whether this is the first process of a run (environment RANK / SLURM_PROCID /
    LOCAL_RANK unset or 0): the one that owns the run folder's files."""
    return all(
        int(os.environ.get(k, "0") or 0) == 0 for k in ("RANK", "SLURM_PROCID", "LOCAL_RANK")
    )


def lock_run_dir(path: str | Path) -> None:
    """Hold `<path>/.gpsr.lock` until this process ends, or refuse in one line while another
    run holds it. An flock: the kernel releases it when its process dies, even by SIGKILL,
    so a killed run never leaves the folder locked. Only the first process of a run takes
    it (`first_process`)."""
    if not first_process():
        return
    path = Path(path).resolve()
    if path in _LOCKS:
        return
    handle = open(path / ".gpsr.lock", "a+")  # noqa: SIM115 (held for the process's life)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        owner = handle.read().strip() or "another process"
        handle.close()
        raise OutputError(
            f"run folder {path} is in use by another gpsr run ({owner}); wait for it to end "
            f"or choose another hydra.run.dir"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    _LOCKS[path] = handle


OUTPUT_OVERRIDES = ("hydra.run.dir=", "hydra.sweep.dir=", "paths.log_dir=", "paths.root_dir=")


def run_dir_owner(path: str | Path) -> str | None:
    """Who holds the run lock of `path` (`lock_run_dir`), or None when no live process does
    (the lock is only tested, never kept)."""
    lock = Path(path) / ".gpsr.lock"
    if Path(path).resolve() in _LOCKS or not lock.is_file():
        return None
    with open(lock, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            return handle.read().strip() or "another process"
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None


def preflight(argv: list[str]) -> None:
    """Before Hydra creates the run folder: refuse, in one line, an output path that cannot
    be created (a file in the way, or a read-only place), or a run folder that a live gpsr
    run holds (Hydra would otherwise replace that run's `.hydra` record before the run lock
    refuses this one)."""
    for arg in argv:
        for key in OUTPUT_OVERRIDES:
            if not arg.startswith(key):
                continue
            path = Path(arg[len(key) :]).expanduser()
            if "${" in str(path):
                continue
            # Only a run's first process: the others (DDP ranks started with the same
            # command) belong to the run that holds the lock.
            if (
                key == "hydra.run.dir="
                and first_process()
                and (owner := run_dir_owner(path)) is not None
            ):
                print(
                    f"gpsr: error: run folder {path} is in use by another gpsr run ({owner}); "
                    f"wait for it to end or choose another hydra.run.dir",
                    file=sys.stderr,
                )
                raise SystemExit(1)
            probe = path
            while not probe.exists() and probe.parent != probe:
                probe = probe.parent
            if not probe.is_dir() or not os.access(probe, os.W_OK):
                print(
                    f"gpsr: error: output directory {path} cannot be created ({probe} is "
                    f"{'not a folder' if not probe.is_dir() else 'not writable'}); "
                    f"set {key[:-1]} to a writable place",
                    file=sys.stderr,
                )
                raise SystemExit(1)
