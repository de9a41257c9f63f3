"""Simulation-based calibration (Talts et al. 2018) of NUTS with Stan's warm-up.

Every chain gets its own simulated data set, so one vectorised run is a whole SBC study: draw
parameters from the prior, simulate data, sample the posterior of each data set with one
chain, and rank the true parameter among thinned posterior draws. A calibrated sampler gives
uniform ranks; the chi-square test over 10 bins must not reject at the 0.1% level (with a
Bonferroni correction over parameters), and a deliberately wrong posterior must be rejected.
"""

import math

import torch
from scipy.stats import chisquare

from latentkit.inference.kernels import run_chains

NUM_SIMULATIONS = 200
BINS = 10


RANKED_DRAWS = 99  # ranks 0..99: ten equally likely values per bin


def uniformity_p(draws: torch.Tensor, truth: torch.Tensor, thin: int) -> float:
    """Chi-square p-value of the ranks of each truth (S,) among 99 of its chain's draws (S, N),
    thinned by ``thin``, against the discrete uniform, in ``BINS`` bins."""
    rank = (draws[:, ::thin][:, :RANKED_DRAWS] < truth[:, None]).sum(-1)
    counts = torch.histc(rank.double(), bins=BINS, min=0, max=RANKED_DRAWS + 1)
    return float(chisquare(counts.numpy()).pvalue)


def normal_potential(y: torch.Tensor, prior_scale: float):
    """mu ~ N(0, prior_scale), y_i ~ N(mu, 1): U(mu) per chain, with data y of shape (S, n)."""

    def potential(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu = z[:, 0]
        u = 0.5 * (mu / prior_scale) ** 2 + 0.5 * ((y - mu[:, None]) ** 2).sum(-1)
        grad = mu / prior_scale**2 - (y - mu[:, None]).sum(-1)
        return u, grad[:, None]

    return potential


def sample(potential, dim: int, seed: int, num_warmup: int = 300, num_samples: int = 1000,
           num_simulations: int = NUM_SIMULATIONS) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    z0 = torch.rand(num_simulations, dim, generator=generator) * 4 - 2
    return run_chains(potential, z0, algorithm="nuts", num_warmup=num_warmup, num_samples=num_samples,
                      generator=generator, progress=False).samples


def test_conjugate_normal_ranks_are_uniform_and_a_wrong_posterior_is_caught():
    generator = torch.Generator().manual_seed(11)
    mu = torch.randn(NUM_SIMULATIONS, generator=generator)
    y = mu[:, None] + torch.randn(NUM_SIMULATIONS, 5, generator=generator)
    draws = sample(normal_potential(y, 1.0), 1, seed=0)[..., 0]
    assert uniformity_p(draws, mu, thin=10) > 1e-3
    # The posterior under a prior three times too narrow is pulled towards 0, away from truths
    # drawn from the real prior: their ranks pile up at both ends.
    wrong = sample(normal_potential(y, 0.3), 1, seed=0)[..., 0]
    assert uniformity_p(wrong, mu, thin=10) < 1e-6


def test_eight_schools_ranks_are_uniform():
    num = 120
    sigma = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])
    generator = torch.Generator().manual_seed(12)
    mu = 5.0 * torch.randn(num, generator=generator)
    tau = 5.0 * torch.tan(math.pi / 2 * torch.rand(num, generator=generator))  # HalfCauchy(5)
    theta_raw = torch.randn(num, 8, generator=generator)
    y = mu[:, None] + tau[:, None] * theta_raw + sigma * torch.randn(num, 8, generator=generator)

    def potential(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = z.detach().requires_grad_(True)
        m, log_t, raw = z[:, 0], z[:, 1], z[:, 2:]
        t = log_t.exp()
        log_p = (-0.5 * (m / 5.0) ** 2 - torch.log1p((t / 5.0) ** 2) + log_t - 0.5 * (raw**2).sum(-1)
                 - 0.5 * (((y - m[:, None] - t[:, None] * raw) / sigma) ** 2).sum(-1))
        (grad,) = torch.autograd.grad(-log_p.sum(), z)
        return -log_p.detach(), grad

    draws = sample(potential, 10, seed=1, num_warmup=150, num_samples=297, num_simulations=120)
    p_values = [uniformity_p(draws[..., 0], mu, thin=3), uniformity_p(draws[..., 1].exp(), tau, thin=3),
                uniformity_p(draws[..., 2], theta_raw[:, 0], thin=3)]
    assert min(p_values) > 1e-3 / 3, p_values
