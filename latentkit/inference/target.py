"""What an engine needs to know about a model: its sites, shapes, plates and data.

A :class:`Target` is built once per fit from one trace of the model on the user's data. Engines
never look at the user's model object, only at the target, so built-in models and plain Pyro
functions are fitted by the same code.
"""

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer.autoguide.initialization import InitMessenger
from pyro.poutine.util import prune_subsample_sites

from latentkit.data import as_model_kwargs
from latentkit.errors import ConfigError, DataError, InferenceError, LatentkitError
from latentkit.inference.initialization import init_to_unconstrained_uniform

__all__ = ["Site", "Target", "make_target"]

SiteKind = Literal["latent", "discrete", "observed", "deterministic", "factor"]


@dataclass(frozen=True)
class Site:
    """One sample site of the model as seen in the prototype trace.

    Shapes:
        ``shape`` = ``batch_shape + event_shape`` of the site's value in one model run.
        ``dims`` names each of those dimensions (plate names for plate dimensions).
    """

    name: str
    kind: SiteKind
    batch_shape: tuple[int, ...]
    event_shape: tuple[int, ...]
    dims: tuple[str, ...]
    support: Any = None
    is_enumerated: bool = False

    @property
    def shape(self) -> tuple[int, ...]:
        return self.batch_shape + self.event_shape


@dataclass(frozen=True)
class Target:
    """A model bound to its data.

    Attributes:
        fn: the Pyro model, called as ``fn(**kwargs)``.
        kwargs: its keyword arguments (tensors already on the fit's device).
        sites: every sample site in execution order.
        max_plate_nesting: number of batch dimensions reserved for plates (and site batch
            shapes), so that extra dimensions (draws, chains, enumeration) go to the left.
        observed: the observed values by site name.
    """

    fn: Callable[..., Any]
    kwargs: dict[str, Any]
    sites: dict[str, Site]
    max_plate_nesting: int
    observed: dict[str, torch.Tensor]
    coords: dict[str, list[Any]] = field(default_factory=dict)

    def of_kind(self, *kinds: SiteKind) -> dict[str, Site]:
        return {name: site for name, site in self.sites.items() if site.kind in kinds}

    @property
    def has_enumeration(self) -> bool:
        return any(site.is_enumerated for site in self.sites.values())


def _site_kind(site: dict[str, Any]) -> SiteKind:
    if site["infer"].get("_deterministic"):
        return "deterministic"
    if isinstance(site["fn"], dist.Unit):
        return "factor"
    if site["is_observed"]:
        return "observed"
    if site["fn"].support.is_discrete:
        return "discrete"
    return "latent"


def _site_dims(site: dict[str, Any], value_shape: torch.Size, event_dim: int) -> tuple[str, ...]:
    batch_rank = len(value_shape) - event_dim
    plate_names = {f.dim: f.name for f in site["cond_indep_stack"] if f.vectorized}
    dims = []
    for position in range(batch_rank):
        dim = position - batch_rank
        dims.append(plate_names.get(dim, f"{site['name']}_dim_{position}"))
    dims += [f"{site['name']}_event_{i}" for i in range(event_dim)]
    return tuple(dims)


def _signature_hint(fn: Callable[..., Any]) -> str:
    try:
        return f"{getattr(fn, '__name__', 'model')}{inspect.signature(fn)}"
    except (TypeError, ValueError):
        return getattr(fn, "__name__", "model")


def trace_model(fn: Callable[..., Any], kwargs: Mapping[str, Any]) -> poutine.Trace:
    """Run the model once and return its trace, turning its exceptions into latentkit errors."""
    try:
        with torch.no_grad():
            # Latent values come from Uniform(-2, 2) in unconstrained space, so that sites which
            # cannot be sampled (ImproperUniform) still trace.
            model = InitMessenger(init_to_unconstrained_uniform())(fn)
            return prune_subsample_sites(poutine.trace(model).get_trace(**kwargs))
    except LatentkitError:
        raise
    except TypeError as error:
        raise DataError(
            f"data: the model could not be called with keyword arguments {sorted(kwargs)} "
            f"({error}); the data keys must match the signature {_signature_hint(fn)}."
        ) from error
    except Exception as error:  # noqa: BLE001 - any failure of user code is reported as such
        raise InferenceError(
            f"model: raised {type(error).__name__}: {error} when run on the given data; "
            "check the data shapes against the model's plates and distributions."
        ) from error


