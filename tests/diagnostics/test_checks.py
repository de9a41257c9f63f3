"""Every verdict of ``check`` passes and fails on constructed inputs."""

import json

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

import latentkit as lk
from latentkit.diagnostics import check
from latentkit.inference import Result


def verdicts(result: Result) -> dict[str, str]:
    return {c.name: c.verdict for c in check(result).checks}


def mcmc(posterior: dict, **stats) -> Result:
    config = {"engine": {"name": "nuts", "options": {"max_tree_depth": 10}}}
    return Result(posterior=posterior, sample_stats=stats, config=config)


@pytest.fixture()
def rng():
    return np.random.default_rng(0)


def test_mixing_chains_pass_and_disagreeing_chains_fail_r_hat(rng):
    good = verdicts(mcmc({"x": rng.normal(size=(4, 500))}))
    assert good["r_hat"] == "pass" and good["ess_bulk"] == "pass" and good["ess_tail"] == "pass"
    # Chains drawn from different distributions.
    shifted = rng.normal(size=(4, 500)) + np.array([0.0, 0.0, 0.5, 1.0])[:, None]
    report = check(mcmc({"x": shifted}))
    assert {c.name: c.verdict for c in report.checks}["r_hat"] == "fail"
    assert not report.passed and "FAIL" in str(report) and "at x" in str(report)


def test_ess_leaves_out_elements_that_never_change(rng):
    # Antithetic draws (negatively correlated steps): bulk-ESS above the 2,000 draws. A constant
    # element beside them (a Cholesky factor's zero) has no ESS; ArviZ would say 2,000.
    steps = rng.normal(size=(4, 500))
    antithetic = steps - 0.5 * np.roll(steps, 1, axis=1)
    factor = np.stack([antithetic, np.zeros((4, 500))], axis=-1)
    worst = {c.name: c for c in check(mcmc({"L": factor})).checks}["ess_bulk"]
    assert worst.value > 2000 and worst.verdict == "pass"


def test_autocorrelated_chains_fail_ess(rng):
    noise = rng.normal(size=(4, 500))
    ar = np.zeros_like(noise)
    for t in range(1, 500):  # AR(1) with rho 0.98: ESS about 500 * 0.02 / 1.98 per chain
        ar[:, t] = 0.98 * ar[:, t - 1] + noise[:, t]
    result = verdicts(mcmc({"x": ar}))
    assert result["ess_bulk"] == "fail" and result["ess_tail"] == "fail"


def test_sampler_statistics_verdicts(rng):
    posterior = {"x": rng.normal(size=(2, 400))}
    energy_iid = rng.normal(size=(2, 400))
    good = verdicts(mcmc(posterior, diverging=np.zeros((2, 400), bool), tree_depth=np.full((2, 400), 3),
                         energy=energy_iid))
    assert good["divergences"] == good["tree_depth_saturation"] == good["e_bfmi"] == "pass"
    diverging = np.zeros((2, 400), bool)
    diverging[0, 7] = True
    depth = np.full((2, 400), 3)
    depth[1, :40] = 10
    energy_walk = np.cumsum(rng.normal(size=(2, 400)), axis=1)  # E-BFMI near 0
    bad = verdicts(mcmc(posterior, diverging=diverging, tree_depth=depth, energy=energy_walk))
    assert bad["divergences"] == bad["tree_depth_saturation"] == bad["e_bfmi"] == "fail"


def svi_result(losses: np.ndarray) -> Result:
    return Result(posterior={"x": np.random.default_rng(1).normal(size=(1, 100))}, losses=losses,
                  config={"engine": {"name": "svi"}})


def test_elbo_converged_and_still_moving(rng):
    steps = np.arange(2000)
    converged = 100 + 50 * np.exp(-steps / 100) + rng.normal(0, 1.0, 2000)
    assert verdicts(svi_result(converged))["elbo_converged"] == "pass"
    moving = 100 + 50 * np.exp(-steps / 3000) + rng.normal(0, 1.0, 2000)
    assert verdicts(svi_result(moving))["elbo_converged"] == "fail"
    assert verdicts(svi_result(converged[:6]))["elbo_converged"] == "fail"  # too short to judge


#: A strongly correlated 3-D Gaussian: a mean-field guide matches only the conditional scales.
COV = torch.tensor([[1.0, 0.95, 0.9], [0.95, 1.0, 0.95], [0.9, 0.95, 1.0]])


def correlated(y=None):
    z = pyro.sample("z", dist.MultivariateNormal(torch.zeros(3), COV))
    pyro.sample("y", dist.Normal(z.sum(-1, keepdim=True), 10.0).to_event(1), obs=y)


@pytest.mark.parametrize(("guide", "fails"), [("normal", True), ("multivariate_normal", False)])
def test_pareto_k_of_mean_field_and_full_rank_guides(guide, fails):
    res = lk.fit(correlated, {"y": torch.tensor([0.5])}, engine="svi", guide=guide, steps=1500, learning_rate=0.05,
                 num_samples=1000, progress=False, seed=0)
    report = check(res)
    k = next(c for c in report.checks if c.name == "pareto_k")
    assert (k.value > 0.7) == fails and (k.verdict == "fail") == fails
    if not fails:  # PSIS-corrected means are reported and close to the exact mean
        exact = COV.sum(-1) * 0.5 / (COV.sum() + 100.0)
        assert np.allclose(report.psis_means["z"]["psis"], exact.numpy(), atol=0.1)
    else:
        assert report.psis_means == {}
    json.dumps(report.to_dict())  # machine-readable


def test_point_estimate_gets_no_k_hat_verdict():
    res = lk.fit(correlated, {"y": torch.tensor([0.5])}, engine="svi", guide="delta", steps=50,
                 num_samples=20, progress=False)
    k = next(c for c in check(res).checks if c.name == "pareto_k")
    assert k.verdict == "warn" and np.isnan(k.value)


def test_one_chain_gets_a_warning_instead_of_r_hat(rng):
    result = verdicts(mcmc({"x": rng.normal(size=(1, 500))}))
    assert result["r_hat"] == "warn" and result["ess_bulk"] == "pass"
