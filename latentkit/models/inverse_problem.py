"""Inverse problems y = A(x) + noise with a diffusion prior on x, and the operators A that come up most."""

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints

from latentkit.data import masked_observations
from latentkit.errors import ConfigError
from latentkit.models.base import LatentModel
from latentkit.models.diffusion import Diffusion, DiffusionPrior

__all__ = ["InverseProblem", "blur", "gaussian_posterior"]

Operator = Callable[[torch.Tensor], torch.Tensor]


def blur(kernel: Any) -> Operator:
    """A blurring operator for images ``(..., C, H, W)``: each channel convolved with ``kernel`` (k, k),
    zero padding, output the same size (k odd).

    Example:
        >>> A = blur(torch.ones(3, 3) / 9)
        >>> round(A(torch.ones(2, 1, 4, 4))[0, 0, 1, 1].item(), 6)
        1.0
    """
    weight = torch.as_tensor(kernel, dtype=torch.get_default_dtype())
    if weight.dim() != 2 or weight.shape[0] != weight.shape[1] or weight.shape[0] % 2 == 0:
        raise ConfigError(f"kernel: must be a square (k, k) array with k odd, got shape {tuple(weight.shape)}.")

    def forward(x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[-3]
        flat = x.reshape((-1,) + tuple(x.shape[-3:]))
        w = weight.to(x).expand(channels, 1, *weight.shape)
        out = torch.nn.functional.conv2d(flat, w, padding=weight.shape[0] // 2, groups=channels)
        return out.reshape(x.shape)

    return forward


def gaussian_posterior(mean: Any, covariance: Any, matrix: Any, y: Any, noise_scale: float,
                       mask: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact posterior of x ~ N(m, S) given y = M x + N(0, σ² I) on the observed entries.

    Args:
        mean: m, ``(D,)``. covariance: S, ``(D, D)``. matrix: M, ``(K, D)``.
        y: observations ``(N, K)``. noise_scale: σ. mask: ``(N, K)`` or ``(K,)`` booleans, true where observed.

    Returns:
        Posterior means ``(N, D)`` and covariances ``(N, D, D)``.
    """
    dtype = torch.get_default_dtype()
    m, S, M = (torch.as_tensor(v, dtype=dtype) for v in (mean, covariance, matrix))
    y = torch.as_tensor(y, dtype=dtype)
    observed = torch.ones_like(y, dtype=torch.bool) if mask is None else torch.as_tensor(mask).bool().expand(y.shape)
    w = observed.to(dtype) / noise_scale ** 2  # (N, K): precision of each observation, 0 where missing
    prior_precision = torch.linalg.inv(S)
    precision = prior_precision + M.T @ (w.unsqueeze(-1) * M)  # (N, D, D)
    cov = torch.linalg.inv(precision)
    rhs = prior_precision @ m + ((w * torch.where(observed, y, 0.0)) @ M)
    return (cov @ rhs.unsqueeze(-1)).squeeze(-1), cov


class InverseProblem(LatentModel):
    r"""Recover x from y = A(x) + N(0, σ²) with a diffusion prior: ``x ~ DiffusionPrior``, ``obs ~ N(A(x), σ)``.

    Two ways to fit it:

    * ``lk.fit(problem, {"y": y}, engine="svi")`` — variational: the guide is a Gaussian N(loc, diag(scale²))
      over x per observation, and the prior's log density is the diffusion model's variational bound,
      estimated with ``num_time_samples`` fresh time steps and noise draws per SVI step. The bound's terms are
      ``w_t ||ε̂(x_t, t) - ε||²`` plus constants, so this is the denoising-score regulariser of RED-diff
      (Mardani et al. 2023) with the ELBO weighting, inside a proper ELBO on log p(y) (the variational
      posterior's entropy keeps its spread).
    * ``lk.fit(problem, {"y": y}, engine="diffusion", method="smc" | "dps")`` — sampling: the twisted diffusion
      sampler (sequential Monte Carlo over the reverse process, asymptotically exact; Wu et al. 2023) or
      diffusion posterior sampling (Chung et al. 2023, approximate); see
      :class:`~latentkit.inference.DiffusionSamplerEngine`.

    Both return draws of ``x`` ``(chain, draw, N, *data_shape)``;
    :func:`~latentkit.inference.pixelwise_mean_std` gives pixelwise means and standard deviations.

    Sites (stable names): ``x`` (N, \*data_shape), observed ``obs`` (N, \*obs_shape).

    Data: ``y`` ``(N, *obs_shape)`` (or one observation ``obs_shape``), or ``{"y": y, "mask": mask}`` with
    ``mask`` true where an entry of y is observed (shape of y, or ``obs_shape`` for all); unobserved entries may
    be NaN. Inpainting is ``forward=None`` with a mask, denoising ``forward=None`` without one, deblurring
    ``forward=blur(kernel)``.

    Args:
        diffusion: a trained :class:`~latentkit.models.Diffusion` (or a :class:`DiffusionPrior`, used as is).
        forward: A, any differentiable function ``(*batch, *data_shape) -> (*batch, *obs_shape)``; default
            the identity.
        noise_scale: σ > 0.
        num_time_samples: time steps per evaluation of the prior's bound (variational engine).
        init_scale: initial standard deviation of the variational Gaussian.

    Shapes:
        ``y``: ``(N, *obs_shape)``; draws of ``x``: ``(chain, draw, N, *data_shape)``.

    Example:
        >>> problem = InverseProblem(Diffusion(2, timesteps=10, hidden=(8,)), noise_scale=0.5)
        >>> problem.prepare([[0.0, float("nan")]] )["mask"].tolist()
        Traceback (most recent call last):
        ...
        latentkit.errors.DataError: y: contains NaN or infinite values in observed entries; set mask to False there.
        >>> problem.prepare({"y": [[0.0, float("nan")]], "mask": [True, False]})["y"].tolist()
        [[0.0, 0.0]]
    """

    def __init__(self, diffusion: Diffusion | DiffusionPrior, forward: Operator | None = None, *,
                 noise_scale: float = 0.1, num_time_samples: int = 8, init_scale: float = 0.1) -> None:
        super().__init__()
        if isinstance(diffusion, Diffusion):
            prior = DiffusionPrior(diffusion, num_time_samples=num_time_samples, seed=None)
        elif isinstance(diffusion, DiffusionPrior):
            prior = diffusion
        else:
            raise ConfigError(f"diffusion: must be a latentkit Diffusion or DiffusionPrior, "
                              f"got {type(diffusion).__name__}.")
        if forward is not None and not callable(forward):
            raise ConfigError(f"forward: must be a callable x -> A(x), got {type(forward).__name__}.")
        for name, value in (("noise_scale", noise_scale), ("init_scale", init_scale)):
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not (
                    math.isfinite(value) and value > 0):
                raise ConfigError(f"{name}: must be a positive number, got {value!r}.")
        # Held outside the module tree (plain attributes): no engine trains the prior's network or an
        # operator that happens to be a torch module.
        object.__setattr__(self, "prior", prior)
        object.__setattr__(self, "operator", forward if forward is not None else (lambda x: x))
        self.noise_scale, self.init_scale = float(noise_scale), float(init_scale)
        self.data_shape = prior.diffusion.data_shape
        with torch.no_grad():
            probe = self.operator(torch.zeros((2,) + self.data_shape, dtype=prior.diffusion._dtype()))
        if not isinstance(probe, torch.Tensor) or probe.dim() < 1 or probe.shape[0] != 2:
            raise ConfigError("forward: must map x of shape (batch, *data_shape) to a tensor (batch, *obs_shape).")
        self.obs_shape = tuple(probe.shape[1:])
        self.init_args = {"diffusion": f"custom {type(diffusion).__name__}",
                          "forward": None if forward is None else f"custom {type(forward).__name__}",
                          "noise_scale": self.noise_scale, "num_time_samples": num_time_samples,
                          "init_scale": self.init_scale}

    @property
    def diffusion(self) -> Diffusion:
        return self.prior.diffusion

    def forward_operator(self, x: torch.Tensor) -> torch.Tensor:
        """A(x) for ``x`` of shape ``(*batch, *data_shape)``, ``(*batch, *obs_shape)``."""
        rank = len(self.data_shape)
        batch = x.shape[:x.dim() - rank]
        out = self.operator(x.reshape((-1,) + self.data_shape))
        return out.reshape(batch + self.obs_shape)

    # -- data -----------------------------------------------------------------------------------
    def prepare(self, data: Any) -> dict[str, Any]:
        """``{"y": (N, *obs_shape), "mask": (N, *obs_shape) bool}``; unobserved entries of y set to 0."""
        return masked_observations(data, self.obs_shape, self.diffusion._dtype(), "A(x) has")

    def dims(self, kwargs: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
        def names(shape: tuple[int, ...], prefix: str) -> tuple[str, ...]:
            return ("feature",) if len(shape) == 1 else tuple(f"{prefix}_dim_{i}" for i in range(len(shape)))

        return {"x": ("obs_id",) + names(self.data_shape, "x"), "obs": ("obs_id",) + names(self.obs_shape, "obs")}

    # -- Pyro model and guide -------------------------------------------------------------------
    def likelihood(self, x: torch.Tensor, mask: torch.Tensor) -> dist.Distribution:
        """p(y | x): ``N(A(x), σ²)`` on the observed entries, event ``obs_shape``."""
        return dist.Normal(self.forward_operator(x), self.noise_scale).mask(mask).to_event(len(self.obs_shape))

    def model(self, y: torch.Tensor, mask: torch.Tensor) -> None:
        with pyro.plate("data", y.shape[0]):
            x = pyro.sample("x", self.prior)
            pyro.sample("obs", self.likelihood(x, mask), obs=y)

    def _initial_loc(self, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """y where observed when A keeps x's shape (inpainting, denoising, blurring), the prior's centre
        (the middle of the training range) elsewhere."""
        low_high = self.diffusion.clip_range()
        centre = 0.0 if low_high is None else 0.5 * (low_high[0] + low_high[1])
        loc = torch.full((y.shape[0],) + self.data_shape, centre, dtype=y.dtype)
        if self.obs_shape == self.data_shape:
            loc = torch.where(mask, y, loc)
        return loc

    def guide(self, y: torch.Tensor, mask: torch.Tensor) -> None:
        """The variational posterior N(loc, diag(scale²)) of each x."""
        loc = pyro.param("x_loc", lambda: self._initial_loc(y, mask))
        scale = pyro.param("x_scale", lambda: torch.full_like(loc, self.init_scale), constraint=constraints.positive)
        with pyro.plate("data", y.shape[0]):
            pyro.sample("x", dist.Normal(loc, scale).to_event(len(self.data_shape)))
