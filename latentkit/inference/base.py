"""The engine protocol, the engine registry, option parsing and :func:`fit`."""

import contextlib
import dataclasses
import difflib
import importlib.metadata
import numbers
import typing
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np
import torch

from latentkit.errors import ConfigError
from latentkit.inference.result import Result

__all__ = ["Engine", "register_engine", "get_engine", "engine_names", "fit", "parse_options",
           "seeded"]


@runtime_checkable
class Engine(Protocol):
    """An inference engine: anything with this ``fit`` method."""

    def fit(self, model: Any, data: Any, *, seed: int, progress: bool) -> Result: ...


EngineFactory = Callable[..., Engine]
_REGISTRY: dict[str, EngineFactory] = {}


def register_engine(name: str, factory: EngineFactory) -> None:
    """Make ``lk.fit(..., engine=name, **options)`` call ``factory(**options).fit(...)``."""
    if not name or not isinstance(name, str):
        raise ConfigError(f"name: engine names are non-empty strings, got {name!r}.")
    _REGISTRY[name] = factory


def engine_names() -> list[str]:
    return sorted(_REGISTRY)


def get_engine(engine: str | Engine, **options: Any) -> Engine:
    """Resolve a registered name (with options) or pass an ``Engine`` instance through."""
    if isinstance(engine, str):
        if engine not in _REGISTRY:
            close = difflib.get_close_matches(engine, _REGISTRY, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"engine: unknown engine {engine!r}; choose one of {engine_names()}.{hint}"
            )
        return _REGISTRY[engine](**options)
    if isinstance(engine, Engine):
        if options:
            raise ConfigError(
                f"engine: options {sorted(options)} were given with an Engine instance; "
                "configure the instance instead."
            )
        return engine
    raise ConfigError(f"engine: expected a name or an Engine, got {type(engine).__name__}.")


OptionsT = TypeVar("OptionsT")


def parse_options(cls: type[OptionsT], options: Mapping[str, Any], engine: str) -> OptionsT:
    """Build the options dataclass ``cls`` from keyword options, refusing unknown names.

    Each field's ``metadata["choices"]`` (if any) restricts its value, ``metadata["min"]``
    bounds it from below.
    """
    known = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for name in options:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"{name}: not an option of engine {engine!r}.{hint} "
                f"Its options are {sorted(known)}."
            )
    hints = typing.get_type_hints(cls)
    for name, value in options.items():
        meta = known[name].metadata
        if name != "device" and not _has_type(value, hints[name]):  # a device may be a torch.device too
            raise ConfigError(f"{name}: must be {_describe(hints[name])}, got {value!r}.")
        choices = meta.get("choices")
        if choices is not None and isinstance(value, str) and value not in choices:
            flags = "True, False or " if bool in typing.get_args(hints[name]) else ""
            raise ConfigError(f"{name}: must be {flags}one of {list(choices)}, got {value!r}.")
        minimum = meta.get("min")
        if minimum is not None and isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
            if value < minimum:
                raise ConfigError(f"{name}: must be at least {minimum}, got {value!r}.")
    if options.get("device") is not None:
        _check_device(options["device"])
    return cls(**options)


_KINDS = {bool: "True or False", int: "an integer", float: "a number", str: "a string", type(None): "None"}


