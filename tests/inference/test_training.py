"""SVI training-loop features for every model: epochs, KL warm-up, validation ELBO per epoch,
early stopping with the best parameters restored, per-epoch monitors, checkpoints of all of it."""

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO
from sklearn.datasets import load_digits

import latentkit as lk
from latentkit import distributed
from latentkit.errors import ConfigError
from latentkit.inference.svi import SVIEngine
from latentkit.inference.training import LatentScale, evaluate, warmup_factor
from latentkit.interrupt import Interrupted


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    X = (load_digits().data > 8).astype(float)
    order = np.random.default_rng(0).permutation(len(X))
    return X[order[:300]], X[order[1500:1600]]


def small_vae(**kwargs) -> lk.models.VAE:
    torch.manual_seed(0)
    return lk.models.VAE(input_dim=64, latent_dim=4, hidden=(32,), **kwargs)


def test_option_errors(digits):
    train, test = digits
    with pytest.raises(ConfigError, match="steps: give steps or epochs, not both"):
        lk.fit(small_vae(), train, engine="svi", steps=10, epochs=2)
    with pytest.raises(ConfigError, match="patience: early stopping watches the validation ELBO"):
        lk.fit(small_vae(), train, engine="svi", epochs=2, patience=3)
    with pytest.raises(ConfigError, match="kl_warmup_start: must lie in"):
        lk.fit(small_vae(), train, engine="svi", epochs=2, kl_warmup=1, kl_warmup_start=1.5)
    with pytest.raises(ConfigError, match="validation: give the held-out data itself"):
        lk.fit(small_vae(), train, engine="svi", epochs=2, validation="test.csv")


def test_warmup_factor_is_linear_then_one():
    assert [warmup_factor(s, 4, 0.2) for s in range(6)] == pytest.approx([0.4, 0.6, 0.8, 1.0, 1.0, 1.0])
    assert warmup_factor(0, 0, 0.0) == 1.0


def test_latent_scale_scales_latent_sites_only():
    """LatentScale(b) under Trace_ELBO: -(log p(x | z) + b (log p(z) - log q(z))), on the same draw."""
    x = torch.tensor([0.3, -1.2, 2.0])

    def model(x):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with pyro.plate("data", 3):
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        pyro.sample("z", dist.Normal(0.5, 0.7))

    with torch.random.fork_rng():
        torch.manual_seed(1)
        loss = Trace_ELBO().differentiable_loss(LatentScale(0.3)(model), LatentScale(0.3)(guide), x)
        torch.manual_seed(1)
        z = dist.Normal(0.5, 0.7).rsample()
    expected = -(dist.Normal(z, 1.0).log_prob(x).sum()
                 + 0.3 * (dist.Normal(0.0, 1.0).log_prob(z) - dist.Normal(0.5, 0.7).log_prob(z)))
    assert float(loss) == pytest.approx(float(expected), rel=1e-12)


@pytest.mark.parametrize("variant", ["gaussian guide", "iaf guide", "made decoder", "gaussian likelihood",
                                     "categorical likelihood", "conditional"])
@pytest.mark.parametrize("latent_scale", [1.0, 0.25])
def test_vae_fast_loss_equals_pyro_trace_elbo(digits, variant, latent_scale):
    """The engine's fast path (VAE.elbo_loss) gives Pyro's Trace_ELBO value on the same random numbers,
    on a minibatch, with and without a KL warm-up factor, for each of its branches (Gaussian or flow
    guide; Bernoulli logits, or the decoder's distribution for the other likelihoods)."""
    data = digits[0]
    if variant == "conditional":
        torch.manual_seed(0)
        vae = lk.models.ConditionalVAE(input_dim=64, latent_dim=4, context_dim=3, hidden=(32,))
        data = (data, np.arange(len(data)) % 3)
    else:
        vae = small_vae(**{"gaussian guide": {}, "iaf guide": {"guide": "iaf"},
                           "made decoder": {"decoder": lk.nn.MADE(64, hidden=(32,), context_dim=4)},
                           "gaussian likelihood": {"likelihood": "gaussian"},
                           "categorical likelihood": {"likelihood": "categorical", "n_categories": 2}}[variant])
    kwargs = vae.prepare(data)
    batches = distributed.Minibatches(300, 50, seed=0)
    scaled = LatentScale(latent_scale)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        with distributed.fixed_subsample(batches, 7):
            pyro_loss = Trace_ELBO().differentiable_loss(scaled(vae.model), scaled(vae.guide),
                                                         **{**kwargs, "subsample_size": 50})
        torch.manual_seed(3)
        fast = vae.elbo_loss(kwargs, batches.indices(7), latent_scale)
    assert float(fast.detach()) == pytest.approx(float(pyro_loss.detach()), rel=1e-10)


