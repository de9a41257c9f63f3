"""MADE: masked autoencoder for distribution estimation (Germain et al. 2015), with a
conditioning input."""

from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import torch
from torch import nn

from latentkit.errors import ConfigError
from latentkit.nn.autoregressive import PARAMS_PER_DIM, AutoregressiveDistribution
from latentkit.nn.mlp import activation_module, check_sizes

__all__ = ["MADE", "MaskedLinear"]


class MaskedLinear(nn.Linear):
    """``nn.Linear`` whose weight is multiplied by a fixed 0/1 ``mask`` of shape (out, in).

    Shapes:
        input ``(..., in_features)`` → output ``(..., out_features)``.
    """

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__(mask.shape[1], mask.shape[0])
        self.register_buffer("mask", mask.to(self.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight * self.mask, self.bias)


class MADE(nn.Module):
    """Autoregressive network: output ``i`` depends only on inputs earlier than ``i`` in the ordering.

    Hidden unit ``k`` of each layer gets a degree ``m(k)`` in ``1 .. D-1`` (cyclically, so the
    masks are deterministic); it sees the inputs and previous units of degree ``<= m(k)``, and
    the output of the dimension at position ``p`` of the ordering sees units of degree ``< p``.
    An optional context vector (e.g. a VAE's ``z``) feeds every unit of the first hidden layer
    and every output.

    Args:
        input_dim: ``D``.
        hidden: sizes of the hidden layers (each at least ``D - 1`` to keep every dependency).
        context_dim: size of the conditioning input (0: none).
        ordering: ``"natural"`` (default), ``"reverse"``, ``"random"`` (a permutation drawn with
            ``seed``), or an explicit permutation of ``range(D)``: the order in which dimensions
            are generated.
        likelihood: ``"bernoulli"`` (binary data) or ``"gaussian"`` (real data).
        activation: as in :class:`~latentkit.nn.MLP`.
        seed: seed of the random ordering.

    Shapes:
        ``forward(x, context)``: x ``(..., D)``, context ``(..., context_dim)`` (leading
        dimensions broadcast) → logits ``(..., D)`` (Bernoulli) or ``(..., 2, D)`` (Gaussian:
        mean and log scale).
        ``distribution(context)``: an :class:`~latentkit.nn.AutoregressiveDistribution` with ``batch_shape`` =
        ``context.shape[:-1]`` and ``event_shape`` = ``(D,)``.

    Example:
        >>> made = MADE(3, hidden=(8,), ordering="reverse")
        >>> d = made.distribution(batch_shape=(5,))
        >>> d.sample().shape, d.log_prob(torch.ones(5, 3)).shape
        (torch.Size([5, 3]), torch.Size([5]))
    """

    def __init__(self, input_dim: int, hidden: Sequence[int] = (64,), context_dim: int = 0,
                 ordering: Literal["natural", "reverse", "random"] | Sequence[int] = "natural",
                 likelihood: Literal["bernoulli", "gaussian"] = "bernoulli",
                 activation: str | Callable[[], nn.Module] = "relu", seed: int = 0) -> None:
        super().__init__()
        (D,) = check_sizes("input_dim", [input_dim])
        hidden = check_sizes("hidden", hidden, minimum=0)
        if not isinstance(context_dim, int) or context_dim < 0:
            raise ConfigError(f"context_dim: must be an integer >= 0, got {context_dim!r}.")
        if likelihood not in PARAMS_PER_DIM:
            raise ConfigError(f"likelihood: must be one of {sorted(PARAMS_PER_DIM)}, got {likelihood!r}.")
        if isinstance(ordering, str):
            if ordering == "natural":
                order = torch.arange(D)
            elif ordering == "reverse":
                order = torch.arange(D).flip(0)
            elif ordering == "random":
                order = torch.randperm(D, generator=torch.Generator().manual_seed(seed))
            else:
                raise ConfigError(f"ordering: must be 'natural', 'reverse', 'random' or a permutation, "
                                  f"got {ordering!r}.")
        else:
            order = torch.as_tensor(list(ordering), dtype=torch.long)
            if sorted(order.tolist()) != list(range(D)):
                raise ConfigError(f"ordering: must be a permutation of range({D}), got {list(ordering)!r}.")
        self.input_dim, self.context_dim, self.likelihood = D, context_dim, likelihood
        self.event_shape = (D,)
        self.params_per_dim = PARAMS_PER_DIM[likelihood]
        self.register_buffer("order", order)  # order[p] = the dimension generated at position p
        degree_in = torch.empty(D, dtype=torch.long)
        degree_in[order] = torch.arange(1, D + 1)  # position (1-based) of each dimension
        self.register_buffer("degrees", degree_in)
        layers = []
        previous = degree_in
        for size in hidden:
            degree = torch.arange(size) % max(D - 1, 1) + min(1, D - 1)
            layers.append(MaskedLinear((degree[:, None] >= previous[None, :]).long()))
            previous = degree
        out_degree = degree_in.repeat(self.params_per_dim)
        self.hidden_layers = nn.ModuleList(layers)
        self.output_layer = MaskedLinear((out_degree[:, None] > previous[None, :]).long())
        # The context feeds the first hidden layer and, directly, the outputs: the first
        # dimension in the ordering sees no hidden unit (all have degree >= 1).
        self.context_layer = nn.Linear(context_dim, hidden[0], bias=False) if context_dim and hidden else None
        self.context_output = nn.Linear(context_dim, self.params_per_dim * D, bias=False) if context_dim else None
        self.activation = activation_module(activation)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if (context is None) != (self.context_dim == 0):
            raise ConfigError(f"context: this MADE takes a context of size {self.context_dim}, "
                              f"got {None if context is None else tuple(context.shape)}.")
        h = x
        for i, layer in enumerate(self.hidden_layers):
            h = layer(h)
            if i == 0 and self.context_layer is not None:
                h = h + self.context_layer(context)
            h = self.activation(h)
        h = self.output_layer(h)
        if self.context_output is not None:
            h = h + self.context_output(context)
        if self.params_per_dim == 1:
            return h
        return h.reshape(h.shape[:-1] + (self.params_per_dim, self.input_dim))

    def positions(self) -> Iterator[tuple[int]]:
        """Dimensions in generation order (for sampling)."""
        for dim in self.order.tolist():
            yield (dim,)

    def distribution(self, context: torch.Tensor | None = None, batch_shape: Sequence[int] = (),
                     validate_args: bool | None = None) -> AutoregressiveDistribution:
        """The distribution of x given ``context`` (``batch_shape`` only without context)."""
        return AutoregressiveDistribution(self, context, batch_shape=batch_shape, validate_args=validate_args)
