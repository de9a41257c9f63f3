"""VAE: honest likelihood estimates (linear-Gaussian closed form), training on digits through lk.fit,
the KL monitors, other likelihoods and decoders, and bad input."""

import math

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from pyro import poutine
from pyro.infer import TraceMeanField_ELBO
from sklearn.datasets import load_digits
from torch import nn

import latentkit as lk
from latentkit.diagnostics import check
from latentkit.errors import ConfigError, DataError
from latentkit.nn import MADE, ConvDecoder, ConvEncoder, PixelCNN


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """load_digits scaled to [0, 1]: 1,500 training and 297 held-out images (fixed permutation)."""
    X = load_digits().data / 16.0
    order = np.random.default_rng(0).permutation(len(X))
    return X[order[:1500]], X[order[1500:]]


def linear_gaussian_vae(exact_encoder: bool) -> tuple[lk.models.VAE, torch.distributions.MultivariateNormal]:
    """p(z) = N(0, I), p(x | z) = N(W z + b, s^2 I): marginal N(b, W W^T + s^2 I) and posterior
    N(S W^T (x - b) / s^2, S) with S = (I + W^T W / s^2)^-1, diagonal as W has orthogonal columns,
    so a linear encoder can represent it exactly."""
    D, L, s = 5, 2, 0.5
    Q, _ = torch.linalg.qr(torch.randn(D, L))
    W, b = Q * torch.tensor([2.0, 1.0]), torch.randn(D)
    vae = lk.models.VAE(input_dim=D, latent_dim=L, likelihood="gaussian", encoder=nn.Linear(D, 2 * L),
                        decoder=nn.Linear(L, D))
    S = torch.linalg.inv(torch.eye(L) + W.T @ W / s ** 2)
    A = S @ W.T / s ** 2
    with torch.no_grad():
        vae.decoder.weight.copy_(W)
        vae.decoder.bias.copy_(b)
        vae.log_scale.fill_(math.log(s))
        vae.encoder.weight.zero_()
        vae.encoder.weight[:L] = A
        vae.encoder.bias[:L] = -A @ b
        vae.encoder.bias[L:] = 0.5 * torch.diagonal(S).log()
        if not exact_encoder:  # shifted and 1.5 times too wide: bounded importance weights
            vae.encoder.bias[:L] += 0.5
            vae.encoder.bias[L:] += math.log(1.5)
    return vae, torch.distributions.MultivariateNormal(b, W @ W.T + s ** 2 * torch.eye(D))


def test_iwae_is_exact_with_the_true_posterior():
    vae, marginal = linear_gaussian_vae(exact_encoder=True)
    X = marginal.sample((100,))
    # q = p(z | x): every importance weight equals p(x), even with one particle
    torch.testing.assert_close(vae.log_likelihood(X, num_particles=1, seed=0), marginal.log_prob(X))


def test_iwae_matches_closed_form_within_monte_carlo_error_and_grows_with_k():
    vae, marginal = linear_gaussian_vae(exact_encoder=False)
    X = marginal.sample((200,))
    exact = marginal.log_prob(X)
    means = []
    for K in (1, 10, 100, 1000):
        errors = torch.stack([vae.log_likelihood(X, num_particles=K, seed=s) - exact for s in range(5)])
        means.append(float(errors.mean()))
    assert means == sorted(means) and means[0] < -1.0  # monotone in K on average; K = 1 far off
    K = 2000
    errors = torch.stack([vae.log_likelihood(X, num_particles=K, seed=10 + s) - exact for s in range(2)])
    standard_error = float(errors.std() / math.sqrt(errors.numel()))
    # Bias of the K-particle estimate, to first order -Var(w) / (2 K E[w]^2) (Burda et al. 2016,
    # delta method), with the weights' relative variance estimated from 4000 draws per point.
    with torch.no_grad():
        q = vae.encode(X)
        z = q.sample((4000,))
        log_w = vae.decode(z).log_prob(X) + vae.prior().log_prob(z) - q.log_prob(z)
        relative_variance = (torch.logsumexp(2 * log_w, 0) - math.log(4000)
                             - 2 * (torch.logsumexp(log_w, 0) - math.log(4000))).exp() - 1
    bias = -float(relative_variance.mean()) / (2 * K)
    assert abs(float(errors.mean()) - bias) < 5 * standard_error + 1e-4


