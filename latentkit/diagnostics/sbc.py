"""Simulation-based calibration (Talts et al. 2018, "Validating Bayesian inference algorithms
with simulation-based calibration").

For each simulation: draw parameters from the prior, simulate data from them, fit the simulated
data with the engine under test and record the rank of the prior draw among (thinned) posterior
draws. A calibrated engine gives uniform ranks. ArviZ 0.23 has no SBC; the ranks, the chi-square
uniformity test (SciPy) and the histograms are written here, ESS comes from ``az.ess``.
"""

import concurrent.futures
import math
import multiprocessing
import pickle
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import arviz as az
import numpy as np
import pandas as pd
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from scipy import stats as scipy_stats
from tqdm.auto import tqdm

from latentkit.data import as_model_kwargs
from latentkit.errors import ConfigError
from latentkit.inference.base import Engine, fit, seeded

__all__ = ["SBCResult", "sbc"]

#: Target histogram bins: Talts et al. use ~20 bins; at least 5 simulations expected per bin
#: keeps the chi-square approximation valid (Cochran's rule).
TARGET_BINS, MIN_PER_BIN = 20, 5


@dataclass(frozen=True)
class SBCResult:
    """Ranks and uniformity tests of :func:`sbc`.

    Attributes:
        ranks: one row per simulation, one column per scalar parameter (``theta[3]``), values
            ``0 .. num_ranks - 1``.
        tests: per parameter: the chi-square statistic and p-value of uniform ranks, and the
            verdict at the Bonferroni-corrected level ``alpha / n_parameters``.
        min_ess: per simulation, the smallest bulk ESS among the parameters; below
            ``num_ranks - 1`` the thinned draws are autocorrelated and ranks pile up at the ends.
        num_ranks: possible rank values (thinned draws + 1).
        bins: histogram bins of the test and the plot.
        alpha: family-wise level of the test.
        seconds: wall time of the whole run.
    """

    ranks: pd.DataFrame
    tests: pd.DataFrame
    min_ess: np.ndarray
    num_ranks: int
    bins: int
    alpha: float
    seconds: float

    @property
    def passed(self) -> bool:
        return bool((self.tests["verdict"] == "pass").all())

    def plot(self) -> Any:
        """Rank histograms per parameter (a matplotlib figure)."""
        from latentkit.diagnostics.plots import plot_sbc_ranks

        return plot_sbc_ranks(self.ranks, self.num_ranks, self.bins)

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "num_simulations": len(self.ranks), "num_ranks": self.num_ranks,
                "bins": self.bins, "alpha": self.alpha, "seconds": self.seconds,
                "tests": self.tests.to_dict(orient="index"), "ranks": self.ranks.to_dict(orient="list")}

    def __str__(self) -> str:
        head = (f"SBC: {len(self.ranks)} simulations, ranks 0..{self.num_ranks - 1} in {self.bins} bins, "
                f"{'uniform (passed)' if self.passed else 'NOT uniform (failed)'} at alpha {self.alpha} "
                f"(Bonferroni over {len(self.tests)} parameters), {self.seconds:.1f} s")
        low = int((self.min_ess < self.num_ranks - 1).sum())
        note = (f"\nnote: {low} simulation(s) had fewer effective draws than thinned draws; "
                "raise num_samples") if low else ""
        return f"{head}\n{self.tests.round(4).to_string()}{note}"


class _Simulate(Messenger):
    """Sample the named sites afresh even where the model observes them."""

    def __init__(self, names: set[str]) -> None:
        super().__init__()
        self.names = names

    def _pyro_sample(self, msg: dict[str, Any]) -> None:
        if msg["name"] in self.names and msg["is_observed"]:
            msg["is_observed"] = False
            msg["value"] = None
            msg["done"] = False


def _latent_sites(trace: poutine.Trace, observed: set[str]) -> dict[str, np.ndarray]:
    out = {}
    for name, node in trace.nodes.items():
        if (node["type"] != "sample" or name in observed or name.startswith("_") or node["is_observed"]
                or node["infer"].get("_deterministic") or type(node["fn"]).__name__ == "_Subsample"
                or node["fn"].support.is_discrete):
            continue
        out[name] = node["value"].detach().cpu().numpy()
    return out


