"""Generator and discriminator networks, with optional spectral normalisation: MLPs for vectors
(:class:`Generator`, :class:`Discriminator`) and DCGAN-style convolutional networks for small images
(:class:`ConvGenerator`, :class:`ConvDiscriminator`, Radford et al. 2016). All four take the same
arguments where they apply (``latent_dim``, ``output_shape`` / ``input_shape``, ``activation``,
``output_activation``, ``spectral_norm``) and map ``(..., latent_dim)`` to ``(..., *output_shape)`` and
``(..., *input_shape)`` to one score (a logit) per point, ``(...,)``."""

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

from latentkit.errors import DataError
from latentkit.nn.conv import ConvDecoder, ConvEncoder
from latentkit.nn.mlp import MLP, activation_module, check_sizes

__all__ = ["Generator", "Discriminator", "ConvGenerator", "ConvDiscriminator"]


def _shape(name: str, shape: int | Sequence[int]) -> tuple[int, ...]:
    return tuple(check_sizes(name, [shape] if isinstance(shape, int) else shape))


NormT = TypeVar("NormT", bound=nn.Module)


def _normalised(net: NormT, spectral_norm: bool) -> NormT:
    """Spectral normalisation (Miyato et al. 2018) of every linear and (transposed) convolution layer, in
    place: weights divided by their largest singular value, estimated by one power iteration per forward
    pass in training mode."""
    if spectral_norm:
        for layer in net.modules():
            if isinstance(layer, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
                _spectral_norm(layer)
    return net


def _leaky_relu() -> nn.Module:
    """LeakyReLU with slope 0.2, the DCGAN discriminator's activation (Radford et al. 2016)."""
    return nn.LeakyReLU(0.2)


class Generator(nn.Module):
    """MLP generator: latent ``z`` to a point of shape ``output_shape``.

    Args:
        latent_dim: size of z (kept as the attribute ``latent_dim``, which :class:`~latentkit.models.GANPrior`
            reads).
        output_shape: the shape of one output point (an int for vectors).
        hidden: hidden layer sizes.
        activation: between layers (a name from :data:`latentkit.nn.mlp.ACTIVATIONS` or a module class).
        output_activation: after the last layer, e.g. ``"tanh"`` for data scaled to [-1, 1]; default none.
        spectral_norm: spectrally normalise every linear layer.

    Shapes:
        input ``(..., latent_dim)`` → output ``(..., *output_shape)``.

    Example:
        >>> Generator(2, (1, 8, 8), hidden=(16,))(torch.zeros(5, 2)).shape
        torch.Size([5, 1, 8, 8])
    """

    def __init__(self, latent_dim: int, output_shape: int | Sequence[int], hidden: Sequence[int] = (128, 128),
                 activation: str | Callable[[], nn.Module] = "relu",
                 output_activation: str | Callable[[], nn.Module] | None = None, spectral_norm: bool = False) -> None:
        super().__init__()
        self.latent_dim = check_sizes("latent_dim", [latent_dim])[0]
        self.output_shape = _shape("output_shape", output_shape)
        hidden = check_sizes("hidden", hidden, minimum=0)
        size = 1
        for s in self.output_shape:
            size *= s
        self.net = _normalised(MLP([self.latent_dim, *hidden, size], activation, output_activation), spectral_norm)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() == 0 or z.shape[-1] != self.latent_dim:
            raise DataError(f"z: expected shape (..., {self.latent_dim}), got {tuple(z.shape)}.")
        return self.net(z).reshape(z.shape[:-1] + self.output_shape)


class Discriminator(nn.Module):
    """MLP discriminator (critic): a point of shape ``input_shape`` to one real score (a logit).

    Args:
        input_shape: the shape of one input point (an int for vectors).
        hidden: hidden layer sizes.
        activation: between layers; default ``"leaky_relu"`` (slope 0.01), usual for discriminators.
        spectral_norm: spectrally normalise every linear layer (a 1-Lipschitz critic up to the activations).

    Shapes:
        input ``(..., *input_shape)`` → output ``(...,)``.

    Example:
        >>> Discriminator((1, 8, 8), hidden=(16,), spectral_norm=True)(torch.zeros(5, 1, 8, 8)).shape
        torch.Size([5])
    """

    def __init__(self, input_shape: int | Sequence[int], hidden: Sequence[int] = (128, 128),
                 activation: str | Callable[[], nn.Module] = "leaky_relu", spectral_norm: bool = False) -> None:
        super().__init__()
        self.input_shape = _shape("input_shape", input_shape)
        hidden = check_sizes("hidden", hidden, minimum=0)
        size = 1
        for s in self.input_shape:
            size *= s
        self.net = _normalised(MLP([size, *hidden, 1], activation), spectral_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_points(x, self.input_shape)
        rank = len(self.input_shape)
        return self.net(x.reshape(x.shape[:x.dim() - rank] + (-1,))).squeeze(-1)


def _check_points(x: torch.Tensor, shape: tuple[int, ...]) -> None:
    rank = len(shape)
    if x.dim() < rank or tuple(x.shape[x.dim() - rank:]) != shape:
        raise DataError(f"x: expected shape (..., *{shape}), got {tuple(x.shape)}.")


class ConvGenerator(nn.Module):
    """DCGAN-style generator for small images: a linear layer to a ``channels[0]`` × (H / 2^k) × (W / 2^k)
    feature map, then k = ``len(channels)`` transposed convolutions (kernel 4, stride 2), each doubling
    height and width (a :class:`~latentkit.nn.ConvDecoder`).

    Args:
        latent_dim: size of z (kept as the attribute ``latent_dim``).
        output_shape: ``(C, H, W)``, ``H`` and ``W`` divisible by ``2 ** len(channels)``; e.g. ``(1, 8, 8)``
            for scikit-learn's digits.
        channels: input channels of each transposed convolution; the last maps to ``C``.
        activation: between layers (DCGAN: ReLU).
        output_activation: after the last layer, e.g. ``"tanh"`` for images scaled to [-1, 1]; default none.
        spectral_norm: spectrally normalise every layer.

    Shapes:
        input ``(..., latent_dim)`` → output ``(..., C, H, W)``.

    Example:
        >>> ConvGenerator(4, (1, 8, 8), channels=(16, 8), output_activation="tanh")(torch.zeros(5, 4)).shape
        torch.Size([5, 1, 8, 8])
    """

    def __init__(self, latent_dim: int, output_shape: Sequence[int], channels: Sequence[int] = (64, 32),
                 activation: str | Callable[[], nn.Module] = "relu",
                 output_activation: str | Callable[[], nn.Module] | None = None, spectral_norm: bool = False) -> None:
        super().__init__()
        self.latent_dim = check_sizes("latent_dim", [latent_dim])[0]
        self.net = _normalised(ConvDecoder(self.latent_dim, output_shape, channels, activation), spectral_norm)
        self.output_shape: tuple[int, ...] = self.net.output_shape
        self.output = nn.Identity() if output_activation is None else activation_module(output_activation)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() == 0 or z.shape[-1] != self.latent_dim:
            raise DataError(f"z: expected shape (..., {self.latent_dim}), got {tuple(z.shape)}.")
        return self.output(self.net(z))


class ConvDiscriminator(nn.Module):
    """DCGAN-style discriminator (critic) for small images: k = ``len(channels)`` strided convolutions
    (kernel 4, stride 2), each halving height and width, then a linear layer to one score (a
    :class:`~latentkit.nn.ConvEncoder` with one output). No batch normalisation, so that it suits the
    gradient penalty of WGAN-GP (Gulrajani et al. 2017).

    Args:
        input_shape: ``(C, H, W)``, ``H`` and ``W`` divisible by ``2 ** len(channels)``.
        channels: output channels of each convolution.
        activation: between layers; default LeakyReLU with slope 0.2 (DCGAN).
        spectral_norm: spectrally normalise every layer.

    Shapes:
        input ``(..., C, H, W)`` → output ``(...,)``.

    Example:
        >>> ConvDiscriminator((1, 8, 8), channels=(8, 16), spectral_norm=True)(torch.zeros(5, 1, 8, 8)).shape
        torch.Size([5])
    """

    def __init__(self, input_shape: Sequence[int], channels: Sequence[int] = (32, 64),
                 activation: str | Callable[[], nn.Module] = _leaky_relu, spectral_norm: bool = False) -> None:
        super().__init__()
        self.net = _normalised(ConvEncoder(input_shape, 1, channels, activation), spectral_norm)
        self.input_shape: tuple[int, ...] = self.net.input_shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_points(x, self.input_shape)
        return self.net(x).squeeze(-1)
