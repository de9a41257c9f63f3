"""Hidden Markov models: exact forward/Viterbi/FFBS against brute force and hmmlearn, variable
lengths, parameter recovery with SVI and NUTS for every emission family, data errors."""

import itertools

import numpy as np
import pandas as pd
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

import latentkit as lk
from latentkit.datasets import make_markov_chain
from latentkit.errors import ConfigError, DataError
from latentkit.models import hmm_ops

TRANSITION = np.array([[0.95, 0.05], [0.10, 0.90]])
GAUSS_LOCS, GAUSS_SCALES = np.array([[-1.0], [2.0]]), np.array([[0.5], [1.0]])
RATES = np.array([3.0, 12.0])
EMISSION = np.array([[0.7, 0.2, 0.1], [0.1, 0.2, 0.7]])


def simulate(family: str, T: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(observations, states) of a 2-state HMM with the parameters above."""
    z = make_markov_chain(T, TRANSITION, np.array([0.5, 0.5]), seed=seed)
    rng = np.random.default_rng(seed + 100)
    if family == "gaussian":
        x = rng.normal(GAUSS_LOCS[z], GAUSS_SCALES[z])
    elif family == "poisson":
        x = rng.poisson(RATES[z])
    else:
        x = np.array([rng.choice(3, p=EMISSION[k]) for k in z])
    return x, z


def brute_force(log_init, log_trans, obs_logp):
    """log p(x, z) for every path z (K**T of them) and the paths."""
    T, K = obs_logp.shape
    paths = list(itertools.product(range(K), repeat=T))
    joint = torch.stack([log_init[z[0]] + obs_logp[0, z[0]]
                         + sum(log_trans[z[t - 1], z[t]] + obs_logp[t, z[t]] for t in range(1, T))
                         for z in paths])
    return joint, torch.tensor(paths)


@pytest.fixture
def tiny():
    """A random K = 3, T = 6 Gaussian HMM with its data and emission log-densities."""
    g = torch.Generator().manual_seed(1)
    K, T = 3, 6
    log_init = torch.randn(K, generator=g).log_softmax(-1)
    log_trans = torch.randn(K, K, generator=g).log_softmax(-1)
    locs, scales = torch.randn(K, 1, generator=g) * 2, torch.rand(K, 1, generator=g) + 0.5
    x = torch.randn(T, 1, generator=g) * 2
    obs_logp = dist.Normal(locs, scales).to_event(1).log_prob(x.unsqueeze(-2))
    return log_init, log_trans, locs, scales, x, obs_logp


# -- exactness -----------------------------------------------------------------------------------------
@pytest.fixture(params=[True, False], ids=["fused", "tensor-ops"])
def fused(request, monkeypatch):
    """Both forward algorithms: the compiled loop (CPU's) and the tensor-operation one (GPUs')."""
    monkeypatch.setattr(hmm_ops, "FUSED_ON_CPU", request.param)
    return request.param


def test_forward_matches_brute_force(tiny, fused):
    log_init, log_trans, locs, scales, x, obs_logp = tiny
    joint, _ = brute_force(log_init, log_trans, obs_logp)
    expected = joint.logsumexp(0)
    assert torch.allclose(hmm_ops.log_likelihood(log_init, log_trans, obs_logp), expected, atol=1e-6, rtol=0)
    # The same number through the model's observed site, with the model's own emission.
    model = lk.models.GaussianHMM(3)
    values = {"initial": log_init.exp(), "transition": log_trans.exp(), "locs": locs, "scales": scales}
    kwargs = model.prepare(x.numpy())
    trace = poutine.trace(poutine.condition(model.model, values)).get_trace(**kwargs)
    assert torch.allclose(trace.nodes["obs"]["fn"].log_prob(trace.nodes["obs"]["value"]), expected, atol=1e-6)
    # Pyro's DiscreteHMM puts the initial state before the first step: with log_init as the
    # first transition row for every state, it computes the same sum.
    steps = torch.cat([log_init.expand(1, 3, 3), log_trans.expand(5, 3, 3)])
    discrete = dist.DiscreteHMM(torch.zeros(3), steps, dist.Normal(locs, scales).to_event(1))
    assert torch.allclose(discrete.log_prob(x), expected, atol=1e-6)


def test_gradient_matches_autograd_of_brute_force(tiny, fused):
    log_init, log_trans, _, _, _, obs_logp = tiny
    args = [t.clone().requires_grad_(True) for t in (log_init, log_trans, obs_logp)]
    fast = torch.autograd.grad(hmm_ops.log_likelihood(*args), args)
    slow = torch.autograd.grad(brute_force(*args)[0].logsumexp(0), args)
    for a, b in zip(fast, slow, strict=True):
        assert torch.allclose(a, b, atol=1e-9)


@pytest.mark.parametrize("T", [2, 3, 17, 300])
def test_pairwise_and_blocked_forward_agree(T, monkeypatch):
    """Short sequences use pairwise products, long ones the blocked scan, the CPU a compiled loop:
    same value and gradient, with padding, and equal to the log-space filter's normaliser."""
    g = torch.Generator().manual_seed(T)
    args = [torch.randn(2, 3, generator=g).log_softmax(-1), torch.randn(2, 3, 3, generator=g).log_softmax(-1),
            torch.randn(2, T, 3, generator=g) * 3]
    mask = torch.arange(T) < torch.tensor([[T], [max(T // 2, 1)]])
    results = []
    for fused, limit in ((False, hmm_ops.TREE_MAX_STEPS), (False, 0), (True, 0)):
        monkeypatch.setattr(hmm_ops, "FUSED_ON_CPU", fused)
        monkeypatch.setattr(hmm_ops, "TREE_MAX_STEPS", limit)
        leaves = [a.clone().requires_grad_(True) for a in args]
        value = hmm_ops.log_likelihood(*leaves, mask)
        results.append((value, torch.autograd.grad(value.sum(), leaves)))
    (v1, g1), *others = results
    for v2, g2 in others:
        assert torch.allclose(v1, v2, atol=1e-9)
        assert all(torch.allclose(a, b, atol=1e-9) for a, b in zip(g1, g2, strict=True))
    alpha = hmm_ops._scan(args[0] + args[2][..., 0, :], hmm_ops._step_matrices(args[1], args[2], mask), "sum")
    assert torch.allclose(v1, alpha[..., -1, :].logsumexp(-1), atol=1e-9)


def test_viterbi_and_marginals_match_brute_force(tiny):
    log_init, log_trans, _, _, _, obs_logp = tiny
    joint, paths = brute_force(log_init, log_trans, obs_logp)
    assert hmm_ops.viterbi(log_init, log_trans, obs_logp).tolist() == paths[joint.argmax()].tolist()
    posterior = (joint - joint.logsumexp(0)).exp()
    smooth = torch.stack([torch.stack([posterior[paths[:, t] == k].sum() for k in range(3)]) for t in range(6)])
    assert torch.allclose(hmm_ops.smooth_log_marginals(log_init, log_trans, obs_logp).exp(), smooth, atol=1e-9)
    filtered = hmm_ops.filter_log_marginals(log_init, log_trans, obs_logp).exp()
    for t in range(6):  # p(z_t | x_0..x_t): brute force on the prefix
        prefix_joint, prefix_paths = brute_force(log_init, log_trans, obs_logp[: t + 1])
        prefix = (prefix_joint - prefix_joint.logsumexp(0)).exp()
        expected = torch.stack([prefix[prefix_paths[:, t] == k].sum() for k in range(3)])
        assert torch.allclose(filtered[t], expected, atol=1e-9)


def test_ffbs_samples_the_exact_posterior(tiny):
    log_init, log_trans, _, _, _, obs_logp = tiny
    obs_logp = obs_logp[:4]  # 81 paths
    joint, paths = brute_force(log_init, log_trans, obs_logp)
    exact = (joint - joint.logsumexp(0)).exp()
    n = 40_000
    draws = hmm_ops.sample_states(log_init, log_trans, obs_logp.expand(n, 4, 3))
    code = (draws * torch.tensor([27, 9, 3, 1])).sum(-1)
    freq = torch.bincount(code, minlength=81).double() / n
    order = (paths * torch.tensor([27, 9, 3, 1])).sum(-1)
    # Binomial sd of a frequency is <= 0.0025 at n = 40,000: 0.012 is about 5 sd.
    assert (freq[order] - exact).abs().max() < 0.012


def test_variable_lengths_equal_separate_scoring():
    rng = np.random.default_rng(0)
    sequences = [rng.normal(size=(T, 2)) for T in (7, 2, 11)]
    model = lk.models.GaussianHMM(3, covariance="full")
    kwargs = model.prepare(sequences)
    assert kwargs["X"].shape == (3, 11, 2) and kwargs["mask"].sum(1).tolist() == [7, 2, 11]
    values = model.initial_values(kwargs, 0)
    values["scale_tril"] = values.pop("scales").unsqueeze(-1) * values.pop("corr_cholesky")
    params = {k: v.unsqueeze(0).unsqueeze(0) for k, v in values.items()}

    def score(data):
        seqs = model._read(data)
        factors = model._factors(params, seqs)
        return hmm_ops.log_likelihood(*factors, seqs.mask)[0]

    together = score(sequences)
    alone = torch.cat([score(s) for s in sequences])
    assert torch.allclose(together, alone, atol=1e-10)
    # Decoding and smoothing a padded batch give each sequence's own answer.
    seqs = model._read(sequences)
    paths = hmm_ops.viterbi(*model._factors(params, seqs), seqs.mask)[0]
    for i, s in enumerate(sequences):
        own = hmm_ops.viterbi(*model._factors(params, model._read(s)))[0, 0]
        assert paths[i, : len(s)].tolist() == own.tolist()


def test_matches_hmmlearn_score():
    hmm = pytest.importorskip("hmmlearn.hmm")
    rng = np.random.default_rng(0)
    init, trans = np.array([0.2, 0.8]), TRANSITION
    cases = []
    x = rng.normal(size=(50, 2))
    ref = hmm.GaussianHMM(2, covariance_type="full")
    ref.n_features = 2
    ref.startprob_, ref.transmat_, ref.means_ = init, trans, np.array([[-1.0, 0.0], [1.0, 0.5]])
    ref.covars_ = np.array([[[1.0, 0.3], [0.3, 0.5]], [[0.7, -0.2], [-0.2, 1.2]]])
    tril = np.linalg.cholesky(ref.covars_)
    cases.append((lk.models.GaussianHMM(2, covariance="full"), x, ref,
                  {"locs": ref.means_, "scale_tril": tril}))
    counts = rng.poisson(5.0, size=60)
    ref = hmm.PoissonHMM(2)
    ref.n_features = 1
    ref.startprob_, ref.transmat_, ref.lambdas_ = init, trans, np.array([[2.0], [8.0]])
    cases.append((lk.models.PoissonHMM(2), counts, ref, {"rates": np.array([2.0, 8.0])}))
    symbols = rng.integers(0, 3, size=60)
    ref = hmm.CategoricalHMM(2, n_features=3)
    ref.startprob_, ref.transmat_, ref.emissionprob_ = init, trans, EMISSION
    cases.append((lk.models.CategoricalHMM(2, 3), symbols, ref, {"emission": EMISSION}))
    for model, data, ref, emission in cases:
        values = {"initial": init, "transition": trans, **emission}
        params = {k: torch.as_tensor(v).unsqueeze(0).unsqueeze(0) for k, v in values.items()}
        seqs = model._read(data)
        ours = hmm_ops.log_likelihood(*model._factors(params, seqs))[0, 0].item()
        theirs = ref.score(np.asarray(data).reshape(len(data), -1))
        assert ours == pytest.approx(theirs, abs=1e-6), type(model).__name__
        assert model.decode(_fake_result(values), data).tolist() == ref.predict(
            np.asarray(data).reshape(len(data), -1)).tolist()


def _fake_result(values):
    """A one-draw result holding the given parameters."""
    return lk.inference.Result(posterior={k: np.asarray(v)[None, None] for k, v in values.items()})


# -- fitting -------------------------------------------------------------------------------------------
SVI = {"engine": "svi", "guide": "delta", "steps": 300, "learning_rate": 0.05, "num_samples": 1,
       "progress": False}


def _matched(estimate, truth):
    """Estimate reordered to the truth's state order (states are exchangeable)."""
    order = [int(np.argmin(np.abs(estimate.reshape(2, -1) - t.reshape(1, -1)).sum(-1))) for t in truth]
    return estimate[order], order


def test_gaussian_map_recovers_parameters():
    x, z = simulate("gaussian", 2000)
    model = lk.models.GaussianHMM(2)
    res = lk.fit(model, x, **SVI)
    post = {k: v[0, 0] for k, v in res.posterior.items()}
    locs, order = _matched(post["locs"], GAUSS_LOCS)
    # T = 2000 puts ~1300 and ~700 steps in the states: the MLE's sd is <= 1/sqrt(700) = 0.04
    # for locs, <= 3% for scales, <= 0.012 for transition probabilities; the tolerances are ~4 sd.
    np.testing.assert_allclose(locs, GAUSS_LOCS, atol=0.15)
    np.testing.assert_allclose(post["scales"][order], GAUSS_SCALES, rtol=0.12)
    np.testing.assert_allclose(post["transition"][np.ix_(order, order)], TRANSITION, atol=0.05)
    # MAP-decoded states agree with the truth where the states are distinguishable.
    assert (np.asarray(order)[model.decode(res, x)] == z).mean() > 0.95
    assert res.log_likelihood["obs"].shape == (1, 1, 1)  # one value per sequence
    states = res.posterior["states"]
    assert states.shape == (1, 1, 1, 2000) and (np.asarray(order)[states[0, 0, 0]] == z).mean() > 0.9


def test_full_covariance_map_and_normal_guide():
    z = make_markov_chain(2000, TRANSITION, seed=3)
    locs = np.array([[-2.0, 0.0], [2.0, 1.0]])
    cov = np.array([[1.0, 0.5], [0.5, 1.0]])
    x = locs[z] + np.random.default_rng(3).multivariate_normal(np.zeros(2), cov, size=2000)
    res = lk.fit(lk.models.GaussianHMM(2, covariance="full"), x, **SVI)
    post = {k: v[0, 0] for k, v in res.posterior.items()}
    est, order = _matched(post["locs"], locs)
    np.testing.assert_allclose(est, locs, atol=0.15)
    tril = post["scale_tril"][order]
    # Covariance entries have MLE sd ~ sqrt(2/700) = 0.05: 0.2 is 4 sd.
    np.testing.assert_allclose(tril @ np.swapaxes(tril, -1, -2), np.stack([cov, cov]), atol=0.2)
    # A full (AutoNormal) guide gives posterior sds of the size the Fisher information implies.
    res = lk.fit(lk.models.PoissonHMM(2), simulate("poisson", 2000)[0], engine="svi", steps=600,
                 learning_rate=0.05, num_samples=200, progress=False)
    rates = res.posterior["rates"][0]
    np.testing.assert_allclose(np.sort(rates.mean(0)), RATES, rtol=0.1)
    sd = rates.std(0)[np.argsort(rates.mean(0))]
    # sqrt(rate / n_state) ~ (0.05, 0.13) for ~1300 and ~700 steps; mean-field guides are a bit narrower.
    assert np.all(sd > 0.02) and np.all(sd < 0.3)


@pytest.mark.parametrize("family", ["poisson", "categorical"])
def test_discrete_emissions_map_recover_parameters(family):
    x, z = simulate(family, 2000)
    model = lk.models.PoissonHMM(2) if family == "poisson" else lk.models.CategoricalHMM(2, 3)
    res = lk.fit(model, x, **SVI)
    post = {k: v[0, 0] for k, v in res.posterior.items()}
    if family == "poisson":
        est, order = _matched(post["rates"], RATES)
        np.testing.assert_allclose(est, RATES, rtol=0.08)  # sd <= sqrt(12 / 700) / 12 = 1.1%
    else:
        est, order = _matched(post["emission"], EMISSION)
        np.testing.assert_allclose(est, EMISSION, atol=0.06)  # sd <= sqrt(.21 / 700) = 0.017
    np.testing.assert_allclose(post["transition"][np.ix_(order, order)], TRANSITION, atol=0.05)
    assert (np.asarray(order)[model.decode(res, x)] == z).mean() > 0.85


NUTS = {"engine": "nuts", "num_chains": 2, "num_warmup": 150, "num_samples": 200, "progress": False}
NUTS_SITES = {"gaussian": ("locs", GAUSS_LOCS), "poisson": ("rates", RATES), "categorical": ("emission", EMISSION)}
_NUTS_FITS: dict = {}


def nuts_fit(family: str):
    """A NUTS fit of the family's model to T = 300 steps, run once per test session."""
    if family not in _NUTS_FITS:
        x, _ = simulate(family, 300, seed=5)
        model = {"gaussian": lk.models.GaussianHMM(2), "poisson": lk.models.PoissonHMM(2),
                 "categorical": lk.models.CategoricalHMM(2, 3)}[family]
        _NUTS_FITS[family] = (x, lk.fit(model, x, seed=1, **NUTS))
    return _NUTS_FITS[family]


# One NUTS fit takes ~20-60 s on a shared 2-core machine: the Gaussian family always runs,
# the other two behind the ``slow`` marker (they run in the full suite, skip with -m "not slow").
@pytest.mark.parametrize("family", ["gaussian", pytest.param("poisson", marks=pytest.mark.slow),
                                    pytest.param("categorical", marks=pytest.mark.slow)])
def test_nuts_recovers_parameters_with_consistent_labels(family):
    x, res = nuts_fit(family)
    name, truth = NUTS_SITES[family]
    summary = res.summary(var_names=[name, "transition"])
    # Labels agree across chains (relabelling), so R-hat is meaningful.
    assert summary["r_hat"].max() < 1.05
    assert summary["ess_bulk"].min() > 50
    draws = res.posterior[name].reshape((-1,) + truth.shape)
    mean, order = _matched(draws.mean(0), truth)
    sd = draws.std(0)[order]
    mcse = summary["mcse_mean"].to_numpy()[: truth.size].reshape(truth.shape)[order]
    # The truth is one draw from (about) the posterior: within 4 posterior sd of its mean
    # (probability 0.9999 per parameter), plus the Monte Carlo error of the mean.
    assert np.all(np.abs(mean - truth) < 4 * sd + 5 * mcse)
    trans = res.posterior["transition"].reshape(-1, 2, 2)
    assert np.all(np.abs(trans.mean(0)[np.ix_(order, order)] - TRANSITION) < 4 * trans.std(0) + 0.02)


def test_nuts_result_groups_and_states():
    x, res = nuts_fit("gaussian")
    idata = res.to_arviz()
    assert idata.log_likelihood["obs"].dims == ("chain", "draw", "sequence")
    assert idata.posterior["transition"].dims == ("chain", "draw", "state", "state_next")
    states = res.posterior["states"]
    assert states.shape == (2, 200, 1, 300)
    recovered = states[..., 0, 0] >= 0
    assert recovered.sum() == 200 and recovered[0].any() and recovered[1].any()
    assert set(np.unique(states[recovered])) <= {0, 1}
    # Smoothed probabilities agree with the frequency of each state over the sampled paths
    # (200 paths: binomial sd <= 0.035, and the mean over 300 steps is far tighter).
    smooth = res.model.smooth(res, x)
    assert smooth.shape == (300, 2) and np.allclose(smooth.sum(-1), 1)
    freq = (states[recovered][:, 0] == 1).mean(0)
    assert np.abs(freq - smooth[:, 1]).mean() < 0.03
    filtered = res.model.filter(res, x)
    assert filtered.shape == (300, 2) and np.allclose(filtered[-1], smooth[-1])


def test_sample_and_forecast():
    x, res = nuts_fit("gaussian")
    model = res.model
    new, states = model.sample(5000, result=res, seed=1, return_states=True)
    assert new.shape == (5000, 1) and states.shape == (5000,)
    # The sample comes from one posterior draw: its mean is near that draw's stationary mean,
    # which lies in the range of the posterior draws' stationary means. 5000 steps of a chain
    # with sojourns of ~10-20 steps are ~300 sojourns: the sample mean's sd is < 0.15.
    trans, locs = res.posterior["transition"].reshape(-1, 2, 2), res.posterior["locs"].reshape(-1, 2)
    share = trans[:, 0, 1] / (trans[:, 0, 1] + trans[:, 1, 0])  # stationary P(state 1)
    means = (1 - share) * locs[:, 0] + share * locs[:, 1]
    assert means.min() - 0.5 < new.mean() < means.max() + 0.5
    forecast = model.forecast(res, x, horizon=10, num_draws=50, seed=0)
    assert forecast.obs.shape == (50, 10, 1) and forecast.states.shape == (50, 10)
    # One step ahead, the forecast stays in the last step's state with probability >= 0.9.
    last = model.smooth(res, x)[-1].argmax()
    assert (forecast.states[:, 0] == last).mean() > 0.7


# -- data handling -----------------------------------------------------------------------------------
def test_dataframe_long_format_fits_through_lk_fit():
    x0, _ = simulate("poisson", 40, seed=1)
    x1, _ = simulate("poisson", 25, seed=2)
    frame = pd.DataFrame({"site": ["b"] * 40 + ["a"] * 25, "count": np.concatenate([x0, x1])})
    model = lk.models.PoissonHMM(2, sequence_column="site")
    res = lk.fit(model, frame, engine="svi", guide="delta", steps=20, num_samples=2, progress=False)
    assert res.coords["sequence"] == ["b", "a"]
    assert res.log_likelihood["obs"].shape == (1, 2, 2)
    assert (res.posterior["states"][0, 0, 1, 25:] == -1).all()  # padding
    paths = model.decode(res, frame)
    assert [len(p) for p in paths] == [40, 25]
    assert model.forecast(res, frame, horizon=3, num_draws=2)[1].obs.shape == (2, 3)


def test_relabel_undoes_permutations():
    rng = np.random.default_rng(0)
    C, S = 2, 20
    perms = np.array([rng.permutation(3) for _ in range(C * S)]).reshape(C, S, 3)
    rates = np.array([1.0, 5.0, 20.0]) * np.exp(0.05 * rng.standard_normal((C, S, 3)))
    trans = np.tile(np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.3, 0.3, 0.4]]), (C, S, 1, 1))
    states = np.tile(np.array([0, 1, 2, 2, -1], dtype=np.int8), (C, S, 1, 1))
    inverse = np.argsort(perms, -1)
    posterior = {
        "initial": np.take_along_axis(np.tile([0.2, 0.3, 0.5], (C, S, 1)), perms, -1),
        "transition": np.take_along_axis(np.take_along_axis(trans, perms[..., :, None], 2), perms[..., None, :], 3),
        "rates": np.take_along_axis(rates, perms, -1),
        "states": np.where(states >= 0, np.take_along_axis(inverse, np.clip(states[:, :, 0], 0, 2), -1)[:, :, None],
                           -1).astype(np.int8),
    }
    out = lk.models.PoissonHMM(3).relabel(posterior)
    order = np.argsort(out["rates"][0, 0])
    np.testing.assert_allclose(out["rates"][..., order], rates, rtol=0.3)
    np.testing.assert_allclose(out["transition"][..., order[:, None], order[None, :]], trans)
    np.testing.assert_allclose(out["initial"][..., order], np.tile([0.2, 0.3, 0.5], (C, S, 1)))
    assert (np.where(states >= 0, order[np.clip(states, 0, 2)], -1) == out["states"]).all()


@pytest.mark.parametrize("model, data, message", [
    (lk.models.GaussianHMM(2), np.array([0.0, np.nan, 1.0]), "NaN"),
    (lk.models.GaussianHMM(2), [np.zeros((5, 2)), np.zeros((4, 3))], "different dimensions"),
    (lk.models.GaussianHMM(2), [np.zeros(5), np.zeros(0)], "empty"),
    (lk.models.PoissonHMM(2), [3, -1, 2], ">= 0"),
    (lk.models.PoissonHMM(2), [3, 1.5, 2], "whole numbers"),
    (lk.models.CategoricalHMM(2, 3), [0, 1, 3], "outside"),
    (lk.models.CategoricalHMM(2, 3), [0, -1], "outside"),
    (lk.models.CategoricalHMM(2, 3), [0, 1.5], "integers"),
    (lk.models.GaussianHMM(2), np.zeros((3, 2, 2)), "shape"),
    (lk.models.GaussianHMM(2, sequence_column="id"), pd.DataFrame({"x": [1.0]}), "sequence_column"),
])
def test_data_errors(model, data, message):
    with pytest.raises(DataError, match=message) as info:
        model.prepare(data)
    assert str(info.value).split(":")[0].startswith(("data", "sequence_column"))  # names the argument


def test_bad_constructor_arguments():
    with pytest.raises(DataError, match="n_states"):
        lk.models.GaussianHMM(0)
    with pytest.raises(DataError, match="n_symbols"):
        lk.models.CategoricalHMM(2, 0)
    with pytest.raises(ConfigError, match="covariance"):
        lk.models.GaussianHMM(2, covariance="spherical")
    with pytest.raises(ConfigError, match="sticky"):
        lk.models.PoissonHMM(2, sticky=-1.0)


def test_earthquakes_poisson_hmm_and_run_folder(tmp_path):
    counts = lk.datasets.load_earthquakes()["count"].to_numpy()
    model = lk.models.PoissonHMM(2)
    res = lk.fit(model, counts, engine="svi", guide="delta", steps=300, learning_rate=0.05, num_samples=1,
                 progress=False)
    # Zucchini & MacDonald (2009) report the 2-state maximum-likelihood rates 15.47 and 26.13.
    np.testing.assert_allclose(np.sort(res.posterior["rates"][0, 0]), [15.47, 26.13], rtol=0.05)
    res.save(tmp_path / "quakes", plots=False)
    loaded = lk.load(tmp_path / "quakes")
    assert isinstance(loaded.model, lk.models.PoissonHMM) and loaded.model.init_args == model.init_args
    np.testing.assert_array_equal(loaded.model.decode(loaded, counts), model.decode(res, counts))