def test_kl_per_dim_sums_to_the_elbo_kl_term(digits):
    train, _ = digits
    vae = lk.models.VAE(input_dim=64, latent_dim=4, hidden=(32,))
    X = vae.as_tensor(train[:50])
    # With the observation hidden, the mean-field ELBO loss is exactly the analytic KL term.
    kl_term = TraceMeanField_ELBO().differentiable_loss(poutine.block(vae.model, hide=["obs"]), vae.guide, X=X)
    torch.testing.assert_close(vae.kl_per_dim(X).sum() * 50, kl_term.detach())


def test_digits_training_improves_held_out_iwae(digits):
    train, test = digits
    vae = lk.models.VAE(input_dim=64, latent_dim=8, hidden=(64,))
    before = float(vae.log_likelihood(test, num_particles=100, seed=0).mean())
    res = lk.fit(vae, train, engine="svi", steps=300, batch_size=100, learning_rate=3e-3, num_samples=4,
                 seed=0, progress=False)
    after = float(vae.log_likelihood(test, num_particles=100, seed=0).mean())
    # Untrained: about -45 nats per image; 300 minibatch steps (20 epochs, ~2 s) reach about -27.
    assert after > before + 10.0
    # The VAE's own amortised guide was trained (no autoguide parameters), and the result is complete.
    assert res.params and all(name.startswith("model.") for name in res.params)
    assert res.posterior["z"].shape == (1, 4, 1500, 8)
    assert res.log_likelihood["obs"].shape == (1, 4, 1500)
    assert res.losses[-20:].mean() < res.losses[:20].mean()
    assert res.to_arviz().posterior["z"].dims == ("chain", "draw", "obs_id", "latent")
    kl = vae.kl_per_dim(test)
    assert kl.shape == (8,) and (kl >= 0).all()
    assert 1 <= vae.active_units(test) <= 8
    assert vae.reconstruct(test[:3]).shape == (3, 64)
    samples = vae.sample(6, seed=1)
    assert samples.shape == (6, 64) and set(samples.unique().tolist()) <= {0.0, 1.0}
    assert ((vae.sample(6, mean=True) >= 0) & (vae.sample(6, mean=True) <= 1)).all()


def test_conv_vae_on_images(digits):
    train, _ = digits
    vae = lk.models.VAE(input_shape=(1, 8, 8), latent_dim=3,
                        encoder=ConvEncoder((1, 8, 8), 6, channels=(4, 8)),
                        decoder=ConvDecoder(3, (1, 8, 8), channels=(8, 4)))
    res = lk.fit(vae, train[:200], engine="svi", steps=5, batch_size=50, num_samples=2, progress=False)
    assert res.posterior["z"].shape == (1, 2, 200, 3)
    assert vae.reconstruct(train[:2].reshape(2, 1, 8, 8)).shape == (2, 1, 8, 8)
    assert torch.isfinite(vae.log_likelihood(train[:10], num_particles=20)).all()
    assert vae.config()["args"]["encoder"] == "custom ConvEncoder"


def test_autoregressive_decoder(digits):
    train, _ = digits
    binary = (train[:200] > 0.5).astype(float)
    vae = lk.models.VAE(input_dim=64, latent_dim=4, hidden=(32,), decoder=MADE(64, hidden=(96,), context_dim=4))
    lk.fit(vae, binary, engine="svi", steps=5, batch_size=50, num_samples=2, progress=False)
    ll = vae.log_likelihood(binary[:20], num_particles=10, seed=0)
    assert ll.shape == (20,) and torch.isfinite(ll).all() and (ll < 0).all()
    assert set(vae.sample(3).unique().tolist()) <= {0.0, 1.0}


def test_gaussian_and_categorical_likelihoods():
    rng = np.random.default_rng(0)
    gauss = lk.models.VAE(input_dim=3, latent_dim=2, likelihood="gaussian", hidden=(8,))
    lk.fit(gauss, rng.normal(size=(40, 3)), engine="svi", steps=5, num_samples=2, progress=False)
    assert torch.isfinite(gauss.log_likelihood(rng.normal(size=(5, 3)), num_particles=5)).all()
    cat = lk.models.VAE(input_dim=4, latent_dim=2, likelihood="categorical", n_categories=3, hidden=(8,))
    data = rng.integers(0, 3, size=(40, 4))
    lk.fit(cat, data, engine="svi", steps=5, num_samples=2, progress=False)
    ll = cat.log_likelihood(data, num_particles=5)
    assert torch.isfinite(ll).all() and (ll < 0).all()
    assert set(cat.sample(5).unique().tolist()) <= {0.0, 1.0, 2.0}


