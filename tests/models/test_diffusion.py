"""Diffusion models: the process, the SVI model/guide pair, and DiffusionPrior inside other models."""

import copy
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import TraceMeanField_ELBO
from scipy.stats import multivariate_normal

import latentkit as lk
from latentkit.errors import ConfigError, DataError
from latentkit.models.diffusion_process import DiffusionProcess
from latentkit.nn import GaussianNoisePredictor

MEAN = torch.tensor([1.0, -0.5])
COV = torch.tensor([[1.0, 0.6], [0.6, 0.8]])


def gaussian_diffusion(timesteps: int) -> lk.models.Diffusion:
    """A diffusion model whose network is the exact noise prediction of N(MEAN, COV)."""
    process = DiffusionProcess("linear", timesteps)
    return lk.models.Diffusion(2, network=GaussianNoisePredictor(MEAN, COV, process.alphas_cumprod),
                               timesteps=timesteps)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_forward_posterior_is_bayes_rule(schedule):
    # q(x_{t-1} | x_t, x_0) from q(x_t | x_{t-1}) q(x_{t-1} | x_0), by completing the square, at every t > 0.
    process = DiffusionProcess(schedule, 50)
    assert process.betas.dtype == torch.float64 and bool((process.betas > 0).all() and (process.betas < 1).all())
    x0, xt = torch.tensor([0.7]), torch.tensor([-0.3])
    for step in range(1, 50):
        t = torch.tensor([step])
        a, abar_prev = 1 - process.betas[step], process.alphas_cumprod_prev[step]
        precision = a / process.betas[step] + 1 / (1 - abar_prev)
        mean = (a.sqrt() * xt / process.betas[step] + abar_prev.sqrt() * x0 / (1 - abar_prev)) / precision
        got_mean, got_var = process.q_posterior(x0, xt, t)
        torch.testing.assert_close(got_mean, mean, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(got_var, 1 / precision.reshape(1), rtol=1e-9, atol=1e-12)


def _moments_match(samples: torch.Tensor) -> None:
    """Mean and covariance of n draws against N(MEAN, COV), within 4.5 Monte Carlo standard errors."""
    n = samples.shape[0]
    var = torch.diag(COV)
    assert ((samples.mean(0) - MEAN).abs() < 4.5 * (var / n).sqrt()).all(), samples.mean(0)
    # Var of a sample covariance entry: (S_ii S_jj + S_ij²) / n for Gaussian data.
    cov = torch.cov(samples.T)
    se = ((var[:, None] * var[None, :] + COV ** 2) / n).sqrt()
    assert ((cov - COV).abs() < 4.5 * se).all(), cov


def test_ddpm_and_ddim_with_the_exact_network_reproduce_the_gaussian():
    diffusion = gaussian_diffusion(1000)
    _moments_match(diffusion.sample(4000, seed=0))
    _moments_match(diffusion.sample(4000, num_steps=200, seed=1))  # 50 steps: 5% too little variance
    prior = lk.models.DiffusionPrior(diffusion, num_steps=200)
    _moments_match(prior.sample((4000,)))


def test_bound_of_the_exact_gaussian_is_below_its_log_density():
    diffusion = gaussian_diffusion(1000)
    x = torch.distributions.MultivariateNormal(MEAN, COV).sample((100,))
    exact = torch.distributions.MultivariateNormal(MEAN, COV).log_prob(x).mean()
    gaps = torch.stack([exact - diffusion.log_prob_bound(x, num_time_samples=None, seed=None).mean()
                        for _ in range(30)])
    se = gaps.std() / math.sqrt(len(gaps))
    # A bound: the gap, KL(q(x_1:T | x) || p(x_1:T | x)), is positive; with the exact mean but fixed
    # isotropic reverse variances it stays of order one nat (measured: 0.2).
    assert 3 * se < gaps.mean() < 0.5, (gaps.mean(), se)


def test_svi_elbo_is_an_unbiased_estimate_of_the_bound():
    diffusion = lk.models.Diffusion(2, timesteps=8, hidden=(16,))
    X = torch.randn(400, 2)
    kwargs = diffusion.prepare(X)
    with torch.no_grad():
        elbo = torch.tensor([-TraceMeanField_ELBO().loss(diffusion.model, diffusion.guide, **kwargs)
                             for _ in range(200)]) / len(X)
        bound = torch.stack([diffusion.log_prob_bound(X, num_time_samples=None, seed=None).mean()
                             for _ in range(50)])
    se = math.sqrt(elbo.var() / len(elbo) + bound.var() / len(bound))
    assert abs(elbo.mean() - bound.mean()) < 4 * se, (elbo.mean(), bound.mean(), se)


def test_training_on_a_gaussian_mixture():
    rng = np.random.default_rng(0)
    locs, scale = np.array([[-1.5, 0.0], [1.5, 0.5]]), 0.4

    def draw(n):
        return rng.normal(size=(n, 2)) * scale + locs[(rng.random(n) < 0.5).astype(int)]

    X, test = draw(2000), draw(400)
    exact = np.logaddexp(*(multivariate_normal(loc, scale ** 2).logpdf(test) for loc in locs)) + math.log(0.5)
    diffusion = lk.models.Diffusion(2, timesteps=100, hidden=(64, 64))
    res = lk.fit(diffusion, X, engine="svi", elbo="meanfield", steps=1500, batch_size=256, num_samples=1,
                 learning_rate=3e-3, progress=False, seed=0)
    assert res.posterior["x_t"].shape == (1, 1, 2000, 2) and np.isfinite(res.losses).all()
    # Fresh noise for each point (seed=None), so that points' estimates are independent.
    bound = torch.stack([diffusion.log_prob_bound(test, num_time_samples=None, seed=None) for _ in range(4)]).mean(0)
    gap = exact - bound.numpy()
    se = gap.std() / math.sqrt(len(gap))
    # Below the exact log density on average (a bound), and within 0.5 nats of it after 1500 steps
    # (measured: 0.20 nats).
    assert gap.mean() > 3 * se and gap.mean() < 0.5, (gap.mean(), se)
    quality = lk.diagnostics.sample_quality(diffusion.sample(400, seed=1), test, seed=0)
    assert quality.mmd_p_value > 0.01, quality


def test_prior_inside_a_model_under_svi_and_nuts():
    prior = lk.models.DiffusionPrior(gaussian_diffusion(20), num_time_samples=5)
    y = torch.tensor([[0.5, 0.0], [1.0, 1.0]])

    def model(y):
        with pyro.plate("data", y.shape[0]):
            x = pyro.sample("x", prior)
            pyro.sample("y", dist.Normal(x, 0.5).to_event(1), obs=y)

    svi = lk.fit(model, {"y": y}, engine="svi", steps=30, num_samples=10, progress=False)
    nuts = lk.fit(model, {"y": y}, engine="nuts", num_samples=20, num_warmup=20, num_chains=2, progress=False)
    for res in (svi, nuts):
        assert np.isfinite(res.posterior["x"]).all() and res.posterior["x"].shape[2:] == (2, 2)
        assert "posterior" in res.to_arviz()
    # The bound with common random numbers is a deterministic function of x.
    x = torch.randn(3, 2)
    torch.testing.assert_close(prior.log_prob(x), prior.log_prob(x))


def test_bad_arguments():
    with pytest.raises(ConfigError, match="weighting"):
        lk.models.Diffusion(2, weighting="mse")
    with pytest.raises(ConfigError, match="schedule"):
        lk.models.Diffusion(2, schedule="sigmoid")
    with pytest.raises(ConfigError, match="network"):
        lk.models.Diffusion(3, network=torch.nn.Linear(2, 2))
    diffusion = lk.models.Diffusion(2, timesteps=10, hidden=(8,))
    with pytest.raises(DataError, match="shape"):
        diffusion.prepare(np.zeros((5, 3)))
    with pytest.raises(DataError, match="NaN"):
        diffusion.prepare(np.full((5, 2), np.nan))
    with pytest.raises(ConfigError, match="num_steps"):
        diffusion.sample(2, num_steps=11)
    with pytest.raises(ConfigError, match="num_time_samples"):
        lk.models.DiffusionPrior(diffusion, num_time_samples=0)


def test_images_use_the_unet_and_any_batch_shape():
    diffusion = lk.models.Diffusion((1, 8, 8), timesteps=20)
    twin = copy.deepcopy(diffusion)
    assert isinstance(diffusion.network, lk.nn.ScoreUNet)
    X = np.random.default_rng(0).normal(size=(12, 64))  # flattened images are accepted
    res = lk.fit(diffusion, X, engine="svi", elbo="meanfield", steps=3, batch_size=4, num_samples=2, progress=False)
    assert res.posterior["x_prev"].shape == (1, 2, 12, 1, 8, 8) and np.isfinite(res.losses).all()
    # elbo="auto" takes the model's default_elbo, the closed-form KL per step.
    auto = lk.fit(twin, X, engine="svi", steps=3, batch_size=4, num_samples=2,
                  progress=False)
    np.testing.assert_array_equal(auto.losses, res.losses)
    assert diffusion.sample(2, num_steps=5, clip=True).shape == (2, 1, 8, 8)
    prior = lk.models.DiffusionPrior(diffusion, num_time_samples=3)
    assert prior.log_prob(torch.zeros(4, 5, 1, 8, 8)).shape == (4, 5)


def test_a_loaded_run_folder_has_the_trained_network(tmp_path):
    diffusion = lk.models.Diffusion(2, timesteps=10, hidden=(8,))
    X = np.random.default_rng(0).normal(size=(16, 2))
    lk.fit(diffusion, X, engine="svi", steps=5, batch_size=8, num_samples=1, progress=False, out=tmp_path / "run")
    loaded = lk.load(tmp_path / "run").model
    torch.testing.assert_close(loaded.sample(4, seed=0), diffusion.sample(4, seed=0))
