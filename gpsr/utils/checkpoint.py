"""Checkpoints written atomically and loaded safely (`weights_only=True`), with clear errors.

Every gpsr checkpoint carries `checkpoint["gpsr"] = {"stage", "scale", "version"}` so a file of
the wrong stage or scale is refused with one line instead of a shape mismatch deep in torch.
`version` is the weights' layout (`gpsr.loading.FORMAT_VERSION`, which also upgrades older
layouts on load).

Each gpsr checkpoint is sealed with a SHA-256 of its whole content, stored inside it: a file
changed or damaged after it was written (a flipped bit, a truncated copy, an edited tensor)
no longer matches and is refused. The seal is not a signature: whoever can write the file
can also recompute it, so it guards against accidents, not against tampering. A gpsr
checkpoint without a seal is refused as well.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from gpsr.utils.errors import NO_SPACE, NOT_WRITABLE, GPSRError, OutputError, os_error_in_chain

__all__ = [
    "CheckpointError",
    "AtomicCheckpointIO",
    "atomic_save",
    "write_atomically",
    "load_checkpoint",
    "check_gpsr_checkpoint",
    "find_last_checkpoint",
    "checkpoint_step",
    "checkpoint_digest",
]

log = logging.getLogger(__name__)


class CheckpointError(GPSRError, ValueError):
    """A checkpoint that cannot be used; the message names the file and what is wrong."""


def checkpoint_digest(obj: Any) -> str:
    """SHA-256 over a checkpoint's whole content (tensors by dtype, shape and bytes; plain
    values by type and value), leaving out the digest field `ckpt["gpsr"]["sha256"]` itself."""
    h = hashlib.sha256()

    def visit(o: Any, path: str) -> None:
        if isinstance(o, dict):
            keys = sorted((k for k in o if f"{path}/{k}" != "/gpsr/sha256"), key=str)
            h.update(f"{path}:dict{len(keys)}|".encode())
            for key in keys:
                visit(o[key], f"{path}/{key}")
        elif isinstance(o, (list, tuple)):
            h.update(f"{path}:{type(o).__name__}{len(o)}|".encode())
            for i, v in enumerate(o):
                visit(v, f"{path}/{i}")
        elif isinstance(o, torch.Tensor):
            t = o.detach().cpu().contiguous()
            h.update(f"{path}:{t.dtype}{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(f"{path}:{type(o).__name__}={o!r}|".encode())

    visit(obj, "")
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomically(jobs: list[tuple[Path, Callable[[Any], None]]]) -> None:
    """Write files all or nothing: each `write(fh)` goes to a temporary file beside its
    target, which is fsynced and given the mode `open()` would (the umask); only when every
    one is complete are they renamed over their targets. A failure (or a kill) at any point
    leaves no partial file and, before the renames, none of the new files; the error is
    raised as it came (the callers say what it means)."""
    temps: list[tuple[Path, Path]] = []
    try:
        for target, write in jobs:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
            temps.append((Path(tmp), target))
            with os.fdopen(fd, "wb") as fh:
                write(fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give what open() would
        for tmp, target in temps:
            os.replace(tmp, target)
    except BaseException:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)
        raise


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`
    (`write_atomically`): a crash at any point leaves either the old file or the new one,
    never a partial file."""
    path = Path(path)
    try:
        write_atomically([(path, lambda fh: torch.save(obj, fh))])
    except BaseException as err:
        # torch's zip writer reports a full disk as a RuntimeError ("file write failed", or
        # "unexpected pos" with the OSError only in its context): found by errno in the chain.
        no_space = os_error_in_chain(err, NO_SPACE) is not None
        no_space |= isinstance(err, RuntimeError) and "write failed" in str(err)
        if no_space:
            free = shutil.disk_usage(path.parent).free
            raise OutputError(
                f"cannot write checkpoint {path}: no space left on its disk "
                f"({free / 2**20:.0f} MiB free); free space or move paths.log_dir (the "
                f"checkpoints already written are intact)"
            ) from None
        if (denied := os_error_in_chain(err, NOT_WRITABLE)) is not None:
            raise OutputError(
                f"cannot write checkpoint {path}: {denied.strerror or denied} (the folder is "
                f"read-only or not yours); choose a writable place"
            ) from None
        raise


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """torch.load with `weights_only=True`; missing, truncated or tampered files raise CheckpointError."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        detail = _unpickling_detail(err)
        if "GLOBAL" in detail:  # a class or function the safe loader will not import
            raise CheckpointError(
                f"checkpoint {path} was refused by the safe loader (weights_only=True): it "
                f"asks to load code or objects other than tensors and plain containers, so it "
                f"was not written by gpsr or was tampered with ({detail}); it was not run"
            ) from err
        raise CheckpointError(
            f"checkpoint {path} is not a readable checkpoint: its content is damaged or it is "
            f"another kind of file ({detail})"
        ) from err
    except Exception as err:  # noqa: BLE001 - any failure to deserialize is a damaged file
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(
            f"checkpoint {path} cannot be read: it is truncated, damaged or not a checkpoint "
            f"({first})"
        ) from err
    if not isinstance(ckpt, dict):
        raise CheckpointError(
            f"checkpoint {path} is not a gpsr checkpoint (got {type(ckpt).__name__})"
        )
    if isinstance(ckpt.get("gpsr"), dict):
        digest = ckpt["gpsr"].get("sha256")
        if digest is None:
            raise CheckpointError(
                f"checkpoint {path} has no integrity seal (gpsr/sha256): it was not written by "
                f"gpsr's checkpoint IO or its seal was removed"
            )
        if checkpoint_digest(ckpt) != digest:
            raise CheckpointError(
                f"checkpoint {path} failed its integrity check: its content changed after it "
                f"was saved (damaged, truncated or edited)"
            )
    return ckpt


def _unpickling_detail(err: Exception) -> str:
    """What the safe loader refused, without torch's advice around it (which suggests
    `weights_only=False`: never to be followed for a file one did not write)."""
    keep = [
        line.strip()
        for line in str(err).splitlines()
        if line.strip()
        and not line.startswith(("Weights only load failed", "Please file an issue", "Check the"))
    ]
    text = " ".join(keep).replace("WeightsUnpickler error: ", "")
    return text or type(err).__name__


def check_gpsr_checkpoint(
    ckpt: dict[str, Any], path: str | Path, stage: str | None = None, scale: int | None = None
) -> dict[str, Any]:
    """Return `ckpt["gpsr"]` after checking its stage and scale; CheckpointError otherwise."""
    meta = ckpt.get("gpsr")
    if not isinstance(meta, dict) or "stage" not in meta:
        raise CheckpointError(f"checkpoint {path} is not a gpsr checkpoint (no 'gpsr' metadata)")
    if stage is not None and meta["stage"] != stage:
        raise CheckpointError(
            f"checkpoint {path} is a '{meta['stage']}' checkpoint, but a '{stage}' checkpoint is needed"
        )
    if scale is not None and meta.get("scale") != scale:
        raise CheckpointError(
            f"checkpoint {path} was trained for scale {meta.get('scale')}, but this run uses "
            f"scale={scale}"
        )
    return meta


def checkpoint_step(path: str | Path) -> int:
    """The training step a checkpoint holds (`global_step`), read without loading its
    tensors into memory (mmap, weights_only). A file that cannot be read so is refused by
    `load_checkpoint`, in one line saying why (a CheckpointError)."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - the guarded loader says what is wrong with the file
        load_checkpoint(path)
        raise
    if not isinstance(data, dict):
        load_checkpoint(path)  # not a checkpoint: refused there, with the reason
    return int(data.get("global_step", 0))