def _has_type(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits an option's annotation (NumPy scalars count as Python ones, a bool
    is no number: ``dense_mass="no"`` or ``num_chains=True`` would otherwise pass unnoticed)."""
    if typing.get_args(hint):  # a union
        return any(_has_type(value, part) for part in typing.get_args(hint))
    is_bool = isinstance(value, (bool, np.bool_))
    if hint is bool:
        return is_bool
    if hint is int:
        return isinstance(value, numbers.Integral) and not is_bool
    if hint is float:
        return isinstance(value, numbers.Real) and not is_bool
    if hint in (str, type(None)):
        return isinstance(value, hint)
    return True  # Any, or a type checked by the engine itself


def _describe(hint: Any) -> str:
    parts = typing.get_args(hint) or (hint,)
    return " or ".join(_KINDS.get(part, getattr(part, "__name__", str(part))) for part in parts)


def _check_device(device: str | torch.device) -> None:
    """Refuse a device that this PyTorch cannot use, before any work (PyTorch's own error comes
    later and from deep inside, e.g. an ``AssertionError`` when a CPU-only build is asked for CUDA)."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ConfigError(f"device: {device!r} is not a device ({error}); pass e.g. 'cpu' or 'cuda:0'.") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"device: {device!r}, but this PyTorch sees no CUDA GPU (a CPU-only build, or no "
                              "driver); pass device='cpu' or leave it out.")
        if parsed.index is not None and parsed.index >= count:
            raise ConfigError(f"device: {device!r}, but this machine has {count} CUDA GPU(s), 'cuda:0' to "
                              f"'cuda:{count - 1}'.")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device: {device!r}, but MPS is not available here; pass device='cpu' or leave it out.")


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | str | None = None) -> Iterator[None]:
    """Seed torch inside the block and restore the caller's random state afterwards."""
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"seed: must be a non-negative integer, got {seed!r}.")
    devices = []
    if device is not None and torch.device(device).type == "cuda":
        devices = [torch.device(device).index or 0]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def versions() -> dict[str, str]:
    """Versions of the packages a result depends on, for ``config.json``."""
    out = {}
    for package in ("latentkit", "torch", "pyro-ppl", "arviz", "numpy"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = "unknown"
    return out


def fit(
    model: Any,
    data: Any = None,
    engine: str | Engine = "nuts",
    *,
    seed: int = 0,
    progress: bool = True,
    device: str | torch.device | None = None,
    out: str | Path | None = None,
    resume: str | Path | None = None,
    distributed: bool = False,
    **options: Any,
) -> Result:
    """Fit a model with any engine.

    Args:
        model: a built-in :class:`~latentkit.models.LatentModel` or a plain Pyro function.
        data: for built-in models their data (array, DataFrame, ...); for a plain function a
            dict of its keyword arguments (observed sites are those with ``obs=``).
        engine: ``"nuts"``, ``"hmc"``, ``"svi"``, ``"pyro-nuts"``, any registered name, or
            an :class:`Engine` instance.
        seed: makes a CPU run repeat exactly; the caller's random state is left untouched.
        progress: show a progress bar.
        device: e.g. ``"cuda"``; model and data are moved there.
        out: a run folder: the result is saved there; SVI also writes checkpoints there
            (options ``checkpoint_every``, ``checkpoint_seconds``). While the fit runs, SIGINT and
            SIGTERM stop it after the current step (SVI: checkpoint; MCMC: the draws so far are
            kept as a partial run) and raise :class:`~latentkit.interrupt.RunStopped`.
        resume: the run folder of an interrupted SVI fit: continue from its checkpoint (same
            model, data, seed and options); it ends as the uninterrupted run would have.
        distributed: run on the processes started by ``torchrun``: data-parallel SVI, or MCMC
            chains spread across ranks; only rank 0 writes ``out``.
        **options: engine options (see ``latentkit.inference.SVIOptions`` / ``MCMCOptions``);
            an unknown name raises :class:`~latentkit.errors.ConfigError`.

    Example:
        >>> import latentkit as lk, numpy as np
        >>> X = np.random.default_rng(0).normal(size=(60, 2))
        >>> res = lk.fit(lk.models.GaussianMixture(n_components=1), X, engine="svi",
        ...              steps=50, num_samples=20, progress=False)
        >>> res.posterior["locs"].shape
        (1, 20, 1, 2)
    """
    if device is not None:
        options["device"] = str(device)
    resolved = get_engine(engine, **options)
    if out is None and resume is None and not distributed:
        return resolved.fit(model, data, seed=seed, progress=progress)
    from latentkit.runs import fit_in_folder

    return fit_in_folder(resolved, model, data, seed=seed, progress=progress, out=out, resume=resume,
                         distributed=distributed)
