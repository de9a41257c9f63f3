"""Convolutional encoder and decoder for small images."""

from collections.abc import Callable, Sequence

import torch
from torch import nn

from latentkit.errors import ConfigError
from latentkit.nn.mlp import activation_module, check_sizes

__all__ = ["ConvEncoder", "ConvDecoder"]


def _image_shape(name: str, shape: Sequence[int], halvings: int) -> tuple[int, int, int]:
    shape = tuple(check_sizes(name, shape))
    if len(shape) != 3:
        raise ConfigError(f"{name}: must be (channels, height, width), got {shape!r}.")
    factor = 2 ** halvings
    if shape[1] % factor or shape[2] % factor:
        raise ConfigError(f"{name}: height and width must be divisible by 2**len(channels) = {factor} "
                          f"(each layer halves them), got {shape[1:]}; use fewer channels entries.")
    return shape  # type: ignore[return-value]


class ConvEncoder(nn.Module):
    """Strided convolutions (each halving height and width) followed by a linear layer.

    Args:
        input_shape: ``(C, H, W)``; ``H`` and ``W`` divisible by ``2 ** len(channels)``.
        out_features: size of the output vector (for a VAE encoder: ``2 * latent_dim``).
        channels: output channels of each convolution, e.g. ``(32, 64)``.
        activation: as in :class:`~latentkit.nn.MLP`.

    Shapes:
        input ``(..., C, H, W)`` → output ``(..., out_features)``.

    Example:
        >>> ConvEncoder((1, 8, 8), 6, channels=(4, 8))(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 6])
    """

    def __init__(self, input_shape: Sequence[int], out_features: int, channels: Sequence[int] = (32, 64),
                 activation: str | Callable[[], nn.Module] = "relu") -> None:
        super().__init__()
        channels = check_sizes("channels", channels)
        self.input_shape = _image_shape("input_shape", input_shape, len(channels))
        (out_features,) = check_sizes("out_features", [out_features])
        layers: list[nn.Module] = []
        previous = self.input_shape[0]
        for c in channels:
            layers += [nn.Conv2d(previous, c, kernel_size=4, stride=2, padding=1), activation_module(activation)]
            previous = c
        self.features = nn.Sequential(*layers)
        scale = 2 ** len(channels)
        self.head = nn.Linear(previous * (self.input_shape[1] // scale) * (self.input_shape[2] // scale), out_features)
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[:-3]
        h = self.features(x.reshape((-1,) + tuple(x.shape[-3:])))
        return self.head(h.flatten(1)).reshape(batch + (self.out_features,))


class ConvDecoder(nn.Module):
    """A linear layer to a small feature map, then transposed convolutions each doubling it.

    Args:
        in_features: size of the input vector (for a VAE decoder: ``latent_dim``).
        output_shape: ``(C, H, W)``; ``H`` and ``W`` divisible by ``2 ** len(channels)``.
        channels: input channels of each transposed convolution, e.g. ``(64, 32)``; the last
            one maps to ``C`` channels.
        activation: as in :class:`~latentkit.nn.MLP` (none after the last layer: the output is
            unconstrained, e.g. Bernoulli logits or Gaussian means).

    Shapes:
        input ``(..., in_features)`` → output ``(..., C, H, W)``.

    Example:
        >>> ConvDecoder(3, (1, 8, 8), channels=(8, 4))(torch.zeros(2, 3)).shape
        torch.Size([2, 1, 8, 8])
    """

    def __init__(self, in_features: int, output_shape: Sequence[int], channels: Sequence[int] = (64, 32),
                 activation: str | Callable[[], nn.Module] = "relu") -> None:
        super().__init__()
        channels = check_sizes("channels", channels)
        self.output_shape = _image_shape("output_shape", output_shape, len(channels))
        (in_features,) = check_sizes("in_features", [in_features])
        scale = 2 ** len(channels)
        self.start = (channels[0], self.output_shape[1] // scale, self.output_shape[2] // scale)
        self.head = nn.Sequential(nn.Linear(in_features, channels[0] * self.start[1] * self.start[2]),
                                  activation_module(activation))
        layers: list[nn.Module] = []
        targets = list(channels[1:]) + [self.output_shape[0]]
        for i, (a, b) in enumerate(zip(channels, targets, strict=True)):
            layers.append(nn.ConvTranspose2d(a, b, kernel_size=4, stride=2, padding=1))
            if i < len(channels) - 1:
                layers.append(activation_module(activation))
        self.features = nn.Sequential(*layers)
        self.in_features = in_features

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        batch = z.shape[:-1]
        h = self.head(z.reshape(-1, self.in_features)).reshape((-1,) + self.start)
        return self.features(h).reshape(batch + self.output_shape)
