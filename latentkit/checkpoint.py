"""Checkpoints of optimisation runs in a run folder, written atomically, read without pickle.

A checkpoint is two files: the tensors (``checkpoint-STEP.safetensors``) and a JSON record
(``checkpoint-latest.json``) naming that file with its SHA-256, the step, the configuration
fingerprint and the non-tensor random states. Saving writes the new tensor file, moves
``checkpoint-latest.json`` to ``checkpoint-previous.json`` and only then renames the new record
(written and fsynced beforehand by :func:`~latentkit.runs.atomic_write`) to
``checkpoint-latest.json``; tensor files no record names are removed last. At any moment the
folder holds a complete checkpoint: a crash mid-save leaves the previous one, which
:func:`load_checkpoint` falls back to with a warning.

Layout::

    runs/NAME/
      checkpoint-latest.json       step, config fingerprint, sha256 of its tensor file, RNG states
      checkpoint-previous.json     the one before
      checkpoint-00001500.safetensors
      checkpoint-00001000.safetensors
"""

import contextlib
import hashlib
import json
import random
import re
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from latentkit.errors import ConfigError, RunFolderError
from latentkit.runs import atomic_write, fsync_directory

__all__ = ["Checkpoint", "CheckpointWarning", "save_checkpoint", "load_checkpoint", "has_checkpoint",
           "capture_rng", "restore_rng", "fork_host_rng", "compare_fingerprints", "FORMAT"]

#: Version of the checkpoint layout, bumped when it changes incompatibly.
FORMAT = 1
LATEST, PREVIOUS = "checkpoint-latest.json", "checkpoint-previous.json"
_TENSOR_FILE = re.compile(r"^checkpoint-\d{8}\.safetensors$")


class CheckpointWarning(UserWarning):
    """The latest checkpoint was unusable and an older one was loaded instead."""


@dataclass
class Checkpoint:
    """The state of an optimisation run after ``step`` steps.

    Attributes:
        step: the number of completed steps.
        tensors: parameters, optimiser state, loss history and tensor RNG states by name.
        meta: JSON-serialisable state (optimiser hyper-parameters, Python and NumPy RNG details).
        fingerprint: what the run was made with (model, engine options, seed, data digest);
            resuming compares it to the new run's.
    """

    step: int
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    fingerprint: dict[str, Any] = field(default_factory=dict)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def has_checkpoint(folder: str | Path) -> bool:
    """Whether ``folder`` holds a checkpoint record (latest or previous)."""
    folder = Path(folder)
    return (folder / LATEST).is_file() or (folder / PREVIOUS).is_file()


def save_checkpoint(folder: str | Path, checkpoint: Checkpoint) -> Path:
    """Write ``checkpoint`` into the run folder ``folder``; returns the tensor file written.

    Raises:
        RunFolderError: the folder cannot be written (read-only, full disk); the checkpoints
            already there are unchanged.
    """
    folder = Path(folder)
    name = f"checkpoint-{checkpoint.step:08d}.safetensors"
    tensors = {k: v.detach().cpu().contiguous() for k, v in checkpoint.tensors.items()}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / name, lambda p: save_file(tensors, str(p)))
        record = {
            "format": FORMAT,
            "step": checkpoint.step,
            "tensors": name,
            "sha256": _sha256(folder / name),
            "fingerprint": checkpoint.fingerprint,
            "meta": checkpoint.meta,
        }
        text = json.dumps(record, indent=1)
        latest, upcoming = folder / LATEST, folder / ".checkpoint-next.json"
        atomic_write(upcoming, lambda p: p.write_text(text))
        if latest.is_file() and _record_names(latest) != name:
            latest.replace(folder / PREVIOUS)
        upcoming.replace(latest)
        fsync_directory(folder)
    except OSError as error:
        raise RunFolderError(
            f"run_dir: could not write a checkpoint into {str(folder)!r} ({error.strerror or error}); "
            "free disk space or choose a writable folder. The previous checkpoint is unchanged."
        ) from error
    keep = {name} | {n for n in (_record_names(folder / PREVIOUS),) if n}
    for path in folder.iterdir():
        if _TENSOR_FILE.match(path.name) and path.name not in keep:
            path.unlink(missing_ok=True)
    return folder / name


