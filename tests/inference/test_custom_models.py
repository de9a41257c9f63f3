"""Plain Pyro functions fitted with every engine: what Pyro allows in a model works."""

import itertools

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.ops.indexing import Vindex

import latentkit as lk
from latentkit.inference.target import bind
from latentkit.inference.vectorize import BatchedModel
from tests.inference.models_zoo import (
    SCHOOLS_SIGMA,
    SCHOOLS_Y,
    eight_schools,
    enumerated_mixture,
    markov_chain,
    nested_plates_with_mask,
)

SCHOOLS = {"sigma": np.array(SCHOOLS_SIGMA), "y": np.array(SCHOOLS_Y)}


def test_eight_schools_svi_mu():
    res = lk.fit(eight_schools, SCHOOLS, engine="svi", steps=3000, learning_rate=0.02,
                 num_samples=2000, progress=False)
    # The posterior mean of mu is 4.4 (sd 3.3); a mean-field normal guide is known to get the
    # mean right and the spread too small: allow 1.5 (under half a posterior sd).
    assert abs(res.posterior["mu"].mean() - 4.4) < 1.5
    assert res.posterior["theta"].shape == (1, 2000, 8)  # deterministic site in the posterior
    assert res.dims["theta"] == ["school"]
    idata = res.to_arviz()
    assert set(idata.groups()) >= {"posterior", "log_likelihood", "posterior_predictive",
                                   "observed_data", "constant_data", "optimization"}
    assert "sigma" in idata.constant_data and "y" in idata.observed_data