def test_run_folder_round_trip(digits, tmp_path):
    train, _ = digits
    vae = lk.models.VAE(input_dim=64, latent_dim=2, hidden=(16,))
    res = lk.fit(vae, train[:100], engine="svi", steps=3, num_samples=2, progress=False)
    res.save(tmp_path / "vae")
    back = lk.load(tmp_path / "vae")
    assert isinstance(back.model, lk.models.VAE) and back.model.init_args == vae.init_args
    np.testing.assert_array_equal(back.posterior["z"], res.posterior["z"])
    # The rebuilt model carries the fitted weights.
    torch.testing.assert_close(back.model.reconstruct(train[:5]), vae.reconstruct(train[:5]))


def test_bad_input():
    vae = lk.models.VAE(input_dim=64, latent_dim=2, hidden=(8,))
    with pytest.raises(DataError, match=r"expected shape \(N, \*\(64,\)\)"):
        vae.prepare(np.zeros((5, 63)))
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        vae.prepare(np.full((5, 64), 2.0))
    bad = np.zeros((5, 64))
    bad[1, 3] = np.nan
    with pytest.raises(DataError, match="NaN"):
        lk.fit(vae, bad, engine="svi", steps=1, progress=False)
    with pytest.raises(DataError, match="latent_dim"):
        lk.models.VAE(input_dim=64, latent_dim=0)
    with pytest.raises(DataError, match="decoder: outputs shape"):
        lk.models.VAE(input_dim=64, latent_dim=2, decoder=nn.Linear(2, 60))
    with pytest.raises(DataError, match="encoder: cannot take"):
        lk.models.VAE(input_dim=64, latent_dim=2, encoder=nn.Linear(60, 4))
    with pytest.raises(DataError, match="decoder: a MADE over shape"):
        lk.models.VAE(input_dim=64, latent_dim=2, decoder=MADE(64, context_dim=3))
    with pytest.raises(DataError, match="integers"):
        lk.models.VAE(input_dim=2, latent_dim=1, likelihood="categorical", n_categories=3).prepare([[0, 3]])
    with pytest.raises(ConfigError, match="likelihood"):
        lk.models.VAE(input_dim=64, likelihood="poisson")
    with pytest.raises(ConfigError, match="lk.load"):
        lk.models.VAE(input_dim=64, encoder="custom ConvEncoder")


def test_iaf_guide(digits):
    train, _ = digits
    vae = lk.models.VAE(input_dim=64, latent_dim=3, hidden=(16,), guide="iaf", flow_depth=2)
    before = {k: v.clone() for k, v in vae.flows.state_dict().items()}
    res = lk.fit(vae, train[:300], engine="svi", steps=60, batch_size=50, learning_rate=1e-2, num_samples=2,
                 progress=False)
    assert res.losses[-10:].mean() < res.losses[:10].mean()
    assert any(not torch.equal(before[k], v) for k, v in vae.flows.state_dict().items())  # flows trained
    assert any(name.startswith("model.flows.") for name in res.params)
    x = vae.as_tensor(train[:20])
    with torch.no_grad():
        q = vae.encode(x)
        z = q.sample((4,))
        cached = q.log_prob(z)
        # a fresh q has no cached inverse: the flows are inverted one dimension at a time
        fresh = vae.encode(x).log_prob(z.clone())
    torch.testing.assert_close(cached, fresh)
    assert z.shape == (4, 20, 3) and torch.isfinite(vae.log_likelihood(x, num_particles=50)).all()
    assert vae.reconstruct(x).shape == (20, 64)
    with pytest.raises(ConfigError, match="iaf"):
        vae.kl_per_dim(x)
    with pytest.raises(ConfigError, match="latent_dim >= 2"):
        lk.models.VAE(input_dim=64, latent_dim=1, guide="iaf")


def test_nuts_on_latent_posterior_matches_the_exact_posterior():
    vae, marginal = linear_gaussian_vae(exact_encoder=True)  # the encoder is the exact posterior
    X = marginal.sample((3,))
    post = vae.latent_posterior(X)
    assert not list(post.parameters())  # the networks are fixed: nothing for an engine to change
    res = lk.fit(post, None, engine="nuts", num_chains=2, num_warmup=200, num_samples=200, seed=0, progress=False)
    summary = res.summary()
    assert summary["ess_bulk"].min() > 100 and summary["r_hat"].max() < 1.05
    exact = vae.encode(X)
    mean, sd = exact.mean.detach().numpy(), exact.stddev.detach().numpy()
    mcse = summary["mcse_mean"].to_numpy().reshape(mean.shape)
    z = res.posterior["z"]
    assert (np.abs(z.mean((0, 1)) - mean) < 5 * mcse + 1e-3).all()
    # with ESS > 100 each sd is estimated to about 1 / sqrt(2 ESS) < 7% (relative): 25% is > 3.5 SE
    np.testing.assert_allclose(z.std((0, 1)), sd, rtol=0.25)


