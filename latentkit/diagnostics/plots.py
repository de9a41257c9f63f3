"""Diagnostic plots as matplotlib figures (for notebooks) and PNG files (for run folders).

ArviZ draws every plot it has: trace, rank, pair, energy, posterior predictive overlay and
LOO-PIT. Written here because ArviZ has no equivalent: the ELBO curve with its convergence
window, the histograms of posterior predictive test statistics with our p-values, and SBC rank
histograms.
"""

import functools
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import arviz as az  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib import MatplotlibDeprecationWarning  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from scipy import stats as scipy_stats  # noqa: E402

from latentkit.inference.result import Result  # noqa: E402
from latentkit.runs import atomic_write  # noqa: E402

__all__ = ["pair_names", "predictive_sites", "plot_trace", "plot_rank", "plot_pair",
           "plot_energy", "plot_elbo", "plot_ppc", "plot_loo_pit",
           "plot_ppc_statistics", "plot_sbc_ranks", "standard_plots", "write_plots", "save_figure", "CAPTIONS"]

#: Plot at most this many variables, each at most this many elements, to keep figures legible.
MAX_VARS, MAX_SIZE = 6, 12
#: Pair plots show at most this many scalar elements in all.
MAX_PAIR = 4
#: Fewer posterior draws than this get no LOO-PIT plot (PSIS fits a tail of 20% of the draws).
MIN_PSIS_DRAWS = 20

F = TypeVar("F", bound=Callable[..., Any])


