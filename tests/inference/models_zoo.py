"""Plain Pyro models used across the engine tests."""

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.ops.indexing import Vindex

#: Eight schools (Rubin 1981): estimated effects and their standard errors.
SCHOOLS_Y = [28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0]
SCHOOLS_SIGMA = [15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0]


def eight_schools(sigma, y=None):
    """Non-centred eight schools."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("school", len(sigma)):
        theta_raw = pyro.sample("theta_raw", dist.Normal(0.0, 1.0))
        theta = pyro.deterministic("theta", mu + tau * theta_raw)
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)


def enumerated_mixture(y):
    """1-D two-component mixture with ordered means (identifiable), discrete sites enumerated."""
    weights = pyro.sample("weights", dist.Dirichlet(torch.ones(2)))
    locs = pyro.sample("locs", dist.ImproperUniform(constraints.ordered_vector, (), (2,)))
    pyro.factor("locs_prior", dist.Normal(0.0, 10.0).log_prob(locs).sum(-1))
    scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", len(y)):
        z = pyro.sample("z", dist.Categorical(weights), infer={"enumerate": "parallel"})
        pyro.sample("y", dist.Normal(Vindex(locs)[..., z], scale), obs=y)


def markov_chain(y):
    """A 2-state HMM written with pyro.markov over time: states enumerated and recycled."""
    probs = pyro.sample("probs", dist.Dirichlet(torch.tensor([[8.0, 2.0], [2.0, 8.0]])).to_event(1))
    locs = pyro.sample("locs", dist.ImproperUniform(constraints.ordered_vector, (), (2,)))
    x = 0
    for t in pyro.markov(range(len(y))):
        x = pyro.sample(f"x_{t}", dist.Categorical(Vindex(probs)[..., x, :]),
                        infer={"enumerate": "parallel"})
        pyro.sample(f"y_{t}", dist.Normal(Vindex(locs)[..., x], 1.0), obs=y[t])


def nested_plates_with_mask(y, mask):
    """Group means in nested plates; masked observations do not count."""
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    with pyro.plate("group", y.shape[1], dim=-1):
        alpha = pyro.sample("alpha", dist.Normal(mu, 1.0))
        with pyro.plate("item", y.shape[0], dim=-2):
            with pyro.poutine.mask(mask=mask):
                pyro.sample("y", dist.Normal(alpha, 1.0), obs=y)