def make_target(
    fn: Callable[..., Any],
    kwargs: Mapping[str, Any],
    *,
    dims: Mapping[str, tuple[str, ...]] | None = None,
    coords: Mapping[str, list[Any]] | None = None,
) -> Target:
    """Trace ``fn(**kwargs)`` once and describe its sites.

    Args:
        fn: a Pyro model.
        kwargs: keyword arguments of ``fn``, already converted (see :mod:`latentkit.data`).
        dims: optional dimension names per site overriding the names derived from plates.
        coords: optional coordinate values per dimension name.

    Raises:
        ConfigError: a discrete latent site not marked for enumeration, or no latent site.
        DataError / InferenceError: the model cannot run on the data.
    """
    with pyro.validation_enabled(True):
        trace = trace_model(fn, kwargs)
    sites: dict[str, Site] = {}
    observed: dict[str, torch.Tensor] = {}
    nesting = 0
    dims = dict(dims or {})
    for name, node in trace.nodes.items():
        if node["type"] != "sample" or name.startswith("_"):
            continue
        kind = _site_kind(node)
        enumerated = node["infer"].get("enumerate") == "parallel"
        if kind == "discrete" and not enumerated:
            raise ConfigError(
                f"model: site {name!r} is a discrete latent variable but is not marked for "
                "enumeration; add infer={'enumerate': 'parallel'} to its pyro.sample call "
                "so every engine can sum it out."
            )
        value = node["value"]
        event_dim = node["fn"].event_dim
        if kind == "deterministic":
            # pyro.deterministic defaults to event_dim = value.dim(); dims that belong to
            # enclosing plates are batch dims all the same.
            plate_rank = max((-f.dim for f in node["cond_indep_stack"] if f.vectorized), default=0)
            event_dim = min(event_dim, max(value.dim() - plate_rank, 0))
        shape = value.shape
        batch_shape = tuple(shape[: len(shape) - event_dim])
        for frame in node["cond_indep_stack"]:
            if frame.vectorized:
                nesting = max(nesting, -frame.dim)
        if kind != "factor":
            nesting = max(nesting, len(batch_shape))
        sites[name] = Site(
            name=name,
            kind=kind,
            batch_shape=batch_shape,
            event_shape=tuple(shape[len(shape) - event_dim:]),
            dims=tuple(dims.get(name) or _site_dims(node, shape, event_dim)),
            support=node["fn"].support if kind == "latent" else None,
            is_enumerated=enumerated,
        )
        if kind == "observed":
            observed[name] = value.detach()
    if not any(site.kind in ("latent", "discrete") for site in sites.values()):
        raise ConfigError(
            "model: has no latent sample site to infer; add a pyro.sample site without obs=."
        )
    return Target(
        fn=fn,
        kwargs=dict(kwargs),
        sites=sites,
        max_plate_nesting=nesting,
        observed=observed,
        coords=dict(coords or {}),
    )


def model_config(model: Any) -> dict[str, Any]:
    """How ``config.json`` names the model: a built-in's class and arguments, or a function."""
    if hasattr(model, "config") and hasattr(model, "prepare"):
        return model.config()
    name = getattr(model, "__name__", type(model).__name__)
    return {"name": name, "function": f"{getattr(model, '__module__', '?')}:{getattr(model, '__qualname__', name)}"}


def bind(model: Any, data: Any, device: str | None = None, **model_kwargs: Any) -> Target:
    """Bind a built-in model or a plain Pyro function to its data.

    Args:
        model: a :class:`~latentkit.models.LatentModel` or a callable Pyro model.
        data: the built-in model's data, or the function's keyword arguments as a dict.
        device: device for the model's parameters and the data.
        **model_kwargs: extra keyword arguments passed to the model (e.g. ``subsample_size``).
    """
    if hasattr(model, "prepare") and hasattr(model, "model"):
        if device is not None:
            model.to(device)
        kwargs = model.prepare(data)
        if device is not None:
            kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        kwargs.update(model_kwargs)
        return make_target(model.model, kwargs, dims=model.dims(kwargs), coords=model.coords(data))
    if not callable(model):
        raise ConfigError(
            f"model: expected a latentkit model or a Pyro function, got {type(model).__name__}."
        )
    kwargs = as_model_kwargs(data, device=device)
    kwargs.update(model_kwargs)
    return make_target(model, kwargs)
