"""Initial values for latent sites, usable as Pyro ``init_loc_fn`` strategies."""

from collections.abc import Callable, Mapping
from typing import Any

import torch
from pyro.distributions.transforms import biject_to
from pyro.infer.autoguide.initialization import init_to_median

__all__ = ["init_to_unconstrained_uniform", "init_with_values"]

InitFn = Callable[[dict[str, Any]], torch.Tensor]


def init_to_unconstrained_uniform(radius: float = 2.0) -> InitFn:
    """Uniform(-radius, radius) in unconstrained space, as Stan initialises.

    Unlike Pyro's ``init_to_uniform`` this never samples the site's distribution, so it also
    works for ``ImproperUniform`` sites.
    """

    def init(site: dict[str, Any]) -> torch.Tensor:
        fn = site["fn"]
        if fn.support.is_discrete:
            return fn.sample().detach()
        transform = biject_to(fn.support)
        shape = transform.inverse_shape(fn.shape())
        proto = torch.zeros(shape, dtype=torch.get_default_dtype())
        if isinstance(site.get("value"), torch.Tensor):
            proto = proto.to(site["value"])
        u = (torch.rand(shape, dtype=proto.dtype, device=proto.device) * 2 - 1) * radius
        return transform(u).detach()

    return init


def init_with_values(values: Mapping[str, torch.Tensor], fallback: str = "uniform") -> InitFn:
    """Given values where known; elsewhere ``fallback`` ("uniform" or "median")."""
    uniform = init_to_unconstrained_uniform()

    def init(site: dict[str, Any]) -> torch.Tensor:
        if site["name"] in values:
            return values[site["name"]]
        if fallback == "median":
            try:
                return init_to_median(site)
            except (NotImplementedError, ValueError, RuntimeError):  # ImproperUniform and friends cannot
                return uniform(site)  # be sampled, so they start where the uniform initialisation puts them
        return uniform(site)

    return init
