"""Simulation-based calibration: uniform ranks for a calibrated engine, not for a shrunken one."""

import math

import matplotlib.pyplot as plt
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from matplotlib.figure import Figure

import latentkit as lk
from latentkit.diagnostics import sbc
from latentkit.errors import ConfigError
from latentkit.inference import Result


def conjugate(n, y=None):
    """mu ~ Normal(0, 1), y_i ~ Normal(mu, 1): the posterior is Normal(sum(y) / (n + 1), 1 / sqrt(n + 1))."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", n):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def posterior_scale(n: int) -> float:
    return 1 / math.sqrt(n + 1)


class ExactEngine:
    """Draws from the exact posterior of ``conjugate``, its scale multiplied by ``shrink``."""

    def __init__(self, shrink: float = 1.0, num_samples: int = 200) -> None:
        self.shrink, self.num_samples = shrink, num_samples

    def fit(self, model, data, *, seed, progress):
        y = torch.as_tensor(data["y"])
        loc = float(y.sum()) / (len(y) + 1)
        scale = self.shrink * posterior_scale(len(y))
        draws = np.random.default_rng(seed).normal(loc, scale, (2, self.num_samples // 2))
        return Result(posterior={"mu": draws}, config={"engine": {"name": "exact"}})


@pytest.mark.parametrize(("shrink", "uniform"), [(1.0, True), (0.5, False)])
def test_sbc_with_an_exact_engine(shrink, uniform):
    result = sbc(conjugate, {"n": 5, "y": None}, engine=ExactEngine(shrink), n_simulations=100)
    assert result.ranks.shape == (100, 1) and list(result.ranks.columns) == ["mu"]
    assert result.ranks["mu"].between(0, 99).all()
    assert result.passed == uniform
    assert "SBC: 100 simulations" in str(result)
    assert isinstance(result.plot(), Figure)
    plt.close("all")


def analytic_guide(shrink):
    """The exact posterior of ``conjugate`` plus a learnt offset (optimal at 0), its scale
    multiplied by ``shrink``."""
    def guide(n, y=None):
        offset = pyro.param("offset", torch.tensor(0.0))
        pyro.sample("mu", dist.Normal(y.sum() / (n + 1) + offset, shrink * posterior_scale(n)))

    return guide


@pytest.mark.parametrize(("shrink", "uniform"), [(1.0, True), (0.4, False)])
def test_sbc_with_svi_and_a_guide_of_shrunken_scale(shrink, uniform):
    result = sbc(conjugate, {"n": 5, "y": None}, engine="svi", n_simulations=60, seed=1,
                 guide=analytic_guide(shrink), steps=5, learning_rate=0.001, num_samples=39, num_rank_draws=39)
    assert result.passed == uniform


def test_sbc_of_a_built_in_model_in_two_processes():
    X = np.random.default_rng(0).normal(size=(30, 2))
    model = lk.models.GaussianMixture(n_components=1, covariance="diag")
    result = sbc(model, X, engine="svi", n_simulations=2, n_jobs=2, num_rank_draws=19,
                 steps=30, num_samples=40, learning_rate=0.05)
    assert result.ranks.shape == (2, 5)  # weights[0], locs[0,0], locs[0,1], scales[0,0], scales[0,1]
    assert "locs[0,1]" in result.ranks.columns and result.ranks.to_numpy().max() <= 19
    assert len(result.min_ess) == 2


def test_sbc_errors():
    with pytest.raises(ConfigError, match="no observed site"):
        sbc(conjugate, {"n": 5, "y": torch.zeros(5)}, engine=ExactEngine(), n_simulations=3,
            observed={})
    with pytest.raises(ConfigError, match="num_rank_draws"):
        sbc(conjugate, {"n": 5, "y": None}, engine=ExactEngine(num_samples=10), n_simulations=3)
