"""What an optimisation run (SVI, adversarial training) checkpoints and records, shared by its engines."""

import dataclasses
import hashlib
import math
import signal
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from latentkit.checkpoint import Checkpoint, capture_rng, restore_rng
from latentkit.inference.training import EpochRecord

__all__ = ["TrainingState", "digest", "jsonable", "stop_signal"]


def stop_signal(should_stop: Callable[[int], bool] | None, step: int) -> int | None:
    """The signal number with which ``should_stop`` asks to stop after ``step``, or None."""
    if should_stop is None or not should_stop(step):
        return None
    return int(getattr(should_stop, "signum", None) or signal.SIGINT)


def digest(kwargs: dict[str, Any]) -> dict[str, str]:
    """A short description of each model argument; tensors by dtype, shape and SHA-256."""
    out = {}
    for key in sorted(kwargs):
        value = kwargs[key]
        if isinstance(value, torch.Tensor):
            data = value.detach().cpu().contiguous()
            digest = hashlib.sha256(data.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
            out[key] = f"{str(data.dtype).removeprefix('torch.')}{list(data.shape)} sha256:{digest[:16]}"
        else:
            out[key] = repr(value)
    return out


class TrainingState:
    """Everything an optimisation run needs to continue bit-identically, to and from a :class:`Checkpoint`."""

    def __init__(self, named: dict[str, torch.Tensor], model: Any, optimizer: torch.optim.Optimizer,
                 losses: np.ndarray, cuda: list[int], rank: int = 0) -> None:
        self.named, self.model, self.optimizer, self.losses = named, model, optimizer, losses
        self.cuda, self.rank = cuda, rank
        self.record: EpochRecord | None = None

    def tracked(self) -> dict[str, torch.Tensor]:
        """The optimised tensors and the model's buffers: what a snapshot of the best epoch holds."""
        return {**self.named, **self._buffers()}

    def _buffers(self) -> dict[str, torch.Tensor]:
        if not isinstance(self.model, torch.nn.Module):
            return {}
        return {f"buffer.{name}": b for name, b in self.model.named_buffers()}

    def checkpoint(self, step: int, fingerprint: dict[str, Any],
                   ranks: list[tuple[dict[str, torch.Tensor], dict[str, Any]]] | None = None) -> Checkpoint:
        """The state after ``step`` steps; ``ranks``: every process's random states (distributed)."""
        tensors = {name: p.detach() for name, p in self.named.items()}
        tensors.update(self._buffers())
        tensors["losses"] = torch.from_numpy(self.losses[:step].copy())
        if self.record is not None:
            tensors.update(self.record.tensors())
        optim = self.optimizer.state_dict()
        extra: dict[str, dict[str, Any]] = {}
        for index, entry in optim["state"].items():
            for key, value in entry.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optim.{index}.{key}"] = value
                else:
                    extra.setdefault(str(index), {})[key] = value
        ranks = ranks or [capture_rng(self.cuda)]
        for index, (rng_tensors, _) in enumerate(ranks):
            tensors.update({name if index == 0 else f"{name}@{index}": t for name, t in rng_tensors.items()})
        meta = {"parameters": list(self.named), "optimizer": {"param_groups": optim["param_groups"], "state": extra},
                "rng": [rng_meta for _, rng_meta in ranks]}
        return Checkpoint(step=step, tensors=tensors, meta=meta, fingerprint=fingerprint)

    def restore(self, checkpoint: Checkpoint) -> None:
        tensors, meta = checkpoint.tensors, checkpoint.meta
        with torch.no_grad():
            for name, p in self.named.items():
                p.copy_(tensors[name])
            for name, b in self._buffers().items():
                b.copy_(tensors[name])
        state: dict[int, dict[str, Any]] = {}
        for name, value in tensors.items():
            if name.startswith("optim."):
                _, index, key = name.split(".", 2)
                state.setdefault(int(index), {})[key] = value
        for index, entry in meta["optimizer"]["state"].items():
            state.setdefault(int(index), {}).update(entry)
        groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["optimizer"]["param_groups"]]
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})
        self.losses[:checkpoint.step] = tensors["losses"].numpy()
        if self.record is not None:
            self.record.restore(tensors)
        suffix = f"@{self.rank}" if self.rank else ""
        own = {name.removesuffix(suffix): t for name, t in tensors.items() if name.startswith("rng.")
               and (name.endswith(suffix) if suffix else "@" not in name)}
        restore_rng(own, meta["rng"][self.rank])


def jsonable(options: Any) -> dict[str, Any]:
    """An options dataclass as JSON-ready values (callables and data by description)."""
    out = {}
    for key, value in {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}.items():
        if key == "validation" and value is not None:
            value = f"<held-out data {type(getattr(options, key)).__name__}>"
        elif callable(value) and not isinstance(value, str):
            value = f"<callable {getattr(value, '__qualname__', type(value).__name__)}>"
        elif isinstance(value, float) and not math.isfinite(value):
            value = str(value)
        out[key] = value
    return out
