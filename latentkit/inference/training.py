"""Training-loop pieces of the SVI engine that work for every model: KL warm-up, and the per-epoch
record (training and validation ELBO, model monitors, early stopping with the best parameters).

An *epoch* is one pass over the data: ``N // batch_size`` steps with minibatches (as
:class:`~latentkit.distributed.Minibatches` draws them), one step without.
"""

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

__all__ = ["LatentScale", "warmup_factor", "EpochRecord", "evaluate"]


class LatentScale(Messenger):
    """Multiply the log-density of the continuous latent sites by ``factor`` (model and guide alike).

    Pyro's annealing recipe (examples/dmm.py) wraps each latent ``pyro.sample`` statement in
    ``poutine.scale``; the engine cannot edit a user's model, so this handler applies the same
    scale to every sample site that is neither observed, nor a plate's subsample, nor marked for
    enumeration. ``poutine.scale`` itself would scale observed sites too, and refuses a factor of 0.
    Under ``Trace_ELBO`` the loss becomes ``-E_q[log p(x | z) + factor (log p(z) - log q(z))]``.
    """

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def _process_message(self, msg: dict[str, Any]) -> None:
        if (msg["type"] == "sample" and not msg["is_observed"] and not site_is_subsample(msg)
                and msg["infer"].get("enumerate") is None):
            msg["scale"] = self.factor * msg["scale"]


def warmup_factor(step: int, warmup_steps: int, start: float) -> float:
    """The KL annealing factor of (0-based) ``step``: linear from ``start`` to 1 over
    ``warmup_steps`` steps, then 1 (Bowman et al. 2016; Pyro's examples/dmm.py)."""
    if step >= warmup_steps:
        return 1.0
    return start + (1.0 - start) * (step + 1) / warmup_steps


class EpochRecord:
    """Per-epoch metrics of a fit, and the best parameters seen on the validation ELBO.

    Args:
        named: the optimised tensors by name (the snapshot of the best epoch copies them).
        patience: stop when the validation ELBO has not improved for this many epochs, keeping a
            copy of the parameters of the best epoch (None: never stop, keep no copy).

    Shapes:
        :attr:`metrics` maps each name to a list with one value per epoch: a float, or an array
        of a fixed shape (e.g. ``kl_per_dim``, ``(latent_dim,)``); :meth:`arrays` stacks them to
        ``(epochs, ...)``.
    """

    def __init__(self, named: Mapping[str, torch.Tensor], patience: int | None) -> None:
        self.named, self.patience = named, patience
        self.metrics: dict[str, list[np.ndarray]] = {}
        self.best: dict[str, torch.Tensor] = {}

    @property
    def epochs(self) -> int:
        return len(next(iter(self.metrics.values()), []))

    def add(self, values: Mapping[str, Any]) -> None:
        """Record one epoch; with a ``validation_elbo`` better than all before, snapshot the parameters."""
        for name, value in values.items():
            array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
            self.metrics.setdefault(name, []).append(array.astype(float))
        history = self.metrics.get("validation_elbo")
        if self.patience is not None and history is not None and len(history) - 1 == self.best_epoch:
            self.best = {name: t.detach().clone() for name, t in self.named.items()}

    @property
    def best_epoch(self) -> int | None:
        """0-based epoch of the highest validation ELBO (the first, on ties); None without validation."""
        history = self.metrics.get("validation_elbo")
        if not history:
            return None
        values = np.array([float(v) for v in history])
        return int(np.argmax(np.where(np.isnan(values), -math.inf, values)))

    def should_stop(self) -> bool:
        """Whether ``patience`` epochs have passed without a better validation ELBO."""
        best = self.best_epoch
        return self.patience is not None and best is not None and self.epochs - 1 - best >= self.patience

    def restore_best(self) -> None:
        with torch.no_grad():
            for name, tensor in self.named.items():
                tensor.copy_(self.best[name])

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: np.stack(values) for name, values in self.metrics.items()}

    # -- checkpoints ------------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        """The record as checkpoint tensors: ``epoch.<metric>`` and ``best.<parameter>``."""
        out = {f"epoch.{name}": torch.from_numpy(array) for name, array in self.arrays().items()}
        out.update({f"best.{name}": t for name, t in self.best.items()})
        return out

    def restore(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.metrics = {name.removeprefix("epoch."): list(t.numpy()) for name, t in tensors.items()
                        if name.startswith("epoch.")}
        self.best = {name.removeprefix("best."): t.clone() for name, t in tensors.items() if name.startswith("best.")}


def evaluate(fn: Callable[[], torch.Tensor], seed: int, cuda: list[int]) -> float:
    """``fn()`` without gradients, on fixed random numbers that leave the training stream untouched
    (so each epoch's validation ELBO uses the same draws, and resumed runs stay bit-identical)."""
    with torch.no_grad(), torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        return float(fn())