def find_last_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint under `<run_dir>/checkpoints/` furthest along in training (the largest
    step stored in it) that loads and verifies, or None.

    Ranked by the step a checkpoint holds, never by file times (a copied run folder has new
    ones): periodic checkpoints carry it in their name (`step0001200.ckpt`), others
    (`last.ckpt`) are read. One that fails to load (a stale or damaged file) is passed over
    with a warning. Temporary files left by a save that was killed are removed first.
    """
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return None
    for tmp in folder.glob(".*.ckpt.*.tmp"):
        log.warning("removing %s, left by an interrupted checkpoint save", tmp)
        tmp.unlink(missing_ok=True)

    def verified_step(path: Path) -> int | None:
        try:
            return int(load_checkpoint(path).get("global_step", -1))
        except CheckpointError as err:
            log.warning("not resuming from %s: %s", path, err)
            return None

    best: tuple[int, Path] | None = None
    named = []
    for path in folder.glob("*.ckpt"):
        match = re.fullmatch(r"step(\d+)", path.stem)
        if match:
            named.append((int(match.group(1)), path))
        elif (step := verified_step(path)) is not None and (best is None or step > best[0]):
            best = (step, path)
    for step, path in sorted(named, reverse=True):
        if best is not None and step <= best[0]:
            break
        if verified_step(path) is not None:
            best = (step, path)
            break
    return best[1] if best else None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that writes atomically and loads with `weights_only=True`."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None
    ) -> None:
        if isinstance(checkpoint.get("gpsr"), dict):
            # Sealed last, over the final content, so any later change is detected on load.
            checkpoint["gpsr"]["sha256"] = checkpoint_digest(checkpoint)
        atomic_save(checkpoint, path)

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        return load_checkpoint(path, map_location=map_location or "cpu")
