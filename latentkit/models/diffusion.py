"""Denoising diffusion models as a Pyro model/guide pair, and as a prior distribution for other models."""

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import constraints
from torch import nn
from torch.distributions import kl_divergence

from latentkit.errors import ConfigError, DataError
from latentkit.models.base import LatentModel
from latentkit.models.diffusion_process import DiffusionProcess
from latentkit.nn.score import ScoreMLP, ScoreUNet

__all__ = ["Diffusion", "DiffusionPrior"]

WEIGHTINGS = ("elbo", "simple")


def _positive_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1


def _normal(mean: torch.Tensor, variance: torch.Tensor, rank: int) -> dist.Distribution:
    return dist.Normal(mean, variance.sqrt()).to_event(rank)


class Diffusion(LatentModel):
    r"""A denoising diffusion probabilistic model (Ho et al. 2020) trained by SVI on its variational bound.

    The fixed forward noising process is the guide and the learned reverse process is the model. For
    each data point x_0 both draw a time ``time`` ~ Uniform(0, 1), giving the step index
    ``t = floor(time · T)`` (identical densities in model and guide, so it cancels), and ``x_t`` from
    the forward marginal q(x_t | x_0) (the same distribution in both, so it cancels too). The guide then
    draws ``x_prev`` from the forward posterior q(x_{t-1} | x_t, x_0), which the model scores under the
    learned reverse transition p(x_{t-1} | x_t) (a Gaussian whose mean comes from the network's noise
    prediction); at t = 0 the model instead scores the data ``obs`` under the decoder p(x_0 | x_1). These
    terms are scaled by T, so their expectation over the uniform t is the sum over all steps; the prior
    term KL(q(x_T | x_0) || N(0, I)) enters through the site ``x_T``. The ELBO of this pair is therefore
    an unbiased estimate of the diffusion model's variational lower bound on log p(x_0) (Ho et al., eq. 5).

    Train with ``lk.fit(diffusion, X, engine="svi", batch_size=..., num_samples=2)``: the SVI engine's
    ``elbo="auto"`` takes this model's ``default_elbo = "meanfield"``, the closed-form Gaussian KL of each
    step (the usual DDPM loss), which has far less variance than a single-sample ``Trace_ELBO``. Keep
    ``num_samples`` small: each posterior draw holds x_t and x_{t-1} for every data point.
    ``weighting="simple"`` divides each step's term by its weight w_t (Ho et al.'s L_simple, eq. 14,
    ``||ε - ε̂(x_t, t)||²``): better samples, but the loss is then not a bound.

    Sites (stable names): ``time`` (N,), ``x_T``, ``x_t``, ``x_prev`` (N, \*data_shape), observed
    ``obs`` (N, \*data_shape).

    Args:
        data_shape: the shape of one data point, an int D for vectors or ``(C, H, W)`` for images.
        network: a module with ``forward(x, t) -> ε̂`` (x ``(*batch, *data_shape)``, integer t
            ``batch``); default a :class:`~latentkit.nn.ScoreMLP` (vectors) or a
            :class:`~latentkit.nn.ScoreUNet` (images).
        schedule: ``"linear"`` or ``"cosine"`` noise schedule.
        timesteps: T.
        variance: reverse variances, ``"large"`` (β_t, default) or ``"small"`` (β̃_t); see
            :class:`~latentkit.models.diffusion_process.DiffusionProcess`.
        weighting: ``"elbo"`` (default, the bound) or ``"simple"`` (ε-prediction loss).
        hidden: hidden sizes of the default MLP network.

    Shapes:
        data: ``(N, *data_shape)`` or ``(N, prod(data_shape))``.
        :meth:`sample`: ``(n, *data_shape)``. :meth:`log_prob_bound`: ``(N,)``.

    Raises:
        ConfigError: a bad ``data_shape``, ``weighting``, schedule or network.
        DataError: in :meth:`prepare`: wrong shape, NaN or infinite values, no data.

    Example:
        >>> diffusion = Diffusion(2, timesteps=20, hidden=(16,))
        >>> sorted(diffusion.prepare(np.zeros((5, 2))))
        ['X', 'subsample_size']
        >>> diffusion.sample(3, seed=0).shape, diffusion.log_prob_bound(np.zeros((4, 2))).shape
        (torch.Size([3, 2]), torch.Size([4]))
    """

    #: The SVI engine's ``elbo="auto"`` choice for this model: the closed-form KL per step.
    default_elbo = "meanfield"

    def __init__(self, data_shape: int | Sequence[int], network: nn.Module | None = None, *,
                 schedule: Literal["linear", "cosine"] = "linear", timesteps: int = 1000,
                 variance: Literal["small", "large"] = "large", weighting: Literal["elbo", "simple"] = "elbo",
                 hidden: Sequence[int] = (128, 128, 128)) -> None:
        super().__init__()
        shape = (data_shape,) if isinstance(data_shape, (int, np.integer)) else tuple(data_shape)
        if not shape or not all(_positive_int(s) for s in shape):
            raise ConfigError(f"data_shape: must be positive integers, got {data_shape!r}.")
        if weighting not in WEIGHTINGS:
            raise ConfigError(f"weighting: must be one of {list(WEIGHTINGS)}, got {weighting!r}.")
        if isinstance(network, str):
            raise ConfigError(f"network: this model was saved with a custom network ({network}), which a run "
                              "folder cannot rebuild; construct the Diffusion yourself: lk.load(path, model=...).")
        if network is not None and not isinstance(network, nn.Module):
            raise ConfigError(f"network: must be a torch.nn.Module with forward(x, t), got {type(network).__name__}.")
        self.data_shape = tuple(int(s) for s in shape)
        custom = None if network is None else f"custom {type(network).__name__}"
        self.process = DiffusionProcess(schedule, timesteps, variance)
        if network is None:
            network = ScoreMLP(math.prod(self.data_shape), hidden=[int(h) for h in hidden]) \
                if len(self.data_shape) == 1 else ScoreUNet(self.data_shape)
        self.network = network
        self.weighting = weighting
        # The training data's range, recorded by prepare(): samplers clip Tweedie's estimate of x_0 to it.
        self.register_buffer("data_range", torch.tensor([-math.inf, math.inf]))
        self._check_network()
        self.init_args = {"data_shape": list(self.data_shape),
                          "network": custom,
                          "schedule": schedule, "timesteps": timesteps, "variance": variance,
                          "weighting": weighting, "hidden": [int(h) for h in hidden]}

    @property
    def timesteps(self) -> int:
        return self.process.timesteps

    @property
    def rank(self) -> int:
        return len(self.data_shape)

    def _dtype(self) -> torch.dtype:
        return self.process.betas.dtype

    def _check_network(self) -> None:
        x = torch.zeros((2,) + self.data_shape, dtype=self._dtype())
        try:
            with torch.no_grad():
                out = self.network(x, torch.zeros(2, dtype=torch.long))
        except Exception as error:  # noqa: BLE001 - any failure means the network does not fit the data shape
            raise ConfigError(f"network: cannot take x of shape (batch, *{self.data_shape}) and t of shape "
                              f"(batch,) ({type(error).__name__}: {error}).") from error
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            raise ConfigError(f"network: must return a noise prediction shaped like x, {tuple(x.shape)}; got "
                              f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}.")

    # -- data -----------------------------------------------------------------------------------
    def as_tensor(self, data: Any, name: str = "data") -> torch.Tensor:
        """Data as a ``(N, *data_shape)`` tensor, validated."""
        value = data.detach().cpu().numpy() if isinstance(data, torch.Tensor) else data
        try:
            array = np.asarray(value, dtype=float)
        except (TypeError, ValueError) as error:
            raise DataError(f"{name}: could not be read as numbers ({error}).") from error
        size = math.prod(self.data_shape)
        if array.ndim == 2 and self.rank > 1 and array.shape[1] == size:
            array = array.reshape((-1,) + self.data_shape)
        if array.ndim != self.rank + 1 or array.shape[1:] != self.data_shape:
            raise DataError(f"{name}: expected shape (N, *{self.data_shape}) or (N, {size}), got {array.shape}.")
        if array.shape[0] == 0:
            raise DataError(f"{name}: is empty; pass at least one data point.")
        if not np.isfinite(array).all():
            raise DataError(f"{name}: contains NaN or infinite values; drop or impute them.")
        return torch.as_tensor(array, dtype=self._dtype(), device=self.data_range.device)

    def prepare(self, data: Any) -> dict[str, Any]:
        """``{"X": (N, *data_shape), "subsample_size": None}``; also records the data's range (buffer
        ``data_range``), to which samplers clip Tweedie's estimate of x_0."""
        X = self.as_tensor(data)
        self.data_range.copy_(torch.stack([X.min(), X.max()]))
        return {"X": X, "subsample_size": None}

    def dims(self, kwargs: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
        features = ("feature",) if self.rank == 1 else tuple(f"obs_dim_{i}" for i in range(self.rank))
        return {"time": ("obs_id",), **{name: ("obs_id",) + features for name in ("x_T", "x_t", "x_prev", "obs")}}

    # -- Pyro model and guide -------------------------------------------------------------------
    def _step(self, time: torch.Tensor) -> torch.Tensor:
        return (time * self.timesteps).long().clamp(0, self.timesteps - 1)

    def _scale(self, t: torch.Tensor) -> torch.Tensor | float:
        if self.weighting == "simple":
            return 1.0 / self.process.snr_weight(t)
        return float(self.timesteps)

    def _common(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The sites both model and guide share: ``time``, ``x_T`` (guide: its forward marginal) and ``x_t``."""
        one = torch.ones((), dtype=x0.dtype, device=x0.device)
        time = pyro.sample("time", dist.Uniform(0 * one, one))
        t = self._step(time)
        mean, std = self.process.q_mean_std(x0, t)
        return t, pyro.sample("x_t", dist.Normal(mean, std).to_event(self.rank))

    def _prior_site(self, x0: torch.Tensor | None) -> None:
        if x0 is None:  # the model: N(0, I)
            zero = torch.zeros(self.data_shape, dtype=self._dtype(), device=self.data_range.device)
            pyro.sample("x_T", dist.Normal(zero, 1.0).to_event(self.rank))
            return
        last = torch.full(x0.shape[:x0.dim() - self.rank], self.timesteps - 1, device=x0.device)
        mean, std = self.process.q_mean_std(x0, last)
        pyro.sample("x_T", dist.Normal(mean, std).to_event(self.rank))

    def model(self, X: torch.Tensor, subsample_size: int | None = None) -> None:
        """The reverse process p(x_{t-1} | x_t) at a uniformly drawn step, and the decoder at t = 0."""
        with pyro.plate("data", X.shape[0], subsample_size=subsample_size) as index:
            x0 = X[index]
            self._prior_site(None)
            # x_t's density is the forward marginal, as in the guide: the two cancel in the ELBO.
            t, xt = self._common(x0)
            mean, variance, _ = self.process.p_mean_variance(xt, t, self.network(xt, t))
            with poutine.scale(scale=self._scale(t)):
                with poutine.mask(mask=t > 0):
                    pyro.sample("x_prev", _normal(mean, variance, self.rank))
                with poutine.mask(mask=t == 0):
                    pyro.sample("obs", _normal(mean, variance, self.rank), obs=x0)

    def guide(self, X: torch.Tensor, subsample_size: int | None = None) -> None:
        """The fixed forward process: x_T, x_t ~ q(· | x_0) and x_{t-1} ~ q(x_{t-1} | x_t, x_0)."""
        with pyro.plate("data", X.shape[0], subsample_size=subsample_size) as index:
            x0 = X[index]
            self._prior_site(x0)
            t, xt = self._common(x0)
            mean, variance = self.process.q_posterior(x0, xt, t)
            variance = torch.where(variance > 0, variance, torch.ones_like(variance))  # t = 0: masked out
            with poutine.scale(scale=self._scale(t)), poutine.mask(mask=t > 0):
                pyro.sample("x_prev", _normal(mean, variance, self.rank))

    # -- using a trained model ------------------------------------------------------------------
    def clip_range(self) -> tuple[float, float] | None:
        """The training data's range (None before :meth:`prepare` has seen data)."""
        low, high = self.data_range.tolist()
        return (low, high) if math.isfinite(low) and math.isfinite(high) else None

    @torch.no_grad()
    def sample(self, n: int, *, num_steps: int | None = None, eta: float = 0.0, clip: bool = False,
               seed: int | None = None) -> torch.Tensor:
        """``n`` draws ``(n, *data_shape)``: ancestral DDPM over all T steps (``num_steps=None``) or
        DDIM on ``num_steps`` evenly spaced steps (deterministic for ``eta=0``). ``clip=True`` clamps
        Tweedie's estimate of x_0 to the training data's range at each step."""
        if not _positive_int(n):
            raise ConfigError(f"n: must be a positive integer, got {n!r}.")
        bounds = self.clip_range() if clip else None
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            noise = torch.randn((int(n),) + self.data_shape, dtype=self._dtype(), device=self.data_range.device)
            if num_steps is None:
                return self.process.ddpm(self.network, noise, bounds)
            return self.process.ddim(self.network, noise, num_steps, eta, bounds)

    def prior_kl(self, x0: torch.Tensor) -> torch.Tensor:
        """KL(q(x_T | x_0) || N(0, I)), ``x0.shape[:-rank]``."""
        last = torch.full(x0.shape[:x0.dim() - self.rank], self.timesteps - 1, device=x0.device)
        mean, std = self.process.q_mean_std(x0, last)
        kl = kl_divergence(dist.Normal(mean, std), dist.Normal(torch.zeros_like(mean), 1.0))
        return kl.flatten(-self.rank).sum(-1)

    def step_term(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The bound's term of step t with x_t = q_sample(x_0, t, noise): the closed-form
        KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0, -log p(x_0 | x_1) at t = 0.
        Shapes: ``x0``, ``noise`` ``(*batch, *data_shape)``, ``t`` ``batch`` → ``batch``."""
        xt = self.process.q_sample(x0, t, noise)
        mean_p, var_p, _ = self.process.p_mean_variance(xt, t, self.network(xt, t))
        mean_q, var_q = self.process.q_posterior(x0, xt, t)
        first = (t == 0).reshape(t.shape + (1,) * self.rank)
        p = dist.Normal(mean_p, var_p.sqrt())
        kl = kl_divergence(dist.Normal(mean_q, torch.where(first, 1.0, var_q).sqrt()), p)
        return torch.where(first, -p.log_prob(x0), kl).flatten(-self.rank).sum(-1)

    def log_prob_bound(self, data: Any, num_time_samples: int | None = None, seed: int | None = 0) -> torch.Tensor:
        """The variational lower bound on log p(x) per point, ``(N,)``, estimated with
        ``num_time_samples`` stratified time steps (None: all) and one noise draw each; its
        expectation is ≤ log p(x). See :class:`DiffusionPrior` for the estimator."""
        X = self.as_tensor(data)
        with torch.no_grad():
            return DiffusionPrior(self, num_time_samples=num_time_samples, seed=seed).log_prob(X)


class DiffusionPrior(dist.TorchDistribution):
    r"""A trained :class:`Diffusion` as a Pyro distribution: ``pyro.sample("x", DiffusionPrior(trained))``.

    :meth:`sample` runs the reverse process (ancestral DDPM, or DDIM with ``num_steps``);
    :meth:`log_prob` is **a lower bound** on log p(x), not the log density: the diffusion model's
    variational bound ``-KL(q(x_T | x) || N(0, I)) - L_0(x) - Σ_{t >= 1} L_t(x)``. The decoder term L_0
    (large and of the other sign) is always computed; the sum over the other steps is estimated by
    ``((T - 1) / K) Σ_k L_{t_k}`` over K = ``num_time_samples`` stratified steps (one uniform draw in each
    of K equal blocks of 1 .. T - 1), with one noise draw ε_k for each x_{t_k}. With ``seed`` set, the steps
    and noise draws are drawn once and reused for every point and call (common random numbers): log_prob
    is then a fixed, smooth function of x, as NUTS needs; its expectation over seeds is the bound. With
    ``seed=None`` they are drawn afresh for each point at every call (an unbiased estimate of the bound;
    for SVI). K = T - 1 (``None``) uses every step once, K = m (T - 1) every step m times.

    The network is a frozen copy (no engine trains it, and constant weights let the MCMC engine trace
    the potential).

    Args:
        diffusion: a trained :class:`Diffusion`.
        num_time_samples: K; None for T - 1 (every step once).
        seed: seed of the common random numbers, or None for fresh ones at each call.
        num_steps: sampling: None for DDPM over all steps, or the number of DDIM steps.
        eta: DDIM's noise level (0: deterministic).
        clip: sampling: clamp Tweedie's estimate of x_0 to the training data's range.

    Shapes:
        ``batch_shape`` ``()``, ``event_shape`` ``data_shape``; ``log_prob(x)``: ``x`` ``(*batch,
        *data_shape)`` → ``batch``.

    Example:
        >>> prior = DiffusionPrior(Diffusion(2, timesteps=10, hidden=(8,)), num_time_samples=4)
        >>> prior.sample((3,)).shape, prior.log_prob(torch.zeros(5, 2)).shape
        (torch.Size([3, 2]), torch.Size([5]))
    """

    arg_constraints: dict[str, constraints.Constraint] = {}
    has_rsample = False

    def __init__(self, diffusion: Diffusion, *, num_time_samples: int | None = 32, seed: int | None = 0,
                 num_steps: int | None = None, eta: float = 0.0, clip: bool = False,
                 validate_args: bool | None = None) -> None:
        if not isinstance(diffusion, Diffusion):
            raise ConfigError(f"diffusion: must be a latentkit Diffusion, got {type(diffusion).__name__}.")
        if num_time_samples is not None and not _positive_int(num_time_samples):
            raise ConfigError(f"num_time_samples: must be a positive integer or None, got {num_time_samples!r}.")
        if num_steps is not None:
            diffusion.process.ddim_steps(num_steps)  # validates
        self.diffusion = copy.deepcopy(diffusion).requires_grad_(False).eval()
        T = diffusion.timesteps
        self.num_time_samples = T - 1 if num_time_samples is None else int(num_time_samples)
        self.seed, self.num_steps, self.eta, self.clip = seed, num_steps, float(eta), bool(clip)
        self.times: torch.Tensor | None = None
        self.noise: torch.Tensor | None = None
        if seed is not None:
            generator = torch.Generator().manual_seed(int(seed))
            self.times, self.noise = self._draw(generator)
        super().__init__(torch.Size(), torch.Size(diffusion.data_shape), validate_args=validate_args)

    @property
    def support(self) -> constraints.Constraint:  # type: ignore[override]
        return constraints.independent(constraints.real, self.diffusion.rank)

    def _draw(self, generator: torch.Generator | None, batch: tuple[int, ...] = ()
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Steps ``(K + 1, *batch)``: 0, then one uniform step in each of K equal blocks of 1 .. T - 1; and
        standard normal noise ``(K + 1, *batch, *data_shape)``."""
        T, K = self.diffusion.timesteps, self.num_time_samples
        dtype, device = self.diffusion._dtype(), self.diffusion.data_range.device
        shape = (K,) + batch
        u = torch.rand(shape, generator=generator, dtype=torch.float64)
        blocks = torch.arange(K, dtype=torch.float64).reshape((K,) + (1,) * len(batch))
        times = 1 + ((blocks + u) * (T - 1) / K).long().clamp(max=T - 2)
        times = torch.cat([torch.zeros((1,) + batch, dtype=torch.long), times])
        noise = torch.randn((K + 1,) + batch + self.diffusion.data_shape, generator=generator, dtype=torch.float64)
        return times.to(device), noise.to(dtype=dtype, device=device)

    def expand(self, batch_shape: Any, _instance: Any = None) -> dist.Distribution:
        return dist.ExpandedDistribution(self, batch_shape)

    def sample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> torch.Tensor:
        shape = torch.Size(sample_shape)
        n = max(1, math.prod(shape))
        diffusion = self.diffusion
        noise = torch.randn((n,) + diffusion.data_shape, dtype=diffusion._dtype(), device=diffusion.data_range.device)
        clip = diffusion.clip_range() if self.clip else None
        if self.num_steps is None:
            x = diffusion.process.ddpm(diffusion.network, noise, clip)
        else:
            x = diffusion.process.ddim(diffusion.network, noise, self.num_steps, self.eta, clip)
        return x.reshape(shape + diffusion.data_shape)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        diffusion = self.diffusion
        K, batch = self.num_time_samples, tuple(value.shape[:value.dim() - diffusion.rank])
        ones = (1,) * len(batch)
        if self.times is None or self.noise is None:  # fresh draws for each point
            times, noise = self._draw(None, batch)
        else:  # common random numbers: the same draws for every point
            times = self.times.reshape((K + 1,) + ones).expand((K + 1,) + batch)
            noise = self.noise.reshape((K + 1,) + ones + diffusion.data_shape)
        # All steps in one network call: a leading dimension of size K + 1.
        x = value.expand((K + 1,) + value.shape)
        terms = diffusion.step_term(x, times, noise.expand_as(x))
        return -(diffusion.prior_kl(value) + terms[0] + (diffusion.timesteps - 1) / K * terms[1:].sum(0))
