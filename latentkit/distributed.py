"""Running one fit on several processes started by ``torchrun``: data-parallel SVI, MCMC chains
spread across ranks.

SVI: every rank holds the data and draws the same global minibatch of indices each step (a
permutation per epoch, seeded like ``torch.utils.data.DistributedSampler`` with
``seed + epoch``); rank ``r`` takes positions ``r, r + W, ...`` of it. Each rank's ELBO is
scaled by Pyro's plate to the whole data set; weighting each rank's gradient by its share of
the global batch and summing them over ranks (one ``all_reduce`` per step) gives exactly the
gradient of the single-process ELBO on the global batch. gloo on CPU, NCCL on CUDA.

MCMC: the ``num_chains`` chains are split across ranks (rank ``r`` seeds its chains with
``seed * W + r``), each rank runs its share vectorised, and every rank receives the merged
result.
"""

import atexit
import copy
import dataclasses
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from pyro import poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from latentkit.errors import ConfigError

__all__ = ["Context", "setup", "launched_by_torchrun", "rank", "Minibatches", "subsample_sizes",
           "fixed_subsample", "average_gradients", "gather_rng", "broadcast_parameters", "fit_chains"]


@dataclass(frozen=True)
class Context:
    """This process's place in the process group."""

    rank: int
    world_size: int
    device: str | None


def launched_by_torchrun() -> bool:
    """Whether this process is one of several started by ``torchrun`` (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank() -> int:
    """This process's rank, 0 outside a process group."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def setup(device: str | None) -> Context:
    """Join (or start) the default process group: NCCL for a CUDA ``device``, else gloo.

    On CUDA each process uses ``cuda:LOCAL_RANK``.

    Raises:
        ConfigError: not launched by torchrun (no ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``).
    """
    cuda = device is not None and torch.device(device).type == "cuda"
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise ConfigError(
                f"distributed: no torch.distributed environment ({', '.join(missing)} unset); launch "
                "the script with torchrun --nproc_per_node=N (see README, 'Long runs, many processes and machines')."
            )
        dist.init_process_group("nccl" if cuda else "gloo")
        atexit.register(_destroy)
    return Context(dist.get_rank(), dist.get_world_size(), device)


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# -- SVI: the same global minibatch everywhere, a disjoint shard per rank -------------------------
class Minibatches:
    """Indices of each rank's share of the global minibatch of a given step.

    Args:
        size: the number of data points ``N`` (the data plate's size).
        batch_size: the global minibatch size ``B`` (None: the whole data set every step).
        seed: epoch ``e`` uses the permutation drawn by a generator seeded with ``seed + e``.
        rank, world_size: this process's rank and the number of processes ``W``.

    Epochs have ``N // B`` steps; the last ``N % B`` points of each permutation are left out
    (``drop_last``). A pure function of the step: nothing to checkpoint.

    Shapes:
        :meth:`indices` returns ``(local_size,)`` with ``local_size`` = ``len(range(rank, G, W))``
        for the global batch size ``G`` (``B``, or ``N`` without minibatches).

    Example:
        >>> a, b = Minibatches(10, 4, seed=0, rank=0, world_size=2), Minibatches(10, 4, seed=0, rank=1, world_size=2)
        >>> whole = Minibatches(10, 4, seed=0)
        >>> sorted(torch.cat([a.indices(3), b.indices(3)]).tolist()) == sorted(whole.indices(3).tolist())
        True
    """

    def __init__(self, size: int, batch_size: int | None, *, seed: int, rank: int = 0,
                 world_size: int = 1) -> None:
        if batch_size is not None and batch_size > size:
            raise ConfigError(f"batch_size: {batch_size} is larger than the data ({size} points); "
                              "lower it or drop batch_size.")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.global_size = size if batch_size is None else batch_size
        self.local_size = len(range(rank, self.global_size, world_size))
        if self.local_size == 0:
            raise ConfigError(f"batch_size: a global batch of {self.global_size} leaves rank {rank} of "
                              f"{world_size} without data; use at least {world_size} points per step.")
        self._epoch: tuple[int, torch.Tensor] | None = None

    @property
    def weight(self) -> float:
        """This rank's share of the global batch: the weight of its gradient in the sum."""
        return self.local_size / self.global_size

    def indices(self, step: int) -> torch.Tensor:
        if self.batch_size is None:
            return torch.arange(self.rank, self.size, self.world_size)
        per_epoch = self.size // self.batch_size
        epoch, position = divmod(step, per_epoch)
        if self._epoch is None or self._epoch[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._epoch = (epoch, torch.randperm(self.size, generator=generator))
        start = position * self.batch_size
        return self._epoch[1][start:start + self.batch_size][self.rank::self.world_size]


def subsample_sizes(fn: Any, kwargs: dict[str, Any]) -> set[int]:
    """Full sizes of the plates that take ``subsample_size`` (found by one run of the model with
    ``subsample_size=1``; the caller's random state is untouched)."""
    with torch.random.fork_rng(), torch.no_grad():
        trace = poutine.trace(fn).get_trace(**{**kwargs, "subsample_size": 1})
    return {site["fn"].size for site in trace.nodes.values()
            if site_is_subsample(site) and site["fn"].subsample_size == 1 < site["fn"].size}


class _FixedSubsample(Messenger):
    def __init__(self, size: int, indices: torch.Tensor) -> None:
        super().__init__()
        self.size, self.indices = size, indices

    def _pyro_sample(self, msg: Any) -> None:
        fn = msg["fn"]
        if site_is_subsample(msg) and fn.size == self.size and fn.subsample_size == len(self.indices) < fn.size:
            msg["value"] = self.indices.to(fn.device)


@contextmanager
def fixed_subsample(batches: Minibatches, step: int) -> Iterator[None]:
    """Make subsampled plates of size ``batches.size`` use this rank's indices for ``step``."""
    with _FixedSubsample(batches.size, batches.indices(step)):
        yield


def average_gradients(params: Sequence[torch.Tensor], weight: float, extras: Sequence[float]) -> torch.Tensor:
    """Replace each gradient by the sum over ranks of ``weight * gradient``, in one all-reduce.

    ``extras`` (e.g. the weighted loss and stop flags) ride along and are returned summed.
    """
    device = params[0].device
    parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) * weight for p in params]
    parts.append(torch.tensor(list(extras), dtype=parts[0].dtype, device=device))
    flat = torch.cat(parts)
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n
    return flat[offset:].cpu()


