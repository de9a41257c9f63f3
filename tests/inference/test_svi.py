"""SVI engine: parameter recovery, guides, enumeration, minibatches, options."""

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

import latentkit as lk
from latentkit.errors import ConfigError, InferenceError


def _match(estimated: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Order estimated components like the true ones (nearest true mean)."""
    order = [int(np.argmin(((estimated - t) ** 2).sum(-1))) for t in truth]
    return estimated[order]


@pytest.mark.parametrize("covariance", ["diag", "full"])
@pytest.mark.parametrize("guide", ["delta", "normal"])
def test_gmm_recovers_parameters(three_blobs, covariance, guide):
    X, labels, locs = three_blobs
    res = lk.fit(lk.models.GaussianMixture(3, covariance=covariance), X, engine="svi",
                 steps=400, learning_rate=0.05, guide=guide, num_samples=100, progress=False)
    est = _match(res.posterior["locs"].mean((0, 1)), locs)
    # Each mean is estimated from ~167 points with sd <= 1: its standard error is <= 0.08;
    # 0.3 is about 4 standard errors.
    np.testing.assert_allclose(est, locs, atol=0.3)
    np.testing.assert_allclose(np.sort(res.posterior["weights"].mean((0, 1))), [1 / 3] * 3, atol=0.06)
    assert adjusted_rand_score(labels, res.posterior["assignment"][0, -1]) > 0.95
    assert res.posterior["assignment"].shape == (1, 100, 500)
    assert res.log_likelihood["obs"].shape == (1, 100, 500)
    assert res.posterior_predictive["obs"].shape == (1, 100, 500, 2)


def test_gmm_log_likelihood_is_marginal(three_blobs):
    """The pointwise log-likelihood equals the closed-form mixture density at each draw."""
    X, _, _ = three_blobs
    res = lk.fit(lk.models.GaussianMixture(3, covariance="full"), X, engine="svi", steps=50,
                 num_samples=3, progress=False)
    post = res.posterior
    for d in range(3):
        mix = dist.MixtureSameFamily(
            dist.Categorical(torch.as_tensor(post["weights"][0, d])),
            dist.MultivariateNormal(torch.as_tensor(post["locs"][0, d]),
                                    scale_tril=torch.as_tensor(post["scale_tril"][0, d])),
        )
        expected = mix.log_prob(torch.as_tensor(X)).numpy()
        np.testing.assert_allclose(res.log_likelihood["obs"][0, d], expected, rtol=1e-8)


def test_minibatch_svi_matches_full_batch(three_blobs):
    X, _, locs = three_blobs
    res = lk.fit(lk.models.GaussianMixture(3, covariance="diag"), X, engine="svi", steps=600,
                 learning_rate=0.05, guide="delta", batch_size=100, num_samples=10, progress=False)
    np.testing.assert_allclose(_match(res.posterior["locs"].mean((0, 1)), locs), locs, atol=0.3)
    assert res.log_likelihood["obs"].shape == (1, 10, 500)  # evaluated on the full data


def test_custom_guide_callable():
    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    def guide(y):
        loc = pyro.param("loc", torch.tensor(0.0))
        scale = pyro.param("scale", torch.tensor(1.0), constraint=dist.constraints.positive)
        pyro.sample("mu", dist.Normal(loc, scale))

    y = torch.randn(200) + 3.0
    res = lk.fit(model, {"y": y}, engine="svi", guide=guide, steps=1500, learning_rate=0.02,
                 num_particles=8, num_samples=500, progress=False)
    # Conjugate posterior: mean = sum(y) / (n + 1/100), sd = 1/sqrt(n + 1/100).
    n = len(y)
    post_mean, post_sd = float(y.sum()) / (n + 0.01), (n + 0.01) ** -0.5
    # Adam's last iterate jitters by about the learning rate times the gradient noise:
    # allow a third of a posterior sd (0.024).
    assert abs(float(res.params["loc"]) - post_mean) < post_sd / 3
    assert abs(float(res.params["scale"]) - post_sd) < post_sd / 3
    assert abs(res.posterior["mu"].mean() - post_mean) < post_sd / 3


def test_unknown_option_and_guide():
    X = np.random.default_rng(0).normal(size=(20, 2))
    with pytest.raises(ConfigError, match="num_sample: not an option.*Did you mean 'num_samples'"):
        lk.fit(lk.models.GaussianMixture(2), X, engine="svi", num_sample=10)
    with pytest.raises(ConfigError, match="guide: must be one of"):
        lk.fit(lk.models.GaussianMixture(2), X, engine="svi", guide="fancy")
    with pytest.raises(ConfigError, match="engine: unknown engine 'nutz'.*Did you mean 'nuts'"):
        lk.fit(lk.models.GaussianMixture(2), X, engine="nutz")


def test_options_of_the_wrong_type_are_refused_by_name():
    X = np.random.default_rng(0).normal(size=(20, 2))
    with pytest.raises(ConfigError, match="dense_mass: must be True or False, got 'no'"):
        lk.fit(lk.models.GaussianMixture(2), X, engine="nuts", dense_mass="no")
    with pytest.raises(ConfigError, match="jit: must be True, False or one of \\['inductor'\\], got 'fast'"):
        lk.fit(lk.models.GaussianMixture(2), X, engine="nuts", jit="fast")
    with pytest.raises(ConfigError, match="num_particles: must be an integer, got 2.5"):
        lk.fit(lk.models.GaussianMixture(2), X, engine="svi", num_particles=2.5)
    with pytest.raises(ConfigError, match="steps: must be an integer or None, got True"):
        lk.fit(lk.models.GaussianMixture(2), X, engine="svi", steps=True)
    with pytest.raises(ConfigError, match=r"num_samples: must be at least 1, got np.int64\(0\)"):  # NumPy ints too
        lk.fit(lk.models.GaussianMixture(1), X, engine="svi", num_samples=np.int64(0))
    res = lk.fit(lk.models.GaussianMixture(1), X, engine="svi", steps=np.int64(5), learning_rate=np.float32(0.01),
                 num_samples=3, progress=False)  # NumPy scalars are numbers
    assert res.posterior["locs"].shape == (1, 3, 1, 2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("engine", ["svi", "nuts", "pyro-nuts"])
def test_a_device_this_machine_lacks_is_refused_by_name(engine):
    X = np.random.default_rng(0).normal(size=(20, 2))
    with pytest.raises(ConfigError, match="device: 'cuda', but this PyTorch sees no CUDA GPU.*device='cpu'"):
        lk.fit(lk.models.GaussianMixture(2), X, engine=engine, device="cuda")
    with pytest.raises(ConfigError, match="device: 'gpu7' is not a device"):
        lk.fit(lk.models.GaussianMixture(2), X, engine=engine, device="gpu7")


def test_batch_size_needs_subsample_argument():
    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    with pytest.raises(ConfigError, match="batch_size: this model takes no 'subsample_size'"):
        lk.fit(model, {"y": torch.zeros(5)}, engine="svi", batch_size=2, progress=False)


@pytest.mark.filterwarnings("ignore:Encountered NaN")
def test_divergent_loss_is_an_inference_error():
    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    # One Adam step of size 1e300 sends the guide's location to ~1e300, where (y - mu)^2 overflows.
    with pytest.raises(InferenceError, match=r"loss: became (inf|nan) at step 1; lower learning_rate"):
        lk.fit(model, {"y": torch.tensor(0.0)}, engine="svi", steps=5, learning_rate=1e300, progress=False)


def test_seed_repeats_exactly_and_leaves_caller_state(three_blobs):
    X, _, _ = three_blobs
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    fit = lambda: lk.fit(lk.models.GaussianMixture(3, covariance="diag"), X, engine="svi",  # noqa: E731
                         steps=30, num_samples=20, seed=7, progress=False)
    a = fit()
    after = torch.rand(1)
    b = fit()
    assert a == b
    assert torch.equal(before, after)
    c = lk.fit(lk.models.GaussianMixture(3, covariance="diag"), X, engine="svi", steps=30,
               num_samples=20, seed=8, progress=False)
    assert not np.array_equal(a.posterior["locs"], c.posterior["locs"])
