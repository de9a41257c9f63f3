"""Posterior predictive checks: Bayesian p-values of test statistics and LOO-PIT."""

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import arviz as az
import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from latentkit.errors import ConfigError
from latentkit.inference.result import Result

__all__ = ["PPCReport", "ppc", "loo_pit", "STATISTICS"]

Statistic = Callable[[np.ndarray], float]

#: Statistics by name, applied to all elements of an observed site (flattened).
STATISTICS: dict[str, Callable[..., Any]] = {
    "mean": lambda x, axis=None: np.mean(x, axis=axis),
    "sd": lambda x, axis=None: np.std(x, axis=axis),
    "min": lambda x, axis=None: np.min(x, axis=axis),
    "max": lambda x, axis=None: np.max(x, axis=axis),
    "median": lambda x, axis=None: np.median(x, axis=axis),
    "q05": lambda x, axis=None: np.quantile(x, 0.05, axis=axis),
    "q95": lambda x, axis=None: np.quantile(x, 0.95, axis=axis),
}
#: Bayesian p-values are not uniform under a good fit (they concentrate near 0.5), so only
#: values this extreme are flagged (Gelman et al., BDA3 ch. 6): fail outside [0.01, 0.99],
#: warn outside [0.05, 0.95].
P_FAIL, P_WARN = 0.01, 0.05
#: LOO-PIT uniformity: a Kolmogorov-Smirnov p-value below this is a warning (PIT values of one
#: data set are not independent, so the test is indicative, never a failure on its own).
PIT_ALPHA = 0.01


@dataclass(frozen=True)
class PPCReport:
    """The result of :func:`ppc`.

    Attributes:
        table: per statistic: observed value, mean and sd of the replicated values, the
            Bayesian p-value P(T(y_rep) >= T(y)) and a verdict.
        replicated: the statistic of every posterior predictive draw, ``{name: (draws,)}``.
        pit: LOO-PIT values per observation element (None without log-likelihood).
        pit_ks: Kolmogorov-Smirnov statistic and p-value of the LOO-PIT values against U(0, 1).
        figures: matplotlib figures by name (``ppc``, ``statistics``, ``loo_pit``) when asked for.
    """

    var_name: str
    table: pd.DataFrame
    replicated: dict[str, np.ndarray]
    pit: np.ndarray | None = None
    pit_ks: tuple[float, float] | None = None
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return bool((self.table["verdict"] != "fail").all())

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"var_name": self.var_name, "passed": self.passed,
                               "statistics": self.table.to_dict(orient="index")}
        if self.pit_ks is not None:
            out["loo_pit"] = {"ks_statistic": self.pit_ks[0], "p_value": self.pit_ks[1]}
        return out

    def __str__(self) -> str:
        lines = [f"posterior predictive checks of {self.var_name!r}:", self.table.round(4).to_string()]
        if self.pit_ks is not None:
            verdict = "ok" if self.pit_ks[1] >= PIT_ALPHA else "warn: not uniform, the model misses the data's shape"
            lines.append(f"LOO-PIT vs U(0,1): KS {self.pit_ks[0]:.3f}, p = {self.pit_ks[1]:.3g} ({verdict})")
        return "\n".join(lines)


def _site(result: Result, var_name: str | None) -> str:
    common = sorted(set(result.posterior_predictive) & set(result.observed_data))
    if var_name is None:
        if len(common) != 1:
            raise ConfigError(f"var_name: choose one of the observed sites {common}.")
        return common[0]
    if var_name not in common:
        raise ConfigError(f"var_name: {var_name!r} has no posterior predictive draws; choose one of {common}.")
    return var_name


