"""The Gaussian diffusion process (Ho et al. 2020), kept apart from any network.

:class:`DiffusionProcess` holds the noise schedule (computed in float64) and everything that
follows from it: the forward marginals q(x_t | x_0), the forward posteriors q(x_{t-1} | x_t, x_0),
the reverse transitions p(x_{t-1} | x_t) given a noise prediction, the per-step terms of the
variational bound, and the DDPM and DDIM samplers. A network is any module with
``forward(x, t) -> ε̂`` (the noise in x_t); it is passed to the methods that need it, as in OpenAI's
improved-diffusion ``GaussianDiffusion``.

Time steps are 0-based indices ``t = 0 .. T - 1``; index t is the paper's step t + 1, so
``x_t`` at index 0 is the first noised version of the data and index ``T - 1`` the last.
"""

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

from latentkit.errors import ConfigError

__all__ = ["DiffusionProcess", "SCHEDULES", "VARIANCES"]

SCHEDULES = ("linear", "cosine")
VARIANCES = ("small", "large")

NoisePredictor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _betas(schedule: str, timesteps: int) -> torch.Tensor:
    if schedule == "linear":
        # Ho et al. 2020: 1e-4 .. 0.02 over 1000 steps; scaled so other T cover the same noise range
        # (Nichol & Dhariwal 2021, improved-diffusion's get_named_beta_schedule).
        # Capped at 0.999 as the cosine schedule is, for T < 50.
        scale = 1000.0 / timesteps
        return torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64).clamp(max=0.999)
    # cosine: Nichol & Dhariwal 2021, eq. 17, s = 0.008 and betas capped at 0.999.
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    alpha_bar = torch.cos((steps + 0.008) / 1.008 * math.pi / 2) ** 2
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)