def _mixture_data(n=300, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.random(n) < 0.3
    return np.where(z, rng.normal(-2.0, 1.0, n), rng.normal(2.0, 1.0, n)), z


@pytest.mark.parametrize("engine", ["svi"])
def test_enumerated_mixture_needs_no_plate_nesting(engine):
    y, z = _mixture_data()
    res = lk.fit(enumerated_mixture, {"y": y}, engine=engine, steps=800, learning_rate=0.05,
                 num_samples=200, progress=False)
    locs = res.posterior["locs"].mean((0, 1))
    # 90 and 210 points with unit sd: standard errors 0.11 and 0.07.
    np.testing.assert_allclose(locs, [-2.0, 2.0], atol=0.35)
    # The weight's posterior sd is about sqrt(p (1 - p) / n) = 0.025 around the drawn fraction.
    assert abs(res.posterior["weights"].mean((0, 1))[0] - z.mean()) < 3 * np.sqrt(0.3 * 0.7 / len(z))
    assert res.posterior["z"].shape == (1, 200, 300)
    accuracy = (res.posterior["z"][0].mean(0).round() == (~z)).mean()
    assert accuracy > 0.9
    # log-likelihood per point = log sum_k w_k N(y | loc_k, scale)
    post = {k: torch.as_tensor(v[0, 0]) for k, v in res.posterior.items()}
    mix = dist.MixtureSameFamily(dist.Categorical(post["weights"]),
                                 dist.Normal(post["locs"], post["scale"]))
    np.testing.assert_allclose(res.log_likelihood["y"][0, 0], mix.log_prob(torch.as_tensor(y)), rtol=1e-8)


def masked_mixture(y, mask):
    """The enumerated mixture with some observations masked out (they must contribute nothing)."""
    weights = pyro.sample("weights", dist.Dirichlet(torch.ones(2)))
    locs = pyro.sample("locs", dist.Normal(0.0, 10.0).expand([2]).to_event(1))
    with pyro.plate("data", len(y)):
        z = pyro.sample("z", dist.Categorical(weights), infer={"enumerate": "parallel"})
        pyro.sample("y", dist.Normal(Vindex(locs)[..., z], 1.0).mask(mask), obs=y)


def test_one_enumerated_site_is_summed_out_exactly():
    # One enumerated site whose factors share its plate: log p(values, y) is the closed form
    # sum_n log sum_k w_k N(y_n | loc_k, 1) over the unmasked points, plus the priors.
    y, _ = _mixture_data(40)
    mask = np.arange(40) % 7 != 0
    y[~mask] = 1e6
    values = {"weights": torch.tensor([[0.3, 0.7], [0.5, 0.5], [0.9, 0.1]]),
              "locs": torch.tensor([[-2.0, 2.0], [-1.0, 0.0], [0.0, 3.0]])}
    log_joint = BatchedModel(bind(masked_mixture, {"y": y, "mask": mask}), vectorized=True).log_density(values)
    data = torch.as_tensor(y[mask])
    for i in range(3):
        mixture = dist.MixtureSameFamily(dist.Categorical(values["weights"][i]), dist.Normal(values["locs"][i], 1.0))
        prior = dist.Dirichlet(torch.ones(2)).log_prob(values["weights"][i]) + dist.Normal(0.0, 10.0).log_prob(
            values["locs"][i]).sum()
        torch.testing.assert_close(log_joint[i], prior + mixture.log_prob(data).sum(), rtol=1e-12, atol=1e-9)


def test_markov_chain_log_density_is_forward_algorithm():
    """With pyro.markov and enumerated states, the log density equals the brute-force sum
    over all 2**10 state paths."""
    rng = np.random.default_rng(1)
    y = np.concatenate([rng.normal(-1, 1, 5), rng.normal(2, 1, 5)])
    res = lk.fit(markov_chain, {"y": y}, engine="svi", steps=20, num_samples=2, progress=False)
    probs = torch.as_tensor(res.posterior["probs"][0, 0])
    locs = torch.as_tensor(res.posterior["locs"][0, 0])
    emission = dist.Normal(locs, 1.0).log_prob(torch.as_tensor(y)[:, None])  # (T, 2)
    paths = []
    for path in itertools.product([0, 1], repeat=len(y)):
        previous = (0,) + path[:-1]
        paths.append(float(sum(probs[a, b].log() + emission[t, b]
                               for t, (a, b) in enumerate(zip(previous, path, strict=True)))))
    exact = np.logaddexp.reduce(paths)
    target = bind(markov_chain, {"y": y})
    latent = {"probs": probs[None], "locs": locs[None]}
    log_joint = BatchedModel(target, vectorized=False).log_density(latent)
    prior = float(dist.Dirichlet(torch.tensor([[8.0, 2.0], [2.0, 8.0]])).log_prob(probs).sum())
    np.testing.assert_allclose(float(log_joint[0]) - prior, exact, rtol=1e-8)
    assert res.posterior["x_9"].shape == (1, 2)
    assert all(np.isfinite(res.log_likelihood[f"y_{t}"]).all() for t in range(len(y)))


def test_nested_plates_and_masks():
    rng = np.random.default_rng(2)
    y = rng.normal(1.0, 1.0, size=(6, 3))
    mask = np.ones((6, 3), bool)
    mask[0, 0] = False
    y[0, 0] = 1e6  # masked: must not move anything
    res = lk.fit(nested_plates_with_mask, {"y": y, "mask": mask}, engine="svi", steps=1500,
                 learning_rate=0.05, num_samples=200, progress=False)
    assert abs(res.posterior["mu"].mean() - 1.0) < 1.5
    assert res.log_likelihood["y"].shape == (1, 200, 6, 3)
    assert np.all(res.log_likelihood["y"][..., 0, 0] == 0.0)
    assert res.dims["y"] == ["item", "group"]


def test_vectorized_and_sequential_agree():
    y, _ = _mixture_data(50)
    target = bind(enumerated_mixture, {"y": y})
    values = {"weights": torch.tensor([[0.3, 0.7], [0.5, 0.5], [0.9, 0.1]]),
              "locs": torch.tensor([[-2.0, 2.0], [-1.0, 0.0], [0.0, 3.0]]),
              "scale": torch.tensor([1.0, 2.0, 0.5])}
    fast, slow = BatchedModel(target, vectorized=True), BatchedModel(target, vectorized=False)
    torch.testing.assert_close(fast.log_density(values), slow.log_density(values))
    torch.testing.assert_close(fast.pointwise_log_likelihood(values)["y"],
                               slow.pointwise_log_likelihood(values)["y"])
    assert BatchedModel(target).check_vectorization(values)


def _regression(X, y=None, read_alpha=False):
    """Logistic regression written as users do: ``X @ beta`` does not broadcast over a batch.
    ``read_alpha``: a Python branch on a latent value, which vmap cannot run."""
    beta = pyro.sample("beta", dist.Normal(0.0, 1.0).expand([X.shape[-1]]).to_event(1))
    alpha = pyro.sample("alpha", dist.Normal(0.0, 2.0))
    if read_alpha and float(alpha) > 1e9:
        raise ValueError("unreachable")
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Bernoulli(logits=alpha + X @ beta), obs=y)


