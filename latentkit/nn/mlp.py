"""Multilayer perceptron."""

from collections.abc import Callable, Sequence

from torch import nn

from latentkit.errors import ConfigError

__all__ = ["MLP", "activation_module"]

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU, "elu": nn.ELU, "tanh": nn.Tanh, "softplus": nn.Softplus, "gelu": nn.GELU,
    "silu": nn.SiLU, "leaky_relu": nn.LeakyReLU,
}


def activation_module(activation: str | Callable[[], nn.Module]) -> nn.Module:
    """A fresh activation module from a name in ``ACTIVATIONS`` or a zero-argument factory."""
    if isinstance(activation, str):
        if activation not in ACTIVATIONS:
            raise ConfigError(f"activation: must be one of {sorted(ACTIVATIONS)} or a module class, "
                              f"got {activation!r}.")
        return ACTIVATIONS[activation]()
    if callable(activation):
        return activation()
    raise ConfigError(f"activation: must be a name or a module class, got {activation!r}.")


def check_sizes(name: str, sizes: Sequence[int], minimum: int = 1) -> list[int]:
    sizes = list(sizes)
    if len(sizes) < minimum or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in sizes):
        raise ConfigError(f"{name}: must be at least {minimum} positive integers, got {sizes!r}.")
    return sizes


class MLP(nn.Sequential):
    """Fully connected network: ``Linear`` layers with an activation between them.

    Args:
        sizes: ``[in_features, hidden_1, ..., out_features]`` (at least two entries; two give
            one ``Linear`` layer).
        activation: ``"relu"`` (default), ``"elu"``, ``"tanh"``, ``"softplus"``, ``"gelu"``,
            ``"silu"``, ``"leaky_relu"`` or a module class such as ``torch.nn.ReLU``.
        output_activation: optional activation after the last layer (same choices).

    Shapes:
        input ``(..., sizes[0])`` → output ``(..., sizes[-1])``; any leading batch dimensions.

    Example:
        >>> import torch
        >>> MLP([4, 16, 2])(torch.zeros(5, 3, 4)).shape
        torch.Size([5, 3, 2])
    """

    def __init__(self, sizes: Sequence[int], activation: str | Callable[[], nn.Module] = "relu",
                 output_activation: str | Callable[[], nn.Module] | None = None) -> None:
        sizes = check_sizes("sizes", sizes, minimum=2)
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(activation_module(activation))
        if output_activation is not None:
            layers.append(activation_module(output_activation))
        super().__init__(*layers)
        self.sizes = sizes