def test_conditional_vae_iwae_is_exact_for_linear_gaussian():
    """p(x | c) = N(b + V c, W W^T + s^2 I) when the decoder is linear in [z, c]; the exact
    posterior mean is A (x - b - V c), linear in [x, c], so a linear encoder represents it."""
    D, L, C, s = 4, 2, 3, 0.7
    Q, _ = torch.linalg.qr(torch.randn(D, L))
    W, V, b = Q * torch.tensor([1.5, 0.8]), torch.randn(D, C), torch.randn(D)
    cvae = lk.models.ConditionalVAE(input_dim=D, latent_dim=L, context_dim=C, likelihood="gaussian",
                                    encoder=nn.Linear(D + C, 2 * L), decoder=nn.Linear(L + C, D))
    S = torch.linalg.inv(torch.eye(L) + W.T @ W / s ** 2)
    A = S @ W.T / s ** 2
    with torch.no_grad():
        cvae.decoder.weight.copy_(torch.cat([W, V], 1))
        cvae.decoder.bias.copy_(b)
        cvae.log_scale.fill_(math.log(s))
        cvae.encoder.weight.zero_()
        cvae.encoder.weight[:L] = torch.cat([A, -A @ V], 1)
        cvae.encoder.bias[:L] = -A @ b
        cvae.encoder.bias[L:] = 0.5 * torch.diagonal(S).log()
    context = torch.randn(50, C)
    cov = W @ W.T + s ** 2 * torch.eye(D)
    X = torch.distributions.MultivariateNormal(b + context @ V.T, cov).sample()
    exact = torch.distributions.MultivariateNormal(b + context @ V.T, cov).log_prob(X)
    torch.testing.assert_close(cvae.log_likelihood((X, context), num_particles=1, seed=0), exact)
    torch.testing.assert_close(cvae.log_likelihood({"x": X, "context": context}, num_particles=1, seed=0), exact)
    assert cvae.latent_posterior((X, context)).prepare(None)["C"].shape == (50, C)


def test_conditional_vae_on_digits_with_labels(digits):
    data = load_digits()
    order = np.random.default_rng(0).permutation(len(data.data))
    X, y = data.data[order] / 16.0, data.target[order]
    cvae = lk.models.ConditionalVAE(input_dim=64, latent_dim=4, context_dim=10, hidden=(64,))
    test = (X[1500:], y[1500:])
    before = float(cvae.log_likelihood(test, num_particles=50, seed=0).mean())
    res = lk.fit(cvae, (X[:1500], y[:1500]), engine="svi", steps=150, batch_size=100, learning_rate=3e-3,
                 num_samples=2, progress=False)
    assert float(cvae.log_likelihood(test, num_particles=50, seed=0).mean()) > before + 5.0
    assert res.constant_data["C"].shape == (1500, 10)  # labels, one-hot
    zeros, ones = cvae.sample(20, mean=True, seed=0, context=0), cvae.sample(20, mean=True, seed=0, context=1)
    assert zeros.shape == (20, 64) and (zeros - ones).abs().max() > 0.05  # the label changes the digit
    assert cvae.reconstruct((X[:3], y[:3])).shape == (3, 64)
    assert cvae.kl_per_dim(test).shape == (4,)


def test_conditional_vae_bad_context():
    cvae = lk.models.ConditionalVAE(input_dim=4, latent_dim=2, context_dim=3, hidden=(8,))
    X = np.zeros((5, 4))
    with pytest.raises(DataError, match="needs a context"):
        cvae.prepare(X)
    with pytest.raises(DataError, match=r"expected shape \(5, 3\)"):
        cvae.prepare((X, np.zeros((5, 2))))
    with pytest.raises(DataError, match="labels"):
        cvae.prepare((X, np.array([0, 1, 2, 3, 0])))
    with pytest.raises(DataError, match="no context"):
        lk.models.VAE(input_dim=4, latent_dim=2, hidden=(8,)).prepare((X, np.zeros((5, 3))))
    with pytest.raises(ConfigError, match="context_dim"):
        lk.models.ConditionalVAE(input_dim=4, context_dim=0)


