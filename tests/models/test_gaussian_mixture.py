"""GaussianMixture with NUTS: recovery, labels consistent across chains, ArviZ groups, sampling."""

import arviz as az
import numpy as np
import pytest

import latentkit as lk


@pytest.fixture(scope="module")
def nuts_fit(three_blobs):
    X, _, _ = three_blobs
    return lk.fit(lk.models.GaussianMixture(3, covariance="diag"), X, engine="nuts",
                  num_chains=2, num_warmup=150, num_samples=150, seed=0, progress=False)


def test_nuts_recovers_parameters(nuts_fit, three_blobs):
    X, labels, locs = three_blobs
    post = nuts_fit.posterior
    est = post["locs"].mean((0, 1))
    order = [int(np.argmin(((est - t) ** 2).sum(-1))) for t in locs]
    # Posterior sd of each mean is <= 0.08 (~167 points, sd <= 1): 0.3 is ~4 sd.
    np.testing.assert_allclose(est[order], locs, atol=0.3)
    summary = nuts_fit.summary(var_names=["locs", "weights"])
    # Labels are matched across chains, so R-hat is meaningful.
    assert summary["r_hat"].max() < 1.05
    true_means = np.stack([X[labels == k].mean(0) for k in range(3)])
    mcse = summary["mcse_mean"].to_numpy().reshape(-1)[: 6].reshape(3, 2)
    assert np.all(np.abs(est[order] - true_means) < 5 * mcse[order] + 0.15)


def test_nuts_result_converts_to_arviz(nuts_fit):
    idata = nuts_fit.to_arviz()
    assert {"posterior", "sample_stats", "log_likelihood", "posterior_predictive",
            "observed_data"} <= set(idata.groups())
    stats = idata.sample_stats
    for name in ("lp", "acceptance_rate", "step_size", "n_steps", "tree_depth", "diverging", "energy"):
        assert stats[name].shape == (2, 150)
    assert list(idata.posterior.chain.values) == [0, 1]
    assert idata.log_likelihood["obs"].dims == ("chain", "draw", "obs_id")
    assert np.isfinite(az.bfmi(idata)).all()
    loo = az.loo(idata)
    assert np.isfinite(loo.elpd_loo)
    assert nuts_fit.posterior["assignment"].dtype.kind == "i"


def test_sample_new_data(nuts_fit, three_blobs):
    gmm = nuts_fit.model
    X, _, _ = three_blobs
    new = gmm.sample(3000, result=nuts_fit, seed=1)
    assert new.shape == (3000, 2)
    # Same overall mean and sd as the data, up to sampling error (sd/sqrt(n) ~ 0.05).
    np.testing.assert_allclose(new.mean(0), X.mean(0), atol=0.25)
    np.testing.assert_allclose(new.std(0), X.std(0), rtol=0.1)


def test_relabel_undoes_permutations():
    rng = np.random.default_rng(0)
    locs = np.array([[0.0, 0.0], [5.0, 5.0], [-5.0, 5.0]])
    C, S, N = 2, 30, 10
    draws = locs + 0.1 * rng.standard_normal((C, S, 3, 2))
    assignment = rng.integers(0, 3, (C, S, N))
    perms = np.array([rng.permutation(3) for _ in range(C * S)]).reshape(C, S, 3)
    permuted = np.take_along_axis(draws, perms[..., None], axis=2)
    inverse = np.argsort(perms, axis=-1)
    permuted_assign = np.take_along_axis(inverse, assignment, axis=-1)
    gmm = lk.models.GaussianMixture(3, covariance="diag")
    out = gmm.relabel({"locs": permuted, "assignment": permuted_assign,
                       "weights": np.take_along_axis(np.tile([0.2, 0.3, 0.5], (C, S, 1)), perms, -1)})
    # Every draw ends with the same labelling as some fixed permutation of the truth.
    reference = out["locs"][0, 0]
    order = [int(np.argmin(((reference - t) ** 2).sum(-1))) for t in locs]
    np.testing.assert_allclose(out["locs"][..., order, :], draws, atol=1.0)
    np.testing.assert_allclose(out["weights"][..., order], np.tile([0.2, 0.3, 0.5], (C, S, 1)))
    np.testing.assert_array_equal(np.argsort(order)[assignment], out["assignment"])
