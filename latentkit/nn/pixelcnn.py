"""PixelCNN-style decoder: masked convolutions over pixels in raster order (van den Oord et al. 2016),
optionally conditioned on a vector (e.g. a VAE's z)."""

from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import torch
from torch import nn

from latentkit.errors import ConfigError
from latentkit.nn.autoregressive import PARAMS_PER_DIM, AutoregressiveDistribution
from latentkit.nn.mlp import activation_module, check_sizes

__all__ = ["MaskedConv2d", "PixelCNN"]


class MaskedConv2d(nn.Conv2d):
    """A same-size 2-D convolution that sees only earlier pixels in raster order.

    Type ``"A"`` (first layer) excludes the centre pixel, type ``"B"`` (later layers) includes it:
    the kernel is zero below the centre row and right of (A: at) the centre in its row.

    Shapes:
        input ``(B, in_channels, H, W)`` → output ``(B, out_channels, H, W)``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, mask_type: Literal["A", "B"]) -> None:
        if kernel_size % 2 != 1:
            raise ConfigError(f"kernel_size: must be odd, got {kernel_size!r}.")
        if mask_type not in ("A", "B"):
            raise ConfigError(f"mask_type: must be 'A' or 'B', got {mask_type!r}.")
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        mask = torch.ones_like(self.weight)
        centre = kernel_size // 2
        mask[:, :, centre, centre + (mask_type == "B"):] = 0
        mask[:, :, centre + 1:, :] = 0
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight * self.mask, self.bias)


class PixelCNN(nn.Module):
    """Autoregressive image model: pixel (i, j) depends on the pixels before it in raster order.

    One type-A masked convolution, ``num_layers`` type-B ones with an activation between them,
    and a 1x1 output convolution. An optional context vector adds a learned per-channel bias to
    every layer (as in the conditional PixelCNN). The channels of one pixel are independent given
    the earlier pixels and the context.

    Args:
        input_shape: ``(C, H, W)``.
        channels: feature channels of the hidden layers.
        num_layers: number of type-B layers after the first.
        kernel_size: odd kernel size.
        context_dim: size of the conditioning input (0: none).
        likelihood: ``"bernoulli"`` (binary images) or ``"gaussian"``.
        activation: as in :class:`~latentkit.nn.MLP`.

    Shapes:
        ``forward(x, context)``: x ``(..., C, H, W)``, context ``(..., context_dim)`` (leading
        dimensions broadcast) → logits ``(..., C, H, W)`` (Bernoulli) or ``(..., 2, C, H, W)``
        (Gaussian: mean and log scale).
        ``distribution(context)``: an :class:`~latentkit.nn.AutoregressiveDistribution` with
        ``event_shape`` = ``(C, H, W)``; ``sample`` takes ``H * W`` passes.

    Example:
        >>> net = PixelCNN((1, 4, 4), channels=8, num_layers=1, context_dim=2)
        >>> d = net.distribution(torch.zeros(3, 2))
        >>> d.sample().shape, d.log_prob(torch.ones(3, 1, 4, 4)).shape
        (torch.Size([3, 1, 4, 4]), torch.Size([3]))
    """

    def __init__(self, input_shape: Sequence[int], channels: int = 32, num_layers: int = 2, kernel_size: int = 3,
                 context_dim: int = 0, likelihood: Literal["bernoulli", "gaussian"] = "bernoulli",
                 activation: str | Callable[[], nn.Module] = "relu") -> None:
        super().__init__()
        shape = tuple(check_sizes("input_shape", input_shape))
        if len(shape) != 3:
            raise ConfigError(f"input_shape: must be (channels, height, width), got {shape!r}.")
        (channels,) = check_sizes("channels", [channels])
        if not isinstance(num_layers, int) or num_layers < 0:
            raise ConfigError(f"num_layers: must be an integer >= 0, got {num_layers!r}.")
        if not isinstance(context_dim, int) or context_dim < 0:
            raise ConfigError(f"context_dim: must be an integer >= 0, got {context_dim!r}.")
        if likelihood not in PARAMS_PER_DIM:
            raise ConfigError(f"likelihood: must be one of {sorted(PARAMS_PER_DIM)}, got {likelihood!r}.")
        self.event_shape: tuple[int, ...] = shape
        self.context_dim, self.likelihood = context_dim, likelihood
        self.params_per_dim = PARAMS_PER_DIM[likelihood]
        C = shape[0]
        self.layers = nn.ModuleList([MaskedConv2d(C, channels, kernel_size, "A")] + [
            MaskedConv2d(channels, channels, kernel_size, "B") for _ in range(num_layers)])
        self.output_layer = nn.Conv2d(channels, self.params_per_dim * C, 1)
        # Per-channel biases from the context, for every layer and the output (the first pixel
        # sees no other pixel, only these).
        self.context_layers = nn.ModuleList(
            [nn.Linear(context_dim, channels, bias=False) for _ in self.layers]
            + [nn.Linear(context_dim, self.params_per_dim * C, bias=False)]) if context_dim else None
        self.activation = activation_module(activation)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if (context is None) != (self.context_dim == 0):
            raise ConfigError(f"context: this PixelCNN takes a context of size {self.context_dim}, "
                              f"got {None if context is None else tuple(context.shape)}.")
        batch = x.shape[:-3]
        if context is not None:
            batch = torch.broadcast_shapes(batch, context.shape[:-1])
            context = context.expand(batch + context.shape[-1:]).reshape(-1, self.context_dim)
        h = x.expand(batch + x.shape[-3:]).reshape((-1,) + tuple(x.shape[-3:]))
        layers = [*self.layers, self.output_layer]
        for i, layer in enumerate(layers):
            h = layer(h)
            if self.context_layers is not None:
                h = h + self.context_layers[i](context)[:, :, None, None]
            if i < len(layers) - 1:
                h = self.activation(h)
        if self.params_per_dim > 1:
            return h.reshape(batch + (self.params_per_dim,) + self.event_shape)
        return h.reshape(batch + self.event_shape)

    def positions(self) -> Iterator[tuple[slice, int, int]]:
        """Pixels in raster order, all channels at once (for sampling)."""
        _, H, W = self.event_shape
        for i in range(H):
            for j in range(W):
                yield (slice(None), i, j)

    def distribution(self, context: torch.Tensor | None = None, batch_shape: Sequence[int] = (),
                     validate_args: bool | None = None) -> AutoregressiveDistribution:
        """The distribution of images given ``context`` (``batch_shape`` only without context)."""
        return AutoregressiveDistribution(self, context, batch_shape=batch_shape, validate_args=validate_args)