def _record_names(path: Path) -> str | None:
    try:
        return str(json.loads(path.read_text())["tensors"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _read(folder: Path, record_name: str) -> Checkpoint:
    """Read one checkpoint; raises ValueError/OSError when it is missing, corrupted or unsafe."""
    record = json.loads((folder / record_name).read_text())
    if record.get("format") != FORMAT:
        raise ValueError(f"format {record.get('format')!r} is not {FORMAT}")
    name = str(record["tensors"])
    if not _TENSOR_FILE.match(name):
        raise ValueError(f"names the tensor file {name!r}, which is not a checkpoint file")
    path = folder / name
    if _sha256(path) != record["sha256"]:
        raise ValueError(f"{name} does not match its SHA-256 checksum (truncated or modified)")
    try:
        # safetensors parses a header and raw buffers: nothing in the file is executed.
        tensors = load_file(str(path))
    except SafetensorError as error:
        raise ValueError(f"{name} is not a safetensors file ({error})") from error
    return Checkpoint(step=int(record["step"]), tensors=tensors, meta=record.get("meta", {}),
                      fingerprint=record.get("fingerprint", {}))


def load_checkpoint(folder: str | Path) -> Checkpoint:
    """Load the newest usable checkpoint of a run folder.

    The latest checkpoint is checked against its SHA-256; when it is missing, truncated or
    corrupted, the previous one is loaded with a :class:`CheckpointWarning`. Files are read
    with safetensors and JSON only: a checkpoint cannot run code.

    Raises:
        RunFolderError: the folder holds no usable checkpoint.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise RunFolderError(f"resume: {str(folder)!r} is not a folder; pass the run folder of an "
                             "interrupted fit (its out=).")
    problems = []
    for record_name in (LATEST, PREVIOUS):
        if not (folder / record_name).is_file():
            problems.append(f"{record_name}: missing")
            continue
        try:
            checkpoint = _read(folder, record_name)
        except (OSError, ValueError, KeyError, TypeError) as error:
            problems.append(f"{record_name}: {error}")
            continue
        if problems and record_name == PREVIOUS:
            warnings.warn(f"the latest checkpoint in {str(folder)!r} is unusable ({problems[0]}); "
                          f"resuming from the previous one at step {checkpoint.step}.",
                          CheckpointWarning, stacklevel=2)
        return checkpoint
    raise RunFolderError(f"resume: no usable checkpoint in {str(folder)!r} ({'; '.join(problems)}); "
                         "start a new run with out= instead of resume=.")


# -- random states -------------------------------------------------------------------------------
def capture_rng(devices: list[int] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Python's, NumPy's global and torch's (CPU and the given CUDA devices) random states.

    Pyro draws from torch's generators, so this also covers Pyro. Returns tensors and a JSON
    part, as stored in a :class:`Checkpoint`.
    """
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {
        "rng.python": torch.tensor(state, dtype=torch.int64),
        "rng.numpy": torch.from_numpy(keys.astype(np.int64)),
        "rng.torch": torch.get_rng_state(),
    }
    for index in devices or []:
        tensors[f"rng.cuda.{index}"] = torch.cuda.get_rng_state(index)
    meta = {"python": [version, gauss], "numpy": [kind, int(pos), int(has_gauss), float(cached)]}
    return tensors, meta


def restore_rng(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    """Set the random states captured by :func:`capture_rng`."""
    version, gauss = meta["python"]
    random.setstate((version, tuple(int(x) for x in tensors["rng.python"].tolist()), gauss))
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["rng.torch"])
    for name, state in tensors.items():
        if name.startswith("rng.cuda."):
            torch.cuda.set_rng_state(state, int(name.rsplit(".", 1)[1]))


# -- fingerprints ----------------------------------------------------------------------------------
def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


#: Differences named in a refused resume before the rest are counted.
MAX_SHOWN = 8


def compare_fingerprints(saved: Mapping[str, Any], current: Mapping[str, Any], folder: str | Path) -> None:
    """Raise a :class:`ConfigError` naming every difference between two run fingerprints."""
    old, new = _flatten(json.loads(json.dumps(saved))), _flatten(json.loads(json.dumps(current)))
    differences = [f"{key}: {old.get(key, '<absent>')!r} in the checkpoint, {new.get(key, '<absent>')!r} now"
                   for key in sorted(set(old) | set(new), key=lambda k: (k.startswith("parameters."), k))
                   if old.get(key) != new.get(key)]
    if differences:
        shown = differences[:MAX_SHOWN] + ([f"and {len(differences) - MAX_SHOWN} more"]
                                           if len(differences) > MAX_SHOWN else [])
        raise ConfigError(
            f"resume: the checkpoint in {str(folder)!r} was made with another model or configuration; "
            + "; ".join(shown)
            + ". Resume with the original settings, or start a new run in another folder."
        )


@contextlib.contextmanager
def fork_host_rng() -> Iterator[None]:
    """Restore Python's and NumPy's global random states on exit (resuming sets them)."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
