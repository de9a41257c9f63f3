"""GANPrior: the posterior over a generator's latent, checked against a linear generator's closed form."""

import numpy as np
import pytest
import torch
from torch import nn

import latentkit as lk
from latentkit.errors import ConfigError, DataError

L, D, SCALE = 2, 5, 0.5


def linear_problem():
    """G(z) = W z + b, two points, the second with two entries unobserved."""
    torch.manual_seed(0)
    generator = nn.Linear(L, D)
    with torch.no_grad():
        generator.weight.copy_(torch.randn(D, L) * 0.6)
        generator.bias.copy_(torch.randn(D))
    z_true = torch.randn(2, L)
    y = generator(z_true).detach() + SCALE * torch.randn(2, D)
    mask = torch.ones(2, D, dtype=torch.bool)
    mask[1, [0, 3]] = False
    y[1, 0] = float("nan")  # unobserved entries may be NaN
    return generator, {"y": y, "mask": mask}


def exact_posterior(generator, data):
    """z | y_o ~ N(m, S) with S = (I + W_o^T W_o / s^2)^-1 and m = S W_o^T (y_o - b_o) / s^2, per point."""
    W, b = generator.weight.detach(), generator.bias.detach()
    means, covs = [], []
    for y, m in zip(data["y"], data["mask"], strict=True):
        Wo = W[m]
        S = torch.linalg.inv(torch.eye(L) + Wo.T @ Wo / SCALE ** 2)
        means.append(S @ Wo.T @ (y[m] - b[m]) / SCALE ** 2)
        covs.append(S)
    return torch.stack(means).numpy(), torch.stack(covs).numpy()


def test_nuts_matches_the_closed_form_posterior():
    generator, data = linear_problem()
    prior = lk.models.GANPrior(generator, noise_scale=SCALE)
    assert not list(prior.parameters()) and generator.weight.requires_grad  # a frozen copy; the original untouched
    res = lk.fit(prior, data, engine="nuts", num_chains=2, num_warmup=200, num_samples=300, seed=0, progress=False)
    summary = res.summary()
    assert summary["ess_bulk"].min() > 100 and summary["r_hat"].max() < 1.05
    mean, cov = exact_posterior(generator, data)
    z = res.posterior["z"]  # (chain, draw, N, L)
    mcse = summary["mcse_mean"].to_numpy().reshape(mean.shape)
    assert (np.abs(z.mean((0, 1)) - mean) < 5 * mcse).all()
    # ESS > 100: each sd is estimated to about 1 / sqrt(2 ESS) < 7% (relative); 25% is > 3.5 SE
    np.testing.assert_allclose(z.std((0, 1)), np.sqrt(np.diagonal(cov, axis1=1, axis2=2)), rtol=0.25)
    x = prior.generate(z)
    assert x.shape == (2, 300, 2, D)


def test_svi_multivariate_normal_guide_matches_the_closed_form_posterior():
    generator, data = linear_problem()
    prior = lk.models.GANPrior(generator, noise_scale=SCALE)
    res = lk.fit(prior, data, engine="svi", guide="multivariate_normal", steps=1000, learning_rate=0.005,
                 num_samples=4000, seed=0, progress=False)
    mean, cov = exact_posterior(generator, data)
    z = res.posterior["z"].reshape(-1, 2, L)
    sd = np.sqrt(np.diagonal(cov, axis1=1, axis2=2))
    # The guide family holds the exact posterior; what remains is Adam's stationary noise at a constant step
    # size (seeds 0-2 measured: means within 0.13 sd, sds within 8%) plus the draws' Monte Carlo error
    # (5 sd / sqrt(4000) = 0.08 sd): bounds of 0.25 sd and 20% leave room for both.
    assert (np.abs(z.mean(0) - mean) < 0.25 * sd).all()
    np.testing.assert_allclose(z.std(0), sd, rtol=0.2)
    for n in range(2):  # the correlation of the two latent coordinates too
        exact = cov[n, 0, 1] / (sd[n, 0] * sd[n, 1])
        assert abs(np.corrcoef(z[:, n].T)[0, 1] - exact) < 0.15  # measured: within 0.075


def test_data_forms():
    prior = lk.models.GANPrior(nn.Sequential(nn.Linear(3, 4), nn.Unflatten(1, (1, 2, 2))))
    assert prior.latent_dim == 3 and prior.output_shape == (1, 2, 2)
    one = prior.prepare(np.ones((1, 2, 2)))  # a single point
    assert one["y"].shape == (1, 1, 2, 2) and bool(one["mask"].all())
    shared = prior.prepare({"y": np.ones((3, 1, 2, 2)), "mask": np.array([[[1, 0], [0, 1]]])})
    assert shared["mask"].shape == (3, 1, 2, 2) and int(shared["mask"].sum()) == 6
    assert prior.dims(shared)["obs"] == ("obs_id", "obs_dim_0", "obs_dim_1", "obs_dim_2")


def test_bad_input():
    prior = lk.models.GANPrior(nn.Linear(2, 3))
    with pytest.raises(DataError, match=r"generator outputs points of shape \(3,\)"):
        prior.prepare(np.zeros((4, 5)))
    with pytest.raises(DataError, match="NaN"):
        prior.prepare(np.array([[0.0, np.nan, 1.0]]))
    with pytest.raises(DataError, match="NaN"):
        lk.fit(prior, np.array([[0.0, np.nan, 1.0]]), engine="svi", steps=1, progress=False)
    with pytest.raises(DataError, match="mask: expected shape"):
        prior.prepare({"y": np.zeros((4, 3)), "mask": np.ones((4, 2), dtype=bool)})
    with pytest.raises(DataError, match="keys"):
        prior.prepare({"x": np.zeros((4, 3))})
    with pytest.raises(DataError, match="cannot take inputs"):
        lk.models.GANPrior(nn.Linear(2, 3), latent_dim=4)
    with pytest.raises(ConfigError, match="latent_dim: cannot be inferred"):
        lk.models.GANPrior(nn.Tanh())
    with pytest.raises(ConfigError, match="noise"):
        lk.models.GANPrior(nn.Linear(2, 3), noise="laplace")
    with pytest.raises(ConfigError, match="noise_scale"):
        lk.models.GANPrior(nn.Linear(2, 3), noise_scale=0.0)
    with pytest.raises(ConfigError, match="generator"):
        lk.models.GANPrior("custom Linear")