def test_pixelcnn_decoder(digits):
    train, _ = digits
    images = (train[:200] > 0.5).astype(float).reshape(200, 1, 8, 8)
    vae = lk.models.VAE(input_shape=(1, 8, 8), latent_dim=3, hidden=(32,),
                        decoder=PixelCNN((1, 8, 8), channels=8, num_layers=1, context_dim=3))
    res = lk.fit(vae, images, engine="svi", steps=5, batch_size=50, num_samples=2, progress=False)
    assert res.log_likelihood["obs"].shape == (1, 2, 200)
    ll = vae.log_likelihood(images[:10], num_particles=10, seed=0)
    assert ll.shape == (10,) and torch.isfinite(ll).all() and (ll < 0).all()
    assert set(vae.sample(2).unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(DataError, match="decoder: a PixelCNN over shape"):
        lk.models.VAE(input_shape=(1, 8, 8), latent_dim=2, decoder=PixelCNN((1, 8, 8), context_dim=3))


def _pareto_check(result):
    return next(c for c in check(result).checks if c.name == "pareto_k")


def test_per_point_khat_tells_a_good_encoder_from_a_too_narrow_one():
    """The SVI check of an amortised guide is per data point. Linear-Gaussian VAE (exact posterior
    known): an encoder shifted by 0.5 and 1.5 times too wide has bounded importance
    ratios (k-hat <= 0.5 at every point: pass); one exp(-1) = 0.37 times as wide as the posterior has
    heavy-tailed ratios (k-hat > 0.7 at most points: fail). learning_rate=0 keeps the encoder as built."""
    verdicts = {}
    for name in ("wide", "narrow"):
        torch.manual_seed(0)
        vae, marginal = linear_gaussian_vae(exact_encoder=name == "narrow")
        if name == "narrow":
            with torch.no_grad():
                vae.encoder.bias[2:] -= 1.0
        X = marginal.sample((600,))  # 600 x 2 latent values: too many for the joint check
        res = lk.fit(vae, X.numpy(), engine="svi", steps=20, learning_rate=0.0, num_samples=2, seed=0,
                     progress=False)
        verdicts[name] = _pareto_check(res)
    assert verdicts["wide"].verdict == "pass" and verdicts["wide"].value <= 0.5
    assert "per-point k-hat of the amortised guide on 200 data points" in verdicts["wide"].reason
    assert verdicts["narrow"].verdict == "fail" and verdicts["narrow"].value > 0.7


def test_loaded_vae_result_is_checked_with_its_fitted_networks(tmp_path):
    X = (load_digits().data[:600] > 8).astype(float)  # 600 x 4 latent values: checked per point
    torch.manual_seed(0)
    vae = lk.models.VAE(input_dim=64, latent_dim=4, hidden=(32,))
    res = lk.fit(vae, X, engine="svi", epochs=3, batch_size=100, learning_rate=1e-2, num_samples=2, seed=0,
                 progress=False)
    fitted = _pareto_check(res)
    assert fitted.verdict in ("pass", "warn", "fail") and np.isfinite(fitted.value)
    assert "point estimate" not in fitted.reason
    res.save(tmp_path / "run", plots=False)
    loaded = _pareto_check(lk.load(tmp_path / "run"))
    assert loaded.value == fitted.value and loaded.reason == fitted.reason


def test_run_folder_has_the_vae_plots(digits, tmp_path):
    """Reconstructions, samples, latent traversals and the per-epoch curves are written to the run folder,
    also by a loaded result (whose networks come from the saved weights), and for a conditional VAE."""
    train, test = digits
    vae = lk.models.VAE(input_dim=64, latent_dim=2, hidden=(16,))
    res = lk.fit(vae, train[:200], engine="svi", epochs=2, batch_size=100, validation=test[:50], num_samples=2,
                 seed=0, progress=False, out=tmp_path / "run")
    wanted = {"reconstructions.png", "samples.png", "latent_traversals.png", "epochs.png", "elbo.png"}
    assert wanted <= {p.name for p in (tmp_path / "run" / "plots").iterdir()}
    assert "epochs" in dict(vae.plots(res)) and len(res.epoch_metrics["validation_elbo"]) == 2
    loaded = lk.load(tmp_path / "run")  # its model is rebuilt with the saved weights
    assert torch.equal(loaded.model.reconstruct(test[:5]), vae.reconstruct(test[:5]))
    assert [stem for stem, _ in loaded.model.plots(loaded)] == [stem for stem, _ in vae.plots(res)]
    cvae = lk.models.ConditionalVAE(input_dim=64, latent_dim=2, context_dim=10, hidden=(16,))
    labels = load_digits().target[np.random.default_rng(0).permutation(1797)[:200]]
    res = lk.fit(cvae, (train[:200], labels), engine="svi", epochs=1, batch_size=100, num_samples=2, seed=0,
                 progress=False)
    assert {"reconstructions", "samples", "latent_traversals"} <= {stem for stem, _ in cvae.plots(res)}
    for _, make in cvae.plots(res):
        plt.close(make())
