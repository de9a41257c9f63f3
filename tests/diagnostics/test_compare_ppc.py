"""Model comparison through ArviZ and posterior predictive checks on constructed results."""

import json

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.figure import Figure
from scipy import stats

from latentkit.diagnostics import compare, loo_pit, ppc
from latentkit.errors import ConfigError
from latentkit.inference import Result

Y = np.random.default_rng(0).normal(1.0, 1.0, size=40)


def normal_fit(mu: np.ndarray, engine: str, y: np.ndarray = Y, seed: int = 1) -> Result:
    """A result of y ~ Normal(mu, 1) with posterior draws ``mu`` of shape (chain, draw)."""
    rng = np.random.default_rng(seed)
    return Result(
        posterior={"mu": mu},
        log_likelihood={"y": stats.norm.logpdf(y, mu[..., None], 1.0)},
        posterior_predictive={"y": rng.normal(mu[..., None], 1.0, size=mu.shape + y.shape)},
        observed_data={"y": y},
        config={"engine": {"name": engine}},
    )


@pytest.fixture()
def fits():
    rng = np.random.default_rng(2)
    exact = Y.mean() + rng.normal(size=(4, 250)) / np.sqrt(len(Y))
    guide = Y.mean() + 0.8 * rng.normal(size=(1, 1000)) / np.sqrt(len(Y))
    wrong = np.full((4, 250), -1.0) + 0.01 * rng.normal(size=(4, 250))
    return normal_fit(exact, "nuts"), normal_fit(guide, "svi"), normal_fit(wrong, "nuts")


def test_compare_ranks_models_and_notes_mixed_engines(fits):
    exact, guide, wrong = fits
    comparison = compare({"nuts": exact, "svi": guide, "wrong": wrong})
    assert comparison.table.index[-1] == "wrong"
    assert set(comparison.pareto_k.columns) >= {"good", "bad", "very_bad", "max_k"}
    assert comparison.pareto_k.loc["nuts", "good"] == len(Y)
    assert any("different engines" in note for note in comparison.notes)
    assert "Pareto k" in str(comparison)
    json.dumps(comparison.to_dict(), default=float)
    waic = compare({"nuts": exact, "wrong": wrong}, ic="waic")
    assert "elpd_waic" in waic.table.columns and waic.pareto_k.empty
    assert not any("different engines" in note for note in waic.notes)


def test_compare_refuses_different_data(fits):
    exact, _, _ = fits
    other = normal_fit(exact.posterior["mu"], "nuts", y=Y + 1.0)
    with pytest.raises(ConfigError, match="different observations"):
        compare({"a": exact, "b": other})
    with pytest.raises(ConfigError, match="at least two"):
        compare({"a": exact})


def test_ppc_p_values_pass_for_a_fitting_model_and_fail_for_a_misfit(fits):
    exact, _, wrong = fits
    report = ppc(exact, ["mean", "sd", "max", np.ptp])
    assert list(report.table.index) == ["mean", "sd", "max", "ptp"]
    assert report.passed and (report.table["verdict"] != "fail").all()
    assert report.pit is not None and report.pit_ks[1] > 0.01
    bad = ppc(wrong, ["mean"])
    assert bad.table.loc["mean", "verdict"] == "fail" and not bad.passed
    assert bad.pit_ks[1] < 0.01  # LOO-PIT piles up at 1: every observation above its prediction
    json.dumps(report.to_dict())
    with pytest.raises(ConfigError, match="unknown"):
        ppc(exact, ["kurtosis"])


def test_loo_pit_for_multivariate_observations_with_one_log_likelihood_per_row():
    rng = np.random.default_rng(3)
    y = rng.normal(size=(30, 2))
    mu = 0.1 * rng.normal(size=(2, 200, 2))
    result = Result(posterior={"mu": mu},
                    log_likelihood={"obs": stats.norm.logpdf(y, mu[:, :, None, :], 1.0).sum(-1)},
                    posterior_predictive={"obs": rng.normal(mu[:, :, None, :], 1.0, size=(2, 200, 30, 2))},
                    observed_data={"obs": y})
    pit = loo_pit(result)
    assert pit.shape == (60,) and ((pit >= 0) & (pit <= 1)).all()
    report = ppc(result, ["mean"], plots=True)
    assert set(report.figures) == {"ppc", "statistics", "loo_pit"}
    assert all(isinstance(f, Figure) for f in report.figures.values())
    plt.close("all")