def _quiet(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with warnings.catch_warnings():
            # ArviZ 0.23 calls matplotlib APIs that matplotlib 3.11 deprecates; nothing for users.
            warnings.simplefilter("ignore", MatplotlibDeprecationWarning)
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _figure(axes: Any) -> Figure:
    return np.ravel(axes)[0].figure


def _var_names(result: Result, max_size: int = MAX_SIZE) -> list[str]:
    # Variables with constant elements (a correlation factor's unit diagonal) have no density.
    names = [k for k, v in result.posterior.items()
             if v.dtype.kind == "f" and v[0, 0].size <= max_size and np.all(np.ptp(v, axis=(0, 1)) > 0)]
    return names[:MAX_VARS]


@_quiet
def plot_trace(result: Result, var_names: list[str] | None = None) -> Figure:
    """``az.plot_trace``: marginal densities and draws per chain."""
    return _figure(az.plot_trace(result.to_arviz(), var_names=var_names or _var_names(result), compact=True))


@_quiet
def plot_rank(result: Result, var_names: list[str] | None = None) -> Figure:
    """``az.plot_rank``: rank histograms per chain (uniform when the chains mix)."""
    return _figure(az.plot_rank(result.to_arviz(), var_names=var_names or _var_names(result)))


def pair_names(result: Result) -> list[str]:
    """The first variables with at most :data:`MAX_PAIR` scalar elements in all."""
    names, total = [], 0
    for name in _var_names(result):
        size = result.posterior[name][0, 0].size
        if total + size <= MAX_PAIR:
            names.append(name)
            total += size
    return names


@_quiet
def plot_pair(result: Result, var_names: list[str] | None = None) -> Figure:
    """``az.plot_pair``: joint scatter of the chosen variables (two scalar elements at least),
    divergences marked (MCMC)."""
    divergences = "diverging" in result.sample_stats
    return _figure(az.plot_pair(result.to_arviz(), var_names=var_names or pair_names(result), kind="scatter",
                                divergences=divergences, marginals=True))


def predictive_sites(result: Result) -> list[str]:
    """Observed sites with posterior predictive draws of the same shape (those that can be overlaid)."""
    return sorted(k for k in set(result.posterior_predictive) & set(result.observed_data)
                  if result.posterior_predictive[k].shape[2:] == np.shape(result.observed_data[k]))


def plot_adversarial_losses(result: Result) -> Figure:
    """The discriminator's and the generator's loss per step of adversarial training."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for color, player in (("C0", "discriminator"), ("C1", "generator")):
        loss = np.asarray(result.params[f"losses.{player}"], dtype=float)
        ax.plot(np.arange(1, len(loss) + 1), loss, lw=0.6, color=color, label=player)
    ax.set(xlabel="step", ylabel="loss", title="adversarial losses")
    ax.legend(loc="upper right")
    fig.tight_layout()
    return fig


@_quiet
def plot_energy(result: Result) -> Figure:
    """``az.plot_energy``: marginal energy vs energy transitions (HMC/NUTS)."""
    return _figure(az.plot_energy(result.to_arviz()))


def plot_elbo(result: Result) -> Figure:
    """The ELBO per step, and a zoom on the last two windows compared by the convergence check."""
    from latentkit.diagnostics.checks import elbo_window

    if result.losses is None:
        raise ValueError("result: has no losses; the ELBO plot is for optimisation-based engines.")
    elbo = -np.asarray(result.losses, dtype=float)
    steps = np.arange(1, len(elbo) + 1)
    window = elbo_window(result.losses)
    fig, (full, zoom) = plt.subplots(1, 2, figsize=(10, 3.5))
    full.plot(steps, elbo, lw=0.6, color="C0")
    tail = elbo[len(elbo) // 10:]  # the first steps dwarf the rest
    low, high = np.quantile(tail, [0.01, 1.0]) if tail.size else (elbo.min(), elbo.max())
    full.set_ylim(low - 0.05 * (high - low + 1e-12), high + 0.05 * (high - low + 1e-12))
    full.axvspan(len(elbo) - window + 0.5, len(elbo) + 0.5, color="C1", alpha=0.2, label="final window")
    full.set(xlabel="step", ylabel="ELBO (nats)", title="ELBO")
    full.legend(loc="lower right")
    start = max(len(elbo) - 2 * window, 0)
    zoom.plot(steps[start:], elbo[start:], lw=0.6, color="C0")
    for lo, hi, color in ((start, len(elbo) - window, "C2"), (len(elbo) - window, len(elbo), "C1")):
        if hi > lo:
            zoom.hlines(elbo[lo:hi].mean(), steps[lo], steps[hi - 1], color=color, lw=2)
    zoom.set(xlabel="step", title=f"last {2 * window} steps: mean of each window")
    fig.tight_layout()
    return fig


@_quiet
def plot_ppc(result: Result, var_name: str | None = None) -> Figure:
    """``az.plot_ppc``: densities of posterior predictive draws over the observed data."""
    draws = result.num_chains * result.num_draws
    names = [var_name] if var_name else None
    return _figure(az.plot_ppc(result.to_arviz(), var_names=names, num_pp_samples=min(50, draws)))


@_quiet
def plot_loo_pit(result: Result, var_name: str | None = None) -> Figure:
    """``az.plot_loo_pit`` (ECDF difference with its simultaneous band) of one observed site."""
    from latentkit.diagnostics.ppc import _pit_arrays, _site

    site = _site(result, var_name)
    y, y_hat, log_weights = _pit_arrays(result, site)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # ArviZ's k-hat warning
        ax = az.plot_loo_pit(y=y, y_hat=y_hat, log_weights=log_weights, ecdf=True)
    ax.set_title(f"LOO-PIT of {site}")
    ax.set_xlabel("LOO-PIT value")
    return _figure(ax)


def plot_ppc_statistics(table: pd.DataFrame, replicated: Mapping[str, np.ndarray]) -> Figure:
    """Histograms of each test statistic over the posterior predictive draws, the observed value
    as a line and the Bayesian p-value in the title (``az.plot_bpv`` recomputes one statistic
    per call from raw draws; these are the statistics :func:`~latentkit.diagnostics.ppc` computed)."""
    n = len(replicated)
    cols = min(n, 4)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, (name, values) in zip(axes.ravel(), replicated.items(), strict=False):
        ax.hist(values, bins=30, color="C0", alpha=0.7)
        ax.axvline(table.loc[name, "observed"], color="k", lw=2)
        ax.set_title(f"{name}: p = {table.loc[name, 'p_value']:.2f}")
        ax.set_yticks([])
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


def plot_sbc_ranks(ranks: pd.DataFrame, num_ranks: int, bins: int) -> Figure:
    """SBC rank histograms per parameter (Talts et al. 2018) with the 99% band of counts expected
    under uniformity; ArviZ 0.23 has no SBC plot.

    Args:
        ranks: one column per scalar parameter, one row per simulation, values 0..num_ranks-1.
        num_ranks: number of possible rank values.
        bins: histogram bins, a divisor of ``num_ranks``.
    """
    names = list(ranks.columns)
    cols = min(len(names), 4)
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    edges = np.arange(0, num_ranks + 1, num_ranks // bins)  # bins divides num_ranks
    low, high = scipy_stats.binom.ppf([0.005, 0.995], len(ranks), 1 / bins)
    for ax, name in zip(axes.ravel(), names, strict=False):
        counts, _ = np.histogram(ranks[name], bins=edges)
        ax.axhspan(low, high, color="0.85", label="99% if uniform")
        ax.stairs(counts, edges, fill=True, color="C0", alpha=0.8)
        ax.set_title(name)
        ax.set_xlabel("rank")
    for ax in axes.ravel()[len(names):]:
        ax.set_visible(False)
    fig.suptitle("SBC rank histograms (grey: 99% band of a uniform histogram)")
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as a PNG atomically and close it."""
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=90, bbox_inches="tight"))
    plt.close(fig)
    return path


