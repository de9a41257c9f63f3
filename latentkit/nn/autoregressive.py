"""The distribution defined by an autoregressive network (MADE, PixelCNN)."""

from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import pyro.distributions as dist
import torch
from pyro.distributions import constraints

from latentkit.errors import ConfigError

__all__ = ["AutoregressiveNetwork", "AutoregressiveDistribution", "PARAMS_PER_DIM"]

#: Parameters per dimension of each conditional: Bernoulli logit; Gaussian mean and log scale.
PARAMS_PER_DIM = {"bernoulli": 1, "gaussian": 2}


class AutoregressiveNetwork(Protocol):
    """What :class:`AutoregressiveDistribution` needs of a network.

    ``net(x, context)`` maps x ``(..., *event_shape)`` to the conditionals' parameters,
    ``(..., *event_shape)`` (Bernoulli logits) or ``(..., 2, *event_shape)`` (Gaussian mean and log
    scale), where the parameters at a position depend only on earlier positions of
    :meth:`positions`.
    """

    event_shape: tuple[int, ...]
    context_dim: int
    likelihood: str

    def __call__(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor: ...

    def positions(self) -> Iterator[tuple[Any, ...]]: ...


class AutoregressiveDistribution(dist.TorchDistribution):
    """p(x | context) = prod_p p(x_p | x_<p, context), from an autoregressive network.

    ``log_prob`` takes one network pass; ``sample`` takes one pass per position, in the network's
    order (:meth:`AutoregressiveNetwork.positions`).

    Shapes:
        ``batch_shape`` = ``context.shape[:-1]`` (or the given ``batch_shape`` without context),
        ``event_shape`` = the network's ``event_shape``; ``log_prob(x)`` broadcasts
        x ``(..., *event_shape)`` with the batch.
    """

    arg_constraints: dict[str, Any] = {}
    has_rsample = False

    def __init__(self, net: AutoregressiveNetwork, context: torch.Tensor | None = None,
                 batch_shape: Sequence[int] = (), validate_args: bool | None = None) -> None:
        if (context is None) != (net.context_dim == 0):
            raise ConfigError(f"context: this {type(net).__name__} takes a context of size {net.context_dim}, "
                              f"got {None if context is None else tuple(context.shape)}.")
        self.net, self.context = net, context
        shape = torch.Size(context.shape[:-1]) if context is not None else torch.Size(batch_shape)
        super().__init__(shape, torch.Size(net.event_shape), validate_args=validate_args)

    @property
    def support(self) -> constraints.Constraint:
        base = constraints.boolean if self.net.likelihood == "bernoulli" else constraints.real
        return constraints.independent(base, len(self.event_shape))

    def _conditionals(self, params: torch.Tensor) -> torch.distributions.Distribution:
        if self.net.likelihood == "bernoulli":
            return torch.distributions.Bernoulli(logits=params, validate_args=False)
        rank = len(self.event_shape)
        loc, log_scale = params.select(-1 - rank, 0), params.select(-1 - rank, 1)
        return torch.distributions.Normal(loc, log_scale.exp(), validate_args=False)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        log_p = self._conditionals(self.net(value, self.context)).log_prob(value)
        return log_p.sum(tuple(range(-len(self.event_shape), 0)))

    def sample(self, sample_shape: Sequence[int] = ()) -> torch.Tensor:
        shape = torch.Size(sample_shape) + self.batch_shape
        reference = self.context if self.context is not None else next(self.net.parameters())
        x = torch.zeros(shape + self.event_shape, dtype=reference.dtype, device=reference.device)
        context = None if self.context is None else self.context.expand(shape + self.context.shape[-1:])
        with torch.no_grad():
            for position in self.net.positions():
                index = (Ellipsis, *position)
                x[index] = self._conditionals(self.net(x, context)).sample()[index]
        return x

    def expand(self, batch_shape: Sequence[int], _instance: Any = None) -> "AutoregressiveDistribution":
        batch_shape = torch.Size(batch_shape)
        context = None if self.context is None else self.context.expand(batch_shape + self.context.shape[-1:])
        return AutoregressiveDistribution(self.net, context, batch_shape=batch_shape,
                                          validate_args=self._validate_args)