def gather_rng(cuda: list[int]) -> list[tuple[dict[str, torch.Tensor], dict[str, Any]]]:
    """Every rank's random states (:func:`~latentkit.checkpoint.capture_rng`), in rank order."""
    from latentkit.checkpoint import capture_rng

    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, capture_rng(cuda))
    return states


def broadcast_parameters(params: Sequence[torch.Tensor]) -> None:
    """Copy rank 0's parameter values to every rank."""
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)


# -- MCMC: chains across ranks ----------------------------------------------------------------------
GATHERED = ("posterior", "sample_stats", "log_likelihood", "posterior_predictive")


def fit_chains(engine: Any, model: Any, data: Any, *, seed: int, progress: bool, context: Context) -> Any:
    """Run an MCMC engine's ``num_chains`` chains spread over the ranks; returns the merged result.

    Rank ``r`` runs ``num_chains // W`` chains (one more for the first ``num_chains % W``
    ranks) with seed ``seed * W + r``; chains are numbered by rank.
    """
    W, r = context.world_size, context.rank
    total = engine.options.num_chains
    counts = [total // W + (i < total % W) for i in range(W)]
    if counts[-1] == 0:
        raise ConfigError(f"num_chains: {total} chains cannot be spread over {W} processes; "
                          f"use at least {W} chains or fewer processes.")
    local = copy.copy(engine)
    options: dict[str, Any] = {"num_chains": counts[r]}
    if context.device is not None:
        options["device"] = context.device
    local.options = dataclasses.replace(engine.options, **options)
    result = local.fit(model, data, seed=seed * W + r, progress=progress and r == 0)
    parts: list[Any] = [None] * W
    dist.all_gather_object(parts, {name: getattr(result, name) for name in GATHERED})
    merged = {name: {k: np.concatenate([p[name][k] for p in parts]) for k in parts[0][name]}
              for name in GATHERED}
    if hasattr(result.model, "relabel"):
        merged["posterior"] = result.model.relabel(merged["posterior"])
    config = copy.deepcopy(result.config)
    config["seed"] = seed
    config["engine"]["options"]["num_chains"] = total
    config["distributed"] = {"world_size": W, "chain_seeds": [seed * W + i for i in range(W)],
                             "chains_per_rank": counts}
    return dataclasses.replace(result, **merged, config=config)
