"""Noise-prediction (score) networks for diffusion models: ``forward(x, t) -> ε̂``.

A noise prediction ε̂(x_t, t) is a scaled score: ``∇ log q(x_t) = -ε̂ / sqrt(1 - ᾱ_t)``. Every network
here takes any number of leading batch dimensions and integer time indices ``t`` broadcastable to
them.
"""

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from latentkit.errors import ConfigError
from latentkit.nn.mlp import MLP, activation_module, check_sizes

__all__ = ["TimeEmbedding", "ScoreMLP", "ScoreUNet", "GaussianNoisePredictor"]


class TimeEmbedding(nn.Module):
    """Sinusoidal embedding of integer time steps (Vaswani et al. 2017; Ho et al. 2020).

    Args:
        dim: embedding size (even, >= 2).
        max_period: longest wavelength, in steps (10000 as in the transformer).

    Shapes:
        ``t`` ``(*batch)`` → ``(*batch, dim)``.

    Example:
        >>> TimeEmbedding(8)(torch.tensor([0, 5])).shape
        torch.Size([2, 8])
    """

    def __init__(self, dim: int, max_period: float = 10000.0) -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2 or dim % 2:
            raise ConfigError(f"dim: the time embedding size must be an even integer >= 2, got {dim!r}.")
        half = dim // 2
        frequencies = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / half)
        self.register_buffer("frequencies", frequencies.to(torch.get_default_dtype()))
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = t.to(self.frequencies.dtype).unsqueeze(-1) * self.frequencies
        return torch.cat([angles.sin(), angles.cos()], -1)


class ScoreMLP(nn.Module):
    """An MLP noise predictor for vectors: ``ε̂ = MLP([x, embed(t)])``.

    Args:
        dim: size D of the vectors.
        hidden: hidden layer sizes.
        time_dim: size of the sinusoidal time embedding.
        activation: as in :class:`~latentkit.nn.MLP` (default ``"silu"``).

    Shapes:
        ``x`` ``(*batch, D)``, ``t`` broadcastable to ``batch`` → ``(*batch, D)``.

    Example:
        >>> ScoreMLP(2, hidden=(16,))(torch.zeros(5, 3, 2), torch.zeros(5, 3, dtype=torch.long)).shape
        torch.Size([5, 3, 2])
    """

    def __init__(self, dim: int, hidden: Sequence[int] = (128, 128, 128), time_dim: int = 32,
                 activation: str | Callable[[], nn.Module] = "silu") -> None:
        super().__init__()
        (dim,) = check_sizes("dim", [dim])
        hidden = check_sizes("hidden", hidden)
        self.embed = TimeEmbedding(time_dim)
        self.net = MLP([dim + time_dim, *hidden, dim], activation)
        self.dim = dim

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.embed(t)
        batch = torch.broadcast_shapes(x.shape[:-1], emb.shape[:-1])
        return self.net(torch.cat([x.expand(batch + x.shape[-1:]), emb.expand(batch + emb.shape[-1:])], -1))


class _ResidualBlock(nn.Module):
    """Two 3x3 convolutions with GroupNorm, the time embedding added between them, and a skip."""

    def __init__(self, channels_in: int, channels_out: int, time_dim: int, activation: Any) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(math.gcd(8, channels_in), channels_in)
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, padding=1)
        self.time = nn.Linear(time_dim, channels_out)
        self.norm2 = nn.GroupNorm(math.gcd(8, channels_out), channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, padding=1)
        self.act = activation_module(activation)
        self.skip = nn.Conv2d(channels_in, channels_out, 1) if channels_in != channels_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        h = h + self.time(emb)[:, :, None, None]
        return self.skip(x) + self.conv2(self.act(self.norm2(h)))