def _observed_arguments(fn: Any, kwargs: dict[str, Any], observed: Mapping[str, str] | None) -> dict[str, str]:
    """``{argument: site}`` for the observed sites: given, or the arguments set to None that
    name a sample site, or else each observed site matched to the argument holding its values."""
    mapping = dict(observed) if observed is not None else _infer_observed(fn, kwargs)
    if not mapping:
        raise ConfigError("data: no observed site found; set the observed arguments to None, e.g. "
                          "{'sigma': sigma, 'y': None}, or pass observed={'y': 'y'}.")
    return mapping


def _infer_observed(fn: Any, kwargs: dict[str, Any]) -> dict[str, str]:
    with torch.no_grad():
        trace = poutine.trace(fn).get_trace(**kwargs)
    sites = {n for n, node in trace.nodes.items() if node["type"] == "sample"}
    mapping = {k: k for k, v in kwargs.items() if v is None and k in sites}
    if mapping:
        return mapping
    for name, node in trace.nodes.items():
        if node["type"] != "sample" or not node["is_observed"] or name.startswith("_") \
                or node["infer"].get("_deterministic"):
            continue
        value = node["value"]
        match = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor) and v.shape == value.shape
                 and torch.equal(v, value)]
        if not match:
            raise ConfigError(f"observed: cannot tell which argument feeds the observed site {name!r}; "
                              f"pass observed={{'argument': {name!r}}}.")
        mapping[match[0]] = name
    return mapping


def _scalar_names(site: str, shape: tuple[int, ...]) -> list[str]:
    if not shape:
        return [site]
    return [f"{site}[{','.join(map(str, index))}]" for index in np.ndindex(*shape)]


def _run_one(fn: Any, data: dict[str, Any], engine: str | Engine, options: dict[str, Any], seed: int,
             truth: dict[str, np.ndarray], num_draws: int) -> tuple[dict[str, int], float]:
    """Fit one simulated data set; return the rank of each scalar parameter and the least ESS."""
    result = fit(fn, data, engine=engine, seed=seed, progress=False, **options)
    rng = np.random.default_rng(seed)
    ranks: dict[str, int] = {}
    for site, value in truth.items():
        draws = np.asarray(result.posterior[site])
        total = draws.shape[0] * draws.shape[1]
        if total < num_draws:
            raise ConfigError(f"num_rank_draws: {num_draws} thinned draws needed but the engine returned "
                              f"{total}; raise num_samples or lower num_rank_draws.")
        flat = draws.reshape(total, -1)
        # Thin to num_draws evenly spaced draws, as Talts et al. do to make them nearly independent.
        thinned = flat[np.linspace(0, total - 1, num_draws).round().astype(int)]
        below = (thinned < value.reshape(-1)).sum(0)
        ties = (thinned == value.reshape(-1)).sum(0)
        rank = below + rng.integers(0, ties + 1)  # ties split at random (point-mass guides)
        ranks.update(zip(_scalar_names(site, value.shape), rank.tolist(), strict=True))
    with np.errstate(invalid="ignore", divide="ignore"):
        ess = az.ess(az.convert_to_dataset({k: np.asarray(result.posterior[k]) for k in truth}))
    min_ess = float(np.nanmin(np.concatenate([ess[k].values.ravel() for k in truth])))
    return ranks, min_ess


def _worker_init(dtype: str) -> None:
    torch.set_num_threads(1)  # n_jobs processes share the cores
    torch.set_default_dtype(getattr(torch, dtype))