class DiffusionProcess(nn.Module):
    r"""Forward noising and reverse transitions of a Gaussian diffusion with T steps.

    ``q(x_t | x_0) = N(sqrt(ᾱ_t) x_0, (1 - ᾱ_t) I)``; the reverse transition given a noise
    prediction ε̂ has mean ``μ̃_t(x̂_0, x_t)`` (the forward posterior mean at
    ``x̂_0 = (x_t - sqrt(1 - ᾱ_t) ε̂) / sqrt(ᾱ_t)``) and a fixed variance: ``"small"`` is the
    forward posterior variance β̃_t, ``"large"`` is β_t (Ho et al. 2020, section 3.2); at t = 0
    both use β̃ of index 1, as improved-diffusion does (β̃_0 = 0).

    Schedules are computed in float64 and stored as buffers; :meth:`to` moves and casts them with
    the network.

    Args:
        schedule: ``"linear"`` (Ho et al. 2020) or ``"cosine"`` (Nichol & Dhariwal 2021).
        timesteps: T >= 2.
        variance: ``"small"`` (β̃_t, default) or ``"large"`` (β_t).

    Shapes:
        ``x``: ``(*batch, *event_shape)``; ``t``: integer tensor ``batch`` (one index per point),
        broadcast against ``x``'s leading dimensions.

    Example:
        >>> process = DiffusionProcess("cosine", 50)
        >>> process.alphas_cumprod.shape, bool(process.alphas_cumprod[-1] < 1e-3)
        (torch.Size([50]), True)
    """

    alphas_cumprod: torch.Tensor

    def __init__(self, schedule: Literal["linear", "cosine"] = "linear", timesteps: int = 1000,
                 variance: Literal["small", "large"] = "small") -> None:
        super().__init__()
        if schedule not in SCHEDULES:
            raise ConfigError(f"schedule: must be one of {list(SCHEDULES)}, got {schedule!r}.")
        if variance not in VARIANCES:
            raise ConfigError(f"variance: must be one of {list(VARIANCES)}, got {variance!r}.")
        if isinstance(timesteps, bool) or not isinstance(timesteps, int) or timesteps < 2:
            raise ConfigError(f"timesteps: must be an integer >= 2, got {timesteps!r}.")
        self.schedule, self.timesteps, self.variance = schedule, timesteps, variance
        betas = _betas(schedule, timesteps)
        alphas = 1 - betas
        alpha_bar = torch.cumprod(alphas, 0)
        alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
        posterior_variance = betas * (1 - alpha_bar_prev) / (1 - alpha_bar)
        reverse = posterior_variance if variance == "small" else betas.clone()
        reverse[0] = posterior_variance[1]
        buffers = {
            "betas": betas, "alphas_cumprod": alpha_bar, "alphas_cumprod_prev": alpha_bar_prev,
            "posterior_variance": posterior_variance, "reverse_variance": reverse,
            "posterior_mean_coef1": betas * alpha_bar_prev.sqrt() / (1 - alpha_bar),
            "posterior_mean_coef2": (1 - alpha_bar_prev) * alphas.sqrt() / (1 - alpha_bar),
        }
        dtype = torch.get_default_dtype()
        for name, value in buffers.items():
            self.register_buffer(name, value.to(dtype))

    def extra_repr(self) -> str:
        return f"schedule={self.schedule!r}, timesteps={self.timesteps}, variance={self.variance!r}"

    @staticmethod
    def _at(values: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``values[t]`` shaped to broadcast against ``x`` (t's dims first, then x's event dims)."""
        out = values[t]
        return out.reshape(out.shape + (1,) * (x.dim() - out.dim()))

    # -- forward process -----------------------------------------------------------------------
    def q_mean_std(self, x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation of q(x_t | x_0)."""
        alpha_bar = self._at(self.alphas_cumprod, t, x0)
        return alpha_bar.sqrt() * x0, (1 - alpha_bar).sqrt().expand_as(x0)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """A draw of x_t ~ q(x_t | x_0) (with the given standard normal ``noise``)."""
        mean, std = self.q_mean_std(x0, t)
        return mean + std * (torch.randn_like(x0) if noise is None else noise)

    def q_posterior(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of q(x_{t-1} | x_t, x_0) (variance 0 at t = 0)."""
        mean = self._at(self.posterior_mean_coef1, t, xt) * x0 + self._at(self.posterior_mean_coef2, t, xt) * xt
        return mean, self._at(self.posterior_variance, t, xt).expand_as(xt)

    # -- reverse process -----------------------------------------------------------------------
    def predict_x0(self, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Tweedie's estimate x̂_0 = (x_t - sqrt(1 - ᾱ_t) ε̂) / sqrt(ᾱ_t)."""
        alpha_bar = self._at(self.alphas_cumprod, t, xt)
        return (xt - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()

    def p_mean_variance(self, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                        clip: tuple[float, float] | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean and variance of p(x_{t-1} | x_t) given the noise prediction ``eps``, and x̂_0
        (clamped to ``clip = (low, high)`` if given)."""
        x0 = self.predict_x0(xt, t, eps)
        if clip is not None:
            x0 = x0.clamp(*clip)
        mean, _ = self.q_posterior(x0, xt, t)
        return mean, self._at(self.reverse_variance, t, xt).expand_as(xt), x0

    def snr_weight(self, t: torch.Tensor) -> torch.Tensor:
        """w_t with KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) = w_t ||ε - ε̂||² + const:
        ``β_t² / (2 σ_t² α_t (1 - ᾱ_t))``; at t = 0 the decoder's ``β_1 / (2 σ_0² α_1)``, the same
        formula. Dividing the bound's terms by it gives Ho et al.'s simple loss."""
        betas, variance = self.betas[t], self.reverse_variance[t]
        return betas ** 2 / (2 * variance * (1 - betas) * (1 - self.alphas_cumprod[t]))

    # -- samplers ------------------------------------------------------------------------------
    @torch.no_grad()
    def ddpm(self, network: NoisePredictor, noise: torch.Tensor, clip: tuple[float, float] | None = None
             ) -> torch.Tensor:
        """Ancestral sampling from x_T = ``noise`` through every step of p(x_{t-1} | x_t)."""
        x = noise
        for step in reversed(range(self.timesteps)):
            t = torch.full(x.shape[:1], step, dtype=torch.long, device=x.device)
            mean, variance, _ = self.p_mean_variance(x, t, network(x, t), clip)
            x = mean + variance.sqrt() * torch.randn_like(x) if step > 0 else mean
        return x

    def ddim_steps(self, num_steps: int) -> list[int]:
        """``num_steps`` time indices, evenly spaced from T - 1 down to 0."""
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= self.timesteps:
            raise ConfigError(f"num_steps: must be an integer in 1 .. {self.timesteps}, got {num_steps!r}.")
        return sorted({round(s) for s in torch.linspace(0, self.timesteps - 1, num_steps).tolist()}, reverse=True)

    @torch.no_grad()
    def ddim(self, network: NoisePredictor, noise: torch.Tensor, num_steps: int, eta: float = 0.0,
             clip: tuple[float, float] | None = None) -> torch.Tensor:
        """DDIM (Song et al. 2021, eq. 12) from x_T = ``noise`` on ``num_steps`` evenly spaced
        steps; ``eta = 0`` is deterministic, ``eta = 1`` matches DDPM's variance on the full grid."""
        x = noise
        steps = self.ddim_steps(num_steps)
        for i, step in enumerate(steps):
            t = torch.full(x.shape[:1], step, dtype=torch.long, device=x.device)
            eps = network(x, t)
            x0 = self.predict_x0(x, t, eps)
            if clip is not None:
                x0 = x0.clamp(*clip)
                eps = (x - self.alphas_cumprod[step].sqrt() * x0) / (1 - self.alphas_cumprod[step]).sqrt()
            if i == len(steps) - 1:
                return x0
            a, a_next = self.alphas_cumprod[step], self.alphas_cumprod[steps[i + 1]]
            sigma = eta * ((1 - a_next) / (1 - a) * (1 - a / a_next)).sqrt()
            x = a_next.sqrt() * x0 + (1 - a_next - sigma ** 2).sqrt() * eps + sigma * torch.randn_like(x)
        return x