def test_epochs_validation_and_monitors(digits):
    train, test = digits
    vae = small_vae()
    res = lk.fit(vae, train, engine="svi", epochs=3, batch_size=100, learning_rate=1e-2, validation=test,
                 num_samples=2, seed=0, progress=False)
    assert len(res.losses) == 3 * (300 // 100)
    metrics = res.epoch_metrics
    assert sorted(metrics) == ["active_units", "elbo", "kl_per_dim", "validation_elbo"]
    np.testing.assert_allclose(metrics["elbo"], -res.losses.reshape(3, 3).mean(1))
    assert metrics["kl_per_dim"].shape == (3, 4) and metrics["active_units"].shape == (3,)
    # the last epoch's monitors are those of the returned networks on the held-out data
    np.testing.assert_allclose(metrics["kl_per_dim"][-1], vae.kl_per_dim(test).numpy(), rtol=1e-10)
    assert metrics["active_units"][-1] == vae.active_units(test)
    held_out = -evaluate(lambda: vae.elbo_loss(vae.prepare(test), None, 1.0), 0, [])
    assert metrics["validation_elbo"][-1] == pytest.approx(held_out, rel=1e-12)
    assert metrics["validation_elbo"][-1] > metrics["validation_elbo"][0]  # training helps held-out data
    assert "epoch" in res.to_arviz()["optimization"].coords


def test_early_stopping_restores_the_best_epoch(digits, tmp_path):
    train, test = digits
    vae = small_vae()
    res = lk.fit(vae, train[:100], engine="svi", epochs=300, batch_size=50, learning_rate=3e-2, validation=test,
                 patience=3, num_samples=2, seed=0, progress=False, out=tmp_path / "run")
    info = res.config["early_stopping"]
    history = res.epoch_metrics["validation_elbo"]
    assert info["stopped_early"] and info["epochs_run"] == len(history) < 300
    best = int(np.argmax(history))
    assert info["best_epoch"] == best + 1 and len(history) == best + 1 + 3
    assert len(res.losses) == len(history) * 2
    # the returned networks are those of the best epoch: they reproduce its validation ELBO
    assert -evaluate(lambda: vae.elbo_loss(vae.prepare(test), None, 1.0), 0, []) == pytest.approx(history[best],
                                                                                                 rel=1e-12)
    assert lk.load(tmp_path / "run", model=vae) == res
    # the checkpoint written when early stopping ended the run: resuming it changes nothing
    resumed = lk.fit(small_vae(), train[:100], engine="svi", epochs=300, batch_size=50, learning_rate=3e-2,
                     validation=test, patience=3, num_samples=2, seed=0, progress=False, resume=tmp_path / "run")
    assert resumed == res


def test_warmup_runs_and_resume_with_epochs_is_exact(digits, tmp_path):
    """An interrupted fit with epochs, warm-up, validation and patience resumes to the same result."""
    train, test = digits
    options = dict(epochs=6, batch_size=100, kl_warmup=3, learning_rate=1e-2, validation=test, patience=50,
                   num_samples=2, checkpoint_every=4)
    uninterrupted = SVIEngine(**options).fit(small_vae(), train, seed=1, progress=False)

    def stop_at_step_7(step: int) -> bool:
        return step == 7

    stop_at_step_7.signum = 2  # SIGINT
    with pytest.raises(Interrupted):
        SVIEngine(**options).fit(small_vae(), train, seed=1, progress=False, run_dir=tmp_path,
                                 should_stop=stop_at_step_7)
    resumed = SVIEngine(**options).fit(small_vae(), train, seed=1, progress=False, run_dir=tmp_path, resume=True)
    assert resumed == uninterrupted
    assert np.array_equal(resumed.epoch_metrics["validation_elbo"], uninterrupted.epoch_metrics["validation_elbo"])


def test_validation_for_a_model_with_enumeration():
    """A Gaussian mixture (assignments summed out by TraceEnum_ELBO): validation ELBO per step-epoch."""
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(-3, 1, (60, 2)), rng.normal(3, 1, (60, 2))])
    res = lk.fit(lk.models.GaussianMixture(2, covariance="diag"), X[::2], engine="svi", epochs=40,
                 validation=X[1::2], num_samples=5, seed=0, progress=False)
    history = res.epoch_metrics["validation_elbo"]
    assert history.shape == (40,) and np.isfinite(history).all() and history[-1] > history[0]
