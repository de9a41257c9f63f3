"""Convergence checks with verdicts, thresholds and reasons, computed by ArviZ."""

from dataclasses import dataclass

import arviz as az
import numpy as np
import pandas as pd

from latentkit.inference.result import Result

__all__ = ["Check", "CheckReport", "check"]

#: Vehtari et al. (2021), "Rank-normalization, folding, and localization": R-hat < 1.01 and
#: bulk/tail ESS of at least 100 per chain.
RHAT_MAX = 1.01
ESS_PER_CHAIN = 100
#: Betancourt (2016): E-BFMI below 0.3 indicates poor exploration of the energy distribution.
BFMI_MIN = 0.3
#: SVI: relative change of the mean loss between the last two windows of this share of steps.
ELBO_WINDOW = 0.1
ELBO_RTOL = 1e-3


@dataclass(frozen=True)
class Check:
    name: str
    value: float
    threshold: str
    passed: bool
    reason: str


@dataclass(frozen=True)
class CheckReport:
    """The verdicts of :func:`check`: print it, or use :meth:`to_frame` / :meth:`to_dict`."""

    checks: tuple[Check, ...]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame([c.__dict__ for c in self.checks])

    def to_dict(self) -> dict[str, dict[str, object]]:
        return {c.name: {k: v for k, v in c.__dict__.items() if k != "name"} for c in self.checks}

    def __str__(self) -> str:
        lines = []
        for c in self.checks:
            verdict = "ok  " if c.passed else "FAIL"
            lines.append(f"{verdict} {c.name:<22} {c.value:>10.4g}  (needs {c.threshold}): {c.reason}")
        return "\n".join(lines)


def _continuous(result: Result) -> list[str]:
    return [k for k, v in result.posterior.items() if v.dtype.kind == "f" and v[0, 0].size <= 1000]


def check(result: Result) -> CheckReport:
    """Run the checks that fit the engine that produced ``result``.

    MCMC: rank-normalised split R-hat, bulk and tail ESS per chain, divergences, tree-depth
    saturation, E-BFMI. SVI: ELBO convergence over the final window.
    """
    with np.errstate(invalid="ignore", divide="ignore"):  # constant elements give NaN
        return CheckReport(tuple(_checks(result)))


def _checks(result: Result) -> list[Check]:
    checks = []
    if result.sample_stats:
        idata = result.to_arviz()
        names = _continuous(result)
        chains = result.num_chains
        if chains > 1:
            rhat = float(np.nanmax(az.rhat(idata, var_names=names).to_array().values))
            checks.append(Check("r_hat", rhat, f"< {RHAT_MAX}", bool(rhat < RHAT_MAX),
                                "chains agree" if rhat < RHAT_MAX else "chains disagree: run longer or reparameterise"))
        for method in ("bulk", "tail"):
            ess = float(np.nanmin(az.ess(idata, var_names=names, method=method).to_array().values))
            need = ESS_PER_CHAIN * chains
            checks.append(Check(f"ess_{method}", ess, f">= {need}", bool(ess >= need),
                                "enough effective draws" if ess >= need else "too few effective draws: run longer"))
        stats = result.sample_stats
        if "diverging" in stats:
            n = int(np.asarray(stats["diverging"]).sum())
            checks.append(Check("divergences", n, "== 0", n == 0,
                                "none" if n == 0 else "biased draws: raise target_accept or reparameterise"))
        if "tree_depth" in stats and "max_tree_depth" in result.config.get("engine", {}).get("options", {}):
            depth = result.config["engine"]["options"]["max_tree_depth"]
            share = float((np.asarray(stats["tree_depth"]) >= depth).mean())
            checks.append(Check("tree_depth_saturation", share, "== 0", share == 0,
                                "none" if share == 0 else "trajectories cut short: raise max_tree_depth"))
        if "energy" in stats:
            bfmi = float(np.min(az.bfmi(idata)))
            checks.append(Check("e_bfmi", bfmi, f">= {BFMI_MIN}", bool(bfmi >= BFMI_MIN),
                                "energy explored" if bfmi >= BFMI_MIN else "heavy tails or poor adaptation"))
    if result.losses is not None and len(result.losses) >= 20:
        window = max(int(len(result.losses) * ELBO_WINDOW), 5)
        last, before = result.losses[-window:].mean(), result.losses[-2 * window:-window].mean()
        change = abs(last - before) / (abs(last) + 1e-12)
        checks.append(Check("elbo_converged", change, f"< {ELBO_RTOL}", bool(change < ELBO_RTOL),
                            "loss stable" if change < ELBO_RTOL else "loss still moving: run more steps"))
    return checks