def _pit_arrays(result: Result, site: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Observed values, predictive draws and PSIS-LOO log weights, flattened to ``(n,)``,
    ``(n, S)``, ``(n, S)``. A log-likelihood per row of a multivariate observation (a GMM's
    ``(N,)`` for ``obs`` of shape ``(N, D)``) weighs every element of that row."""
    y = np.asarray(result.observed_data[site], dtype=float)
    pp = result.posterior_predictive[site]
    ll = result.log_likelihood[site]
    C, S = pp.shape[:2]
    samples = C * S
    y_hat = np.moveaxis(pp.reshape((samples,) + pp.shape[2:]), 0, -1)  # (*obs, S)
    log_lik = np.moveaxis(ll.reshape((samples,) + ll.shape[2:]), 0, -1)  # (*batch, S)
    reff = 1.0
    if C > 1:  # as ArviZ's loo: mean relative efficiency of the posterior
        ess = az.ess(result.to_arviz(), method="mean", var_names=[
            k for k, v in result.posterior.items() if v.dtype.kind == "f" and np.ptp(v, axis=(0, 1)).max() > 0])
        reff = float(np.nanmean(np.hstack([ess[v].values.ravel() for v in ess.data_vars])) / samples)
    log_weights = np.asarray(az.psislw(-log_lik, reff=reff)[0])  # (*batch, S)
    extra = y.ndim - (log_lik.ndim - 1)  # event dims of the observation
    log_weights = log_weights.reshape(log_lik.shape[:-1] + (1,) * extra + (samples,))
    log_weights = np.broadcast_to(log_weights, y.shape + (samples,))
    return y.reshape(-1), y_hat.reshape(-1, samples), np.ascontiguousarray(log_weights).reshape(-1, samples)


def loo_pit(result: Result, var_name: str | None = None) -> np.ndarray:
    """LOO-PIT values of each observed element (``az.loo_pit``), shape ``(n,)``."""
    site = _site(result, var_name)
    y, y_hat, log_weights = _pit_arrays(result, site)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # ArviZ's k-hat warning; compare() reports k
        return np.asarray(az.loo_pit(y=y, y_hat=y_hat, log_weights=log_weights))


def ppc(
    result: Result,
    statistics: Sequence[str | Statistic] = ("mean", "sd", "min", "max"),
    *,
    var_name: str | None = None,
    plots: bool = False,
) -> PPCReport:
    """Bayesian p-values of test statistics and the LOO-PIT check of one observed site.

    Args:
        result: a fitted result with posterior predictive draws.
        statistics: names from :data:`STATISTICS` or functions of the observed array (its own
            shape) returning a number.
        var_name: the observed site (needed when there are several).
        plots: also draw the figures (``ppc`` overlay, ``statistics``, ``loo_pit``).

    Shapes:
        a statistic sees one array of the observed site's shape; ``replicated[name]`` is
        ``(chain * draw,)``.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> res = Result(posterior={"mu": rng.normal(size=(1, 200))},
        ...              posterior_predictive={"y": rng.normal(size=(1, 200, 30))},
        ...              observed_data={"y": rng.normal(size=30)})
        >>> ppc(res, ["mean", "max"]).table["p_value"].between(0, 1).all()
        np.True_
    """
    site = _site(result, var_name)
    y = np.asarray(result.observed_data[site])
    pp = result.posterior_predictive[site]
    draws = pp.reshape((-1,) + pp.shape[2:])
    rows, replicated = [], {}
    for statistic in statistics:
        if isinstance(statistic, str):
            if statistic not in STATISTICS:
                raise ConfigError(f"statistics: unknown {statistic!r}; use one of {sorted(STATISTICS)} or a function.")
            name, fn = statistic, STATISTICS[statistic]
            observed = float(fn(y.reshape(-1)))
            values = np.asarray(fn(draws.reshape(len(draws), -1), axis=1), dtype=float)
        else:
            name = getattr(statistic, "__name__", repr(statistic))
            observed = float(statistic(y))
            values = np.array([float(statistic(d)) for d in draws])
        # Ties (discrete data) count half, so a statistic equal in every draw gets p = 0.5.
        p = float(np.mean(values > observed) + 0.5 * np.mean(values == observed))
        tail = min(p, 1 - p)
        verdict = "fail" if tail < P_FAIL else "warn" if tail < P_WARN else "pass"
        replicated[name] = values
        rows.append({"statistic": name, "observed": observed, "replicated_mean": float(values.mean()),
                     "replicated_sd": float(values.std()), "p_value": p, "verdict": verdict})
    table = pd.DataFrame(rows).set_index("statistic")
    pit = ks = None
    if site in result.log_likelihood:
        pit = loo_pit(result, site)
        test = scipy_stats.kstest(pit, "uniform")
        ks = (float(test.statistic), float(test.pvalue))
    figures = {}
    if plots:
        from latentkit.diagnostics import plots as plotting

        figures["ppc"] = plotting.plot_ppc(result, var_name=site)
        figures["statistics"] = plotting.plot_ppc_statistics(table, replicated)
        if pit is not None:
            figures["loo_pit"] = plotting.plot_loo_pit(result, var_name=site)
    return PPCReport(var_name=site, table=table, replicated=replicated, pit=pit, pit_ks=ks, figures=figures)