#: What each standard plot shows, by file stem (``ppc_<site>`` and ``loo_pit_<site>`` share theirs).
CAPTIONS = {
    "trace": "Trace: marginal densities and draws per chain",
    "pair": "Pair plot of the first scalar parameters (divergent transitions marked)",
    "rank": "Rank plots: uniform when the chains mix",
    "energy": "Energy: the two densities overlap when E-BFMI is healthy",
    "elbo": "ELBO per step, and the last two windows compared by the convergence check",
    "losses": "Discriminator and generator losses per step (adversarial training)",
    "ppc": "Posterior predictive densities over the observed data",
    "loo_pit": "LOO-PIT: the ECDF difference stays inside the band when the predictions are calibrated",
}


def standard_plots(result: Result) -> list[tuple[str, Callable[[], Figure]]]:
    """``(file stem, make figure)`` for every standard plot that applies to ``result``."""
    names = _var_names(result)
    makers: list[tuple[str, Callable[[], Figure]]] = []
    if names:
        makers.append(("trace", lambda: plot_trace(result, names)))
    if sum(result.posterior[k][0, 0].size for k in pair_names(result)) >= 2:
        makers.append(("pair", lambda: plot_pair(result)))
    if names and result.num_chains > 1:
        makers.append(("rank", lambda: plot_rank(result, names)))
    if "energy" in result.sample_stats:
        makers.append(("energy", lambda: plot_energy(result)))
    if result.engine == "adversarial":
        makers.append(("losses", lambda: plot_adversarial_losses(result)))
    elif result.losses is not None:
        makers.append(("elbo", lambda: plot_elbo(result)))
    if callable(getattr(result.model, "plots", None)):  # the model's own plots (a VAE's reconstructions, ...)
        makers.extend(result.model.plots(result))
    sites = predictive_sites(result)
    for site in sites:
        suffix = "" if len(sites) == 1 else f"_{site}"
        makers.append((f"ppc{suffix}", lambda site=site: plot_ppc(result, site)))
        # PSIS needs a tail of draws to fit; a point estimate (one draw) has none.
        if site in result.log_likelihood and result.num_chains * result.num_draws >= MIN_PSIS_DRAWS:
            makers.append((f"loo_pit{suffix}", lambda site=site: plot_loo_pit(result, site)))
    return makers


def write_plots(result: Result, folder: str | Path) -> list[Path]:
    """Write every plot that applies to ``result`` as a PNG into ``folder``: trace, pair, rank,
    energy (MCMC), ELBO (SVI), posterior predictive overlay and LOO-PIT; return the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return [save_figure(make(), folder / f"{name}.png") for name, make in standard_plots(result)]
