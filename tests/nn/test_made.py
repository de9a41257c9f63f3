"""MADE: masks are autoregressive in every ordering; log_prob normalises; sampling matches it."""

import itertools

import pytest
import torch

from latentkit.errors import ConfigError
from latentkit.nn import MADE


def dependency(made: MADE, context: torch.Tensor | None) -> torch.Tensor:
    """(D_out, D_in) bool: does any parameter of output i change when input j is perturbed?

    Finite differences at a random point (numerical Jacobian)."""
    D = made.input_dim
    x = torch.randn(D)
    base = made(x, context).reshape(-1, D)
    out = torch.zeros(D, D, dtype=torch.bool)
    for j in range(D):
        moved = x.clone()
        moved[j] += 0.5
        out[:, j] = (made(moved, context).reshape(-1, D) - base).abs().amax(0) > 1e-12
    return out


@pytest.mark.parametrize("ordering", ["natural", "reverse", "random", [2, 0, 4, 1, 3, 5]])
@pytest.mark.parametrize(("likelihood", "context_dim", "hidden"), [
    ("bernoulli", 0, (12, 12)), ("gaussian", 3, (10,)), ("bernoulli", 2, ())])
def test_masks_are_autoregressive(ordering, likelihood, context_dim, hidden):
    # tanh: no unit is switched off at the test point, so every allowed dependency shows
    made = MADE(6, hidden=hidden, context_dim=context_dim, ordering=ordering, likelihood=likelihood, seed=3,
                activation="tanh")
    context = torch.randn(context_dim) if context_dim else None
    depends = dependency(made, context)
    position = made.degrees  # 1-based position of each dimension in the ordering
    earlier = position[None, :] < position[:, None]  # earlier[i, j]: j comes before i
    assert not depends[~earlier].any()  # zero Jacobian for every j at or after i
    assert depends[earlier].all()  # and every allowed dependency is present
    if isinstance(ordering, list):
        assert made.order.tolist() == ordering


def test_context_reaches_every_output():
    made = MADE(4, hidden=(8,), context_dim=2)
    x = torch.randn(4)
    a, b = made(x, torch.zeros(2)), made(x, torch.ones(2))
    assert ((a - b).abs() > 1e-12).all()


def test_orderings_are_deterministic():
    a, b = MADE(7, ordering="random", seed=1), MADE(7, ordering="random", seed=1)
    assert torch.equal(a.order, b.order) and not torch.equal(a.order, MADE(7, ordering="random", seed=2).order)


def test_log_prob_normalises_and_sampling_matches_it():
    made = MADE(3, hidden=(8, 8), ordering="reverse")
    with torch.no_grad():
        for p in made.parameters():
            p.mul_(3.0)  # sharper conditionals than at initialisation
    states = torch.tensor(list(itertools.product([0.0, 1.0], repeat=3)))
    d = made.distribution(batch_shape=(8,))
    probs = d.log_prob(states).exp().detach()
    assert torch.allclose(probs.sum(), torch.tensor(1.0), atol=1e-12)
    n = 40000
    draws = made.distribution().sample((n,))
    assert draws.shape == (n, 3)
    codes = (draws * torch.tensor([4.0, 2.0, 1.0])).sum(-1).long()
    freq = torch.bincount(codes, minlength=8).double() / n
    # binomial standard error of each frequency; 5 SE is a generous bound for 8 cells
    assert ((freq - probs).abs() <= 5 * (probs * (1 - probs) / n).sqrt() + 1e-3).all()


def test_gaussian_made_with_context_samples_and_scores():
    made = MADE(4, hidden=(16,), context_dim=2, likelihood="gaussian", ordering="random")
    context = torch.randn(5, 2)
    d = made.distribution(context)
    x = d.sample((3,))
    assert x.shape == (3, 5, 4) and d.log_prob(x).shape == (3, 5)
    assert d.expand((2, 5)).sample().shape == (2, 5, 4)


def test_bad_arguments():
    with pytest.raises(ConfigError, match="ordering"):
        MADE(3, ordering=[0, 0, 1])
    with pytest.raises(ConfigError, match="likelihood"):
        MADE(3, likelihood="poisson")
    with pytest.raises(ConfigError, match="context"):
        MADE(3, context_dim=2).distribution()
