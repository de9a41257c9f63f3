"""Model comparison by PSIS-LOO or WAIC through ArviZ, across engines."""

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import arviz as az
import numpy as np
import pandas as pd

from latentkit.errors import ConfigError
from latentkit.inference.result import Result

__all__ = ["Comparison", "compare"]

#: Notes printed with a comparison.
NOTE_ENGINES = (
    "Results come from different engines ({engines}). An SVI result's LOO/WAIC is computed from "
    "draws of its fitted guide: it measures how well the approximation predicts, not the exact "
    "posterior. Between fits of the same model, a difference in elpd is the cost of the "
    "approximation, not a difference between models."
)
NOTE_BAD_K = (
    "{name}: {count} observation(s) with Pareto k > {good_k:.2f}: the PSIS-LOO estimate for them is "
    "unreliable (Vehtari et al. 2017); refit without them (exact LOO) or use K-fold cross-validation."
)


@dataclass(frozen=True)
class Comparison:
    """The result of :func:`compare`.

    Attributes:
        table: ``arviz.compare``'s table (rank, elpd, p, elpd_diff, weight, se, dse, warning).
        pareto_k: per model, the counts of LOO's Pareto k in ArviZ's bins (good, bad, very bad)
            and the largest k; empty for WAIC.
        notes: plain-words caveats (mixed engines, unreliable k, ...).
        elpd: ArviZ's ``ELPDData`` per model, with pointwise values.
    """

    table: pd.DataFrame
    pareto_k: pd.DataFrame
    notes: tuple[str, ...] = ()
    elpd: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"table": self.table.drop(columns=["scale"], errors="ignore").to_dict(orient="index"),
                "pareto_k": self.pareto_k.to_dict(orient="index"), "notes": list(self.notes)}

    def __str__(self) -> str:
        with pd.option_context("display.width", 120, "display.max_columns", 12):
            parts = [self.table.drop(columns=["scale"], errors="ignore").round(2).to_string()]
            if not self.pareto_k.empty:
                parts += ["", "Pareto k of PSIS-LOO:", self.pareto_k.to_string()]
        parts += ["", *(f"note: {n}" for n in self.notes)] if self.notes else []
        return "\n".join(parts)


def _var_name(results: Mapping[str, Result], var_name: str | None) -> str:
    names = [set(r.log_likelihood) for r in results.values()]
    common = set.intersection(*names) if names else set()
    if var_name is not None:
        if var_name not in common:
            raise ConfigError(f"var_name: {var_name!r} is not an observed site of every result; "
                              f"shared ones are {sorted(common)}.")
        return var_name
    if len(common) != 1:
        raise ConfigError(f"var_name: the results share the observed sites {sorted(common)}; name the "
                          "one to compare on, e.g. compare(results, var_name='obs').")
    return next(iter(common))


def compare(
    results: Mapping[str, Result],
    *,
    ic: Literal["loo", "waic"] = "loo",
    var_name: str | None = None,
    method: Literal["stacking", "BB-pseudo-BMA", "pseudo-BMA"] = "stacking",
    scale: Literal["log", "negative_log", "deviance"] = "log",
) -> Comparison:
    """Compare fitted models by their expected log predictive density.

    Args:
        results: named results, e.g. ``{"gmm-3": res3, "gmm-4": res4}``; any engines.
        ic: ``"loo"`` (PSIS-LOO, Vehtari et al. 2017) or ``"waic"``.
        var_name: the observed site compared on, when the results have several.
        method: how ArviZ weights the models.
        scale: ``"log"`` (higher is better), ``"negative_log"`` or ``"deviance"``.

    Returns:
        A :class:`Comparison` with ArviZ's table, the Pareto k counts per model and notes.

    Raises:
        ConfigError: fewer than two results, results without log-likelihood, or results fitted
            to different observations.
    """
    if len(results) < 2:
        raise ConfigError(f"results: compare needs at least two named results, got {len(results)}.")
    for name, result in results.items():
        if not result.log_likelihood:
            raise ConfigError(f"results[{name!r}]: has no log-likelihood; it cannot be compared.")
    site = _var_name(results, var_name)
    reference_name, reference = next(iter(results.items()))
    for name, result in results.items():
        a, b = reference.observed_data.get(site), result.observed_data.get(site)
        if a is not None and b is not None and (a.shape != b.shape or not np.allclose(a, b)):
            raise ConfigError(f"results: {name!r} and {reference_name!r} were fitted to different "
                              f"observations of {site!r}; LOO/WAIC compare models on the same data only.")
    idatas = {name: result.to_arviz() for name, result in results.items()}
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        # ArviZ warns about large Pareto k / WAIC variances; the counts and notes below report them.
        warnings.simplefilter("ignore", UserWarning)
        # ArviZ 0.23 sorts with pandas' deprecated inplace=True; nothing for users.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="arviz")
        table = az.compare(idatas, ic=ic, method=method, scale=scale, var_name=site)
        elpd = {name: (az.loo if ic == "loo" else az.waic)(idata, pointwise=True, var_name=site, scale=scale)
                for name, idata in idatas.items()}
    notes = []
    engines = {result.engine for result in results.values()}
    if len(engines) > 1:
        notes.append(NOTE_ENGINES.format(engines=", ".join(sorted(engines))))
    rows = {}
    if ic == "loo":
        for name, data in elpd.items():
            k = np.asarray(data.pareto_k).reshape(-1)
            good_k = float(data.good_k)
            counts = np.histogram(k, bins=[-np.inf, good_k, 1, np.inf])[0]
            rows[name] = {"good": int(counts[0]), "bad": int(counts[1]), "very_bad": int(counts[2]),
                          "good_k": round(good_k, 3), "max_k": float(k.max())}
            if counts[1] + counts[2]:
                notes.append(NOTE_BAD_K.format(name=name, count=int(counts[1] + counts[2]), good_k=good_k))
    elif any(bool(data.warning) for data in elpd.values()):
        notes.append("WAIC: some posterior variances of the log predictive density exceed 0.4; "
                     "WAIC may be unreliable, prefer ic='loo'.")
    return Comparison(table=table, pareto_k=pd.DataFrame.from_dict(rows, orient="index"),
                      notes=tuple(notes), elpd=elpd)
