import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

import latentkit as lk
from latentkit.errors import ConfigError


def logistic(X, y=None):
    """``X @ beta`` does not broadcast over a batch of draws: the result must be built draw by draw."""
    beta = pyro.sample("beta", dist.Normal(torch.zeros(X.shape[1]), 1.0).to_event(1))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Bernoulli(logits=X @ beta), obs=y)


def test_stock_pyro_nuts_result_of_a_non_broadcasting_model():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 3))
    y = (rng.random(40) < 1 / (1 + np.exp(-X @ np.array([1.0, -1.0, 0.5])))).astype(float)
    res = lk.fit(logistic, {"X": X, "y": y}, engine="pyro-nuts", num_warmup=30, num_samples=20, num_chains=2,
                 seed=0, progress=False)
    beta = torch.as_tensor(res.posterior["beta"])
    assert beta.shape == (2, 20, 3) and res.sample_stats["diverging"].shape == (2, 20)
    expected = dist.Bernoulli(logits=beta @ torch.as_tensor(X).T).log_prob(torch.as_tensor(y))
    np.testing.assert_allclose(res.log_likelihood["y"], expected.numpy(), rtol=1e-6)
    assert res.to_arviz().log_likelihood["y"].shape == (2, 20, 40)


def test_stock_pyro_nuts_refuses_options_it_does_not_have():
    with pytest.raises(ConfigError, match="num_steps: stock Pyro NUTS has no such option"):
        lk.fit(logistic, {"X": np.ones((3, 2)), "y": np.ones(3)}, engine="pyro-nuts", num_steps=10)