def _regression_data():
    rng = np.random.default_rng(0)
    return {"X": rng.normal(size=(30, 3)), "y": (rng.random(30) < 0.5).astype(float)}


def test_a_model_that_does_not_broadcast_is_vmapped_where_vmap_agrees(monkeypatch):
    data = _regression_data()
    target = bind(_regression, data)
    values = {"beta": torch.randn(5, 3, generator=torch.Generator().manual_seed(0)), "alpha": torch.linspace(-1, 1, 5)}
    logits = values["alpha"][:, None] + values["beta"] @ torch.as_tensor(data["X"]).T  # (5, 30)
    exact = dist.Bernoulli(logits=logits).log_prob(torch.as_tensor(data["y"]))
    monkeypatch.setattr("latentkit.inference.vectorize.VMAP_ELEMENTS", 60)  # two values per vmap call
    batched = BatchedModel(target)
    with pyro.validation_enabled(False):
        torch.testing.assert_close(batched.pointwise_log_likelihood(values)["y"], exact)
        assert (batched.vectorized, batched.vmaps) == (False, True)
        # vmap's independent draws come from the generator as the one-at-a-time draws do.
        one_at_a_time = BatchedModel(target, vectorized=False)
        one_at_a_time.vmaps = False
        draws = []
        for model in (batched, one_at_a_time):
            torch.manual_seed(3)
            draws.append(model.predictive(values)["y"])
    assert draws[0].shape == (5, 30) and torch.equal(*draws)


def test_a_model_vmap_cannot_run_is_evaluated_one_value_at_a_time():
    data = _regression_data()
    values = {"beta": torch.zeros(3, 3), "alpha": torch.tensor([0.0, 1.0, 2.0])}
    batched = BatchedModel(bind(lambda X, y=None: _regression(X, y, read_alpha=True), data))
    with pyro.validation_enabled(False):
        log_likelihood = batched.pointwise_log_likelihood(values)["y"]
    assert (batched.vectorized, batched.vmaps) == (False, False)
    expected = dist.Bernoulli(logits=values["alpha"][:, None].expand(3, 30)).log_prob(torch.as_tensor(data["y"]))
    torch.testing.assert_close(log_likelihood, expected)


def test_model_that_raises_is_reported():
    def broken(y):
        raise KeyError("boom")

    with pytest.raises(lk.errors.InferenceError, match="model: raised KeyError"):
        lk.fit(broken, {"y": np.zeros(3)}, engine="svi", steps=1, progress=False)
    with pytest.raises(lk.errors.DataError, match="data: the model could not be called"):
        lk.fit(eight_schools, {"sigmas": np.ones(8)}, engine="svi", steps=1, progress=False)
    with pytest.raises(lk.errors.DataError, match="a plain Pyro function takes a dict"):
        lk.fit(eight_schools, np.ones(8), engine="svi", steps=1, progress=False)
