"""Generator and discriminator networks for vectors (MLPs), with optional spectral normalisation."""

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

from latentkit.errors import DataError
from latentkit.nn.mlp import MLP, check_sizes

__all__ = ["Generator", "Discriminator"]


def _shape(name: str, shape: int | Sequence[int]) -> tuple[int, ...]:
    return tuple(check_sizes(name, [shape] if isinstance(shape, int) else shape))


def _normalised(mlp: MLP, spectral_norm: bool) -> MLP:
    """Spectral normalisation (Miyato et al. 2018) of every ``Linear`` layer: weights divided by their
    largest singular value, estimated by one power iteration per forward pass in training mode."""
    if spectral_norm:
        for index, layer in enumerate(mlp):
            if isinstance(layer, nn.Linear):
                mlp[index] = _spectral_norm(layer)
    return mlp


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
        rank = len(self.input_shape)
        if x.dim() < rank or tuple(x.shape[x.dim() - rank:]) != self.input_shape:
            raise DataError(f"x: expected shape (..., *{self.input_shape}), got {tuple(x.shape)}.")
        return self.net(x.reshape(x.shape[:x.dim() - rank] + (-1,))).squeeze(-1)