class ScoreUNet(nn.Module):
    """A small U-Net noise predictor for images (Ronneberger et al. 2015, as in Ho et al. 2020,
    without attention): at each resolution a residual block with the time embedding, then a strided
    convolution halving height and width; back up with nearest-neighbour upsampling, skip connections
    concatenated.

    Args:
        input_shape: ``(C, H, W)``; H and W divisible by ``2 ** (len(channels) - 1)``.
        channels: feature channels at each resolution, e.g. ``(32, 64)`` (two resolutions).
        time_dim: size of the time embedding (passed through a two-layer MLP).
        activation: as in :class:`~latentkit.nn.MLP` (default ``"silu"``).

    Shapes:
        ``x`` ``(*batch, C, H, W)``, ``t`` broadcastable to ``batch`` → ``(*batch, C, H, W)``.

    Example:
        >>> net = ScoreUNet((1, 8, 8), channels=(8, 16))
        >>> net(torch.zeros(2, 3, 1, 8, 8), torch.zeros(2, 3, dtype=torch.long)).shape
        torch.Size([2, 3, 1, 8, 8])
    """

    def __init__(self, input_shape: Sequence[int], channels: Sequence[int] = (32, 64), time_dim: int = 64,
                 activation: str | Callable[[], nn.Module] = "silu") -> None:
        super().__init__()
        shape = tuple(check_sizes("input_shape", input_shape))
        channels = check_sizes("channels", channels)
        factor = 2 ** (len(channels) - 1)
        if len(shape) != 3 or shape[1] % factor or shape[2] % factor:
            raise ConfigError(f"input_shape: must be (C, H, W) with H and W divisible by {factor} "
                              f"(2 ** (len(channels) - 1)), got {shape!r}.")
        self.input_shape = shape
        self.embed = nn.Sequential(TimeEmbedding(time_dim), MLP([time_dim, time_dim, time_dim], activation))
        self.head = nn.Conv2d(shape[0], channels[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        for i, c in enumerate(channels):
            self.down.append(_ResidualBlock(channels[max(i - 1, 0)], c, time_dim, activation))
            if i < len(channels) - 1:
                self.downsample.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        self.middle = _ResidualBlock(channels[-1], channels[-1], time_dim, activation)
        self.up = nn.ModuleList()
        for i in reversed(range(len(channels))):
            out = channels[max(i - 1, 0)]
            self.up.append(_ResidualBlock(2 * channels[i], out, time_dim, activation))
        self.tail = nn.Sequential(nn.GroupNorm(math.gcd(8, channels[0]), channels[0]), activation_module(activation),
                                  nn.Conv2d(channels[0], shape[0], 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        batch = torch.broadcast_shapes(x.shape[:-3], t.shape)
        h = x.expand(batch + x.shape[-3:]).reshape((-1,) + self.input_shape)
        emb = self.embed(t.expand(batch).reshape(-1))
        h = self.head(h)
        skips = []
        for i, block in enumerate(self.down):
            h = block(h, emb)
            skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        h = self.middle(h, emb)
        for block in self.up:
            skip = skips.pop()
            if h.shape[-1] != skip.shape[-1]:
                h = nn.functional.interpolate(h, size=skip.shape[-2:], mode="nearest")
            h = block(torch.cat([h, skip], 1), emb)
        return self.tail(h).reshape(batch + self.input_shape)


class GaussianNoisePredictor(nn.Module):
    """The exact noise prediction E[ε | x_t] for Gaussian data N(m, S): a reference network.

    With ``x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε`` and x_0 ~ N(m, S), x_t is Gaussian with covariance
    ``S_t = ᾱ_t S + (1 - ᾱ_t) I`` and ``E[ε | x_t] = sqrt(1 - ᾱ_t) S_t⁻¹ (x_t - sqrt(ᾱ_t) m)``. With it a
    diffusion model is the Gaussian prior itself (up to the discretisation of the reverse process), which
    makes closed-form checks possible and gives a Gaussian baseline for any engine.

    Args:
        mean: m, shape ``event_shape`` (flattened to D internally).
        covariance: S, ``(D, D)`` positive definite.
        alphas_cumprod: ᾱ_t of the diffusion process, ``(T,)`` (``DiffusionProcess.alphas_cumprod``).

    Shapes:
        ``x`` ``(*batch, *event_shape)``, ``t`` broadcastable to ``batch`` → ``(*batch, *event_shape)``.

    Example:
        >>> net = GaussianNoisePredictor(torch.zeros(2), torch.eye(2), torch.tensor([0.9, 0.5]))
        >>> net(torch.ones(3, 2), torch.tensor([0, 1, 1])).shape
        torch.Size([3, 2])
    """

    def __init__(self, mean: torch.Tensor, covariance: torch.Tensor, alphas_cumprod: torch.Tensor) -> None:
        super().__init__()
        mean = torch.as_tensor(mean, dtype=torch.get_default_dtype())
        cov = torch.as_tensor(covariance, dtype=torch.get_default_dtype())
        size = mean.numel()
        if cov.shape != (size, size):
            raise ConfigError(f"covariance: expected shape ({size}, {size}) for a mean of {size} elements, "
                              f"got {tuple(cov.shape)}.")
        alpha_bar = torch.as_tensor(alphas_cumprod, dtype=cov.dtype).reshape(-1, 1, 1)
        marginal = alpha_bar * cov + (1 - alpha_bar) * torch.eye(size, dtype=cov.dtype)
        try:
            precision = torch.cholesky_inverse(torch.linalg.cholesky(marginal))
        except torch.linalg.LinAlgError as error:
            raise ConfigError("covariance: must be symmetric positive definite.") from error
        self.register_buffer("mean", mean.reshape(-1))
        self.register_buffer("gain", (1 - alpha_bar).sqrt() * precision)  # (T, D, D)
        self.register_buffer("root_alpha_bar", alpha_bar.reshape(-1).sqrt())
        self.event_shape = tuple(mean.shape)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        rank = len(self.event_shape)
        flat = x.reshape(x.shape[:x.dim() - rank] + (-1,))
        centred = flat - self.root_alpha_bar[t].unsqueeze(-1) * self.mean
        out = (self.gain[t] @ centred.unsqueeze(-1)).squeeze(-1)
        return out.reshape(out.shape[:-1] + self.event_shape)