def _bins(num_ranks: int, n_simulations: int) -> int:
    target = max(2, min(TARGET_BINS, n_simulations // MIN_PER_BIN))
    return max(d for d in range(1, target + 1) if num_ranks % d == 0)


def sbc(
    model: Any,
    data: Any = None,
    *,
    engine: str | Engine = "nuts",
    n_simulations: int = 100,
    n_jobs: int = 1,
    num_rank_draws: int = 99,
    alpha: float = 0.01,
    observed: Mapping[str, str] | None = None,
    seed: int = 0,
    progress: bool = False,
    **engine_options: Any,
) -> SBCResult:
    """Simulation-based calibration of an engine on a model.

    Args:
        model: a built-in model or a plain Pyro function.
        data: the built-in model's data (fixes the data size and the priors that built-in models
            scale to the data), or the function's keyword arguments with the observed ones set
            to None (``{"sigma": sigma, "y": None}``) or given (their values are replaced).
        engine: the engine under test, a registered name or an :class:`Engine` instance.
        n_simulations: simulated data sets.
        n_jobs: worker processes (spawned); 1 runs in this process. With more, ``model`` and
            ``engine`` must pickle (a function at module level of an importable module), a
            script must call ``sbc`` under ``if __name__ == "__main__":``, and each worker pays
            the import of latentkit once (seconds).
        num_rank_draws: posterior draws kept (evenly thinned) per fit; ranks take
            ``num_rank_draws + 1`` values.
        alpha: family-wise level of the uniformity tests (Bonferroni over parameters).
        observed: ``{argument: site}`` when the observed arguments cannot be inferred.
        seed: simulation ``i`` draws with seed ``seed * 1_000_003 + i`` and fits with the same.
        progress: show a progress bar over simulations.
        **engine_options: passed to ``lk.fit`` (e.g. ``num_samples=200, num_chains=2``).

    Returns:
        An :class:`SBCResult`; ``result.passed`` when every parameter's ranks look uniform.

    Shapes:
        ``ranks``: ``(n_simulations, n_scalar_parameters)``.

    Built-in models are fitted through their ``model`` function with the keyword arguments that
    ``prepare(data)`` made from the reference data, so the prior stays the same in every
    simulation (re-preparing simulated data would rescale it). Their automatic relabelling is
    therefore not applied: ranks of exchangeable mixture components are not meaningful.
    """
    if n_simulations < 2 or n_jobs < 1 or num_rank_draws < 1:
        raise ConfigError("sbc: n_simulations must be >= 2, n_jobs >= 1 and num_rank_draws >= 1.")
    if hasattr(model, "prepare") and hasattr(model, "model"):
        fn, kwargs = model.model, dict(model.prepare(data))
    elif callable(model):
        fn, kwargs = model, as_model_kwargs(data)
    else:
        raise ConfigError(f"model: expected a latentkit model or a Pyro function, got {type(model).__name__}.")
    start = time.perf_counter()
    mapping = _observed_arguments(fn, kwargs, observed)
    sites = set(mapping.values())
    tasks = []
    for i in range(n_simulations):
        sim_seed = seed * 1_000_003 + i
        with seeded(sim_seed), torch.no_grad():
            trace = poutine.trace(_Simulate(sites)(fn)).get_trace(**kwargs)
        missing = sites - set(trace.nodes)
        if missing:
            raise ConfigError(f"observed: the model has no sample sites {sorted(missing)}.")
        simulated = dict(kwargs)
        simulated.update({arg: trace.nodes[site]["value"].detach() for arg, site in mapping.items()})
        truth = _latent_sites(trace, sites)
        tasks.append((fn, simulated, engine, engine_options, sim_seed, truth, num_rank_draws))
    outcomes: list[tuple[dict[str, int], float]] = [({}, math.nan)] * n_simulations
    bar = tqdm(total=n_simulations, disable=None if progress else True, desc="sbc", unit="fit")
    if n_jobs == 1:
        for i, task in enumerate(tasks):
            outcomes[i] = _run_one(*task)
            bar.update()
    else:
        try:
            pickle.dumps((fn, engine))
        except (pickle.PicklingError, AttributeError, TypeError) as error:
            raise ConfigError(f"model: cannot be sent to worker processes ({error}); define it at module "
                              "level of an importable module, or use n_jobs=1.") from error
        context = multiprocessing.get_context("spawn")
        dtype = str(torch.get_default_dtype()).removeprefix("torch.")
        with concurrent.futures.ProcessPoolExecutor(n_jobs, mp_context=context, initializer=_worker_init,
                                                    initargs=(dtype,)) as pool:
            futures = {pool.submit(_run_one, *task): i for i, task in enumerate(tasks)}
            try:
                for future in concurrent.futures.as_completed(futures):
                    outcomes[futures[future]] = future.result()
                    bar.update()
            except BaseException:  # a failed fit or Ctrl-C: drop the simulations not started yet
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    bar.close()
    ranks = pd.DataFrame([o[0] for o in outcomes])
    num_ranks = num_rank_draws + 1
    bins = _bins(num_ranks, n_simulations)
    rows = {}
    level = alpha / max(ranks.shape[1], 1)
    for name in ranks.columns:
        counts = np.bincount(ranks[name].to_numpy() // (num_ranks // bins), minlength=bins)
        test = scipy_stats.chisquare(counts)
        rows[name] = {"chi2": float(test.statistic), "p_value": float(test.pvalue),
                      "verdict": "pass" if test.pvalue >= level else "fail"}
    tests = pd.DataFrame.from_dict(rows, orient="index")
    return SBCResult(ranks=ranks, tests=tests, min_ess=np.array([o[1] for o in outcomes]), num_ranks=num_ranks,
                     bins=bins, alpha=alpha, seconds=time.perf_counter() - start)

