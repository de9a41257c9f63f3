"""Checks with verdicts, thresholds and plain-words reasons, computed by ArviZ where it can.

MCMC results get the convergence checks of Vehtari et al. (2021) and the sampler checks of
Betancourt (2016); SVI results get an ELBO convergence check and the Pareto k-hat of the
importance ratios p/q over the guide's draws (Yao et al. 2018), with PSIS-corrected posterior
means when k-hat allows; for a guide with latent variables per data point (a VAE's amortised
encoder) k-hat is computed per data point instead.
"""

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import arviz as az
import numpy as np
import pandas as pd

from latentkit.errors import LatentkitError
from latentkit.inference.result import Result

__all__ = ["Check", "CheckReport", "check", "elbo_window", "psis_means"]

Verdict = Literal["pass", "warn", "fail"]

#: Vehtari et al. (2021), "Rank-normalization, folding, and localization": R-hat < 1.01 and
#: bulk/tail ESS of at least 100 per chain.
RHAT_MAX = 1.01
ESS_PER_CHAIN = 100
#: Betancourt (2016): E-BFMI below 0.3 indicates poor exploration of the energy distribution.
BFMI_MIN = 0.3
#: SVI: the final window is this share of the steps (at least ELBO_MIN_WINDOW steps); the loss has
#: converged when the mean loss of the final window differs from the window before by less than
#: ELBO_RTOL relative to the loss, or by less than twice the Monte Carlo error of that difference.
ELBO_WINDOW = 0.1
ELBO_MIN_WINDOW = 5
ELBO_RTOL = 1e-3
#: Yao et al. (2018), "Yes, but did it work?": k-hat <= 0.5 the guide is good, <= 0.7 usable with
#: PSIS correction, > 0.7 the importance ratios have too heavy a tail to trust the guide.
KHAT_GOOD, KHAT_MAX = 0.5, 0.7
#: Guides with latent variables per data point (amortised encoders) are checked per point, on this many
#: points with this many draws each (Vehtari et al. 2024 trust k-hat from 10^(1 / (1 - k)) draws: 1,000
#: cover k up to 0.67). Some points above 0.7 are usual for an amortised Gaussian encoder (the
#: amortisation gap): a warning; the check fails when most points are above.
LOCAL_POINTS, LOCAL_PARTICLES, LOCAL_BAD_SHARE = 200, 1000, 0.5


@dataclass(frozen=True)
class Check:
    """One check: its measured ``value``, the ``threshold`` it needs and the ``verdict``."""

    name: str
    value: float
    threshold: str
    verdict: Verdict
    reason: str

    @property
    def passed(self) -> bool:
        return self.verdict != "fail"


@dataclass(frozen=True)
class CheckReport:
    """The verdicts of :func:`check`: print it, or use :meth:`to_frame` / :meth:`to_dict`.

    Attributes:
        checks: one :class:`Check` per test run.
        engine: the engine that produced the result.
        psis_means: for SVI with k-hat <= 0.7, PSIS-corrected posterior means by variable,
            next to the plain guide means (``{"name": {"guide": [...], "psis": [...]}}``).
    """

    checks: tuple[Check, ...]
    engine: str = "unknown"
    psis_means: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def to_frame(self) -> pd.DataFrame:
        rows = [{"check": c.name, "verdict": c.verdict, "value": c.value, "threshold": c.threshold,
                 "reason": c.reason} for c in self.checks]
        return pd.DataFrame(rows, columns=["check", "verdict", "value", "threshold", "reason"])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"passed", "engine", "checks": {name: {...}}, "psis_means"}``."""
        return {
            "passed": self.passed,
            "engine": self.engine,
            "checks": {c.name: {"verdict": c.verdict, "passed": c.passed, "value": _float(c.value),
                                "threshold": c.threshold, "reason": c.reason} for c in self.checks},
            "psis_means": self.psis_means,
        }

    def __str__(self) -> str:
        lines = [f"checks ({self.engine}): {'all passed' if self.passed else 'FAILED'}"]
        for c in self.checks:
            verdict = {"pass": "ok  ", "warn": "warn", "fail": "FAIL"}[c.verdict]
            lines.append(f"{verdict} {c.name:<22} {c.value:>10.4g}  (needs {c.threshold}): {c.reason}")
        if self.psis_means:
            lines.append("PSIS-corrected posterior means (guide mean -> corrected):")
            for name, means in self.psis_means.items():
                guide, psis = np.ravel(means["guide"]), np.ravel(means["psis"])
                pairs = ", ".join(f"{g:.4g} -> {p:.4g}" for g, p in zip(guide[:6], psis[:6], strict=True))
                lines.append(f"  {name}: {pairs}{' ...' if guide.size > 6 else ''}")
        return "\n".join(lines)


def _float(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _continuous(result: Result) -> list[str]:
    """Float posterior variables of moderate size with some spread (constant elements such as a
    correlation factor's unit diagonal make every statistic NaN)."""
    return [k for k, v in result.posterior.items()
            if v.dtype.kind == "f" and v[0, 0].size <= 1000 and np.ptp(v, axis=(0, 1)).max(initial=0) > 0]


def _varying(values: Any, result: Result) -> Any:
    """An ArviZ statistic per element, NaN where the element never changes: ArviZ gives a
    constant (a correlation factor's unit diagonal, a Cholesky factor's zeros) the number of
    draws as its ESS, which would stand as the worst of antithetic (ESS > draws) chains."""
    for name, array in values.data_vars.items():
        constant = np.ptp(result.posterior[name], axis=(0, 1)) == 0
        values[name] = array.copy(data=np.where(constant, np.nan, array.values))
    return values


def _worst(values: Any, pick: str) -> tuple[float, str]:
    """The worst element of an ArviZ statistic Dataset and its label, e.g. ``theta[3]``."""
    worst, label = (-math.inf if pick == "max" else math.inf), ""
    for name, array in values.data_vars.items():
        data = np.asarray(array.values, dtype=float)
        if data.size == 0 or np.isnan(data).all():
            continue
        index = np.nanargmax(data) if pick == "max" else np.nanargmin(data)
        value = float(data.ravel()[index])
        if (pick == "max" and value > worst) or (pick == "min" and value < worst):
            position = np.unravel_index(index, data.shape) if data.ndim else ()
            worst, label = value, name + (f"[{','.join(map(str, position))}]" if position else "")
    return worst, label


def elbo_window(losses: np.ndarray) -> int:
    """Steps in the final window of the ELBO convergence check."""
    return max(int(len(losses) * ELBO_WINDOW), ELBO_MIN_WINDOW)


def psis_means(result: Result) -> tuple[float, dict[str, dict[str, Any]]]:
    """Pareto k-hat of the importance ratios p/q over an SVI result's guide draws and the
    PSIS-corrected posterior means (computed whatever k-hat is; trust them only for k <= 0.7).

    Uses ``az.psislw`` on ``log_joint - log_q`` from ``result.sample_stats``; guide draws are
    independent, so the relative efficiency is 1.
    """
    stats = result.sample_stats
    log_ratio = (np.asarray(stats["log_joint"]) - np.asarray(stats["log_q"])).reshape(-1)
    log_weights, khat = az.psislw(log_ratio, reff=1.0)
    weights = np.exp(log_weights - np.logaddexp.reduce(log_weights))
    means = {}
    for name in _continuous(result):
        draws = result.posterior[name].reshape((-1,) + result.posterior[name].shape[2:])
        means[name] = {"guide": draws.mean(0).tolist(), "psis": np.tensordot(weights, draws, axes=1).tolist()}
    return float(khat), means


def check(result: Result) -> CheckReport:
    """Run the checks that fit the engine that produced ``result``.

    MCMC (several chains or sampler statistics): rank-normalised split R-hat < 1.01, bulk and
    tail ESS >= 100 per chain, no divergent transitions, no draws at the maximum tree depth,
    E-BFMI >= 0.3. SVI (a result with losses): ELBO convergence over the final window, and
    Pareto k-hat <= 0.7 of log p - log q over the guide draws, with PSIS-corrected means.

    Returns:
        A :class:`CheckReport`; ``report.passed`` is False when any check fails.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> report = check(Result(posterior={"x": rng.normal(size=(4, 500))}))
        >>> [(c.name, c.verdict) for c in report.checks]
        [('r_hat', 'pass'), ('ess_bulk', 'pass'), ('ess_tail', 'pass')]
    """
    with np.errstate(invalid="ignore", divide="ignore"):  # constant elements give NaN
        checks, means = _checks(result)
    return CheckReport(tuple(checks), engine=result.engine, psis_means=means)


def _checks(result: Result) -> tuple[list[Check], dict[str, dict[str, Any]]]:
    if result.engine == "adversarial":
        return _adversarial_checks(result), {}
    if result.losses is not None:
        return _svi_checks(result)
    return _mcmc_checks(result), {}


def _adversarial_checks(result: Result) -> list[Check]:
    """A GAN's losses are a game's, not a bound: no convergence verdict can be read from them (sample
    quality decides: :func:`latentkit.diagnostics.sample_quality`); only broken training is caught."""
    losses = {player: np.asarray(result.params[f"losses.{player}"], dtype=float)
              for player in ("discriminator", "generator") if f"losses.{player}" in result.params}
    finite = all(np.isfinite(v).all() for v in losses.values())
    return [
        Check("losses_finite", float(finite), "all finite", "pass" if finite else "fail",
              "both players' losses stayed finite" if finite else
              "a loss became NaN or infinite: lower the learning rates or use loss='wgan-gp' / spectral norm"),
        Check("sample_quality", math.nan, "sample_quality(samples, reference)", "warn",
              "adversarial losses do not show convergence: compare samples with held-out data "
              "(Fréchet distance, MMD, precision/recall)"),
    ]


def _mcmc_checks(result: Result) -> list[Check]:
    checks: list[Check] = []
    idata = result.to_arviz()
    names = _continuous(result)
    chains = result.num_chains
    if names and chains > 1:
        rhat, where = _worst(az.rhat(idata, var_names=names), "max")
        ok = rhat < RHAT_MAX
        checks.append(Check("r_hat", rhat, f"< {RHAT_MAX}", "pass" if ok else "fail",
                            "chains agree" if ok else
                            f"chains disagree at {where}: run longer, reparameterise, or check for multiple modes"))
    elif names:  # ArviZ returns NaN: split R-hat needs two chains at least
        checks.append(Check("r_hat", math.nan, "2 chains or more", "warn",
                            "one chain: convergence cannot be judged across chains; run num_chains >= 2"))
    for method in ("bulk", "tail") if names else ():
        ess, where = _worst(_varying(az.ess(idata, var_names=names, method=method), result), "min")
        need = ESS_PER_CHAIN * chains
        ok = ess >= need
        checks.append(Check(f"ess_{method}", ess, f">= {need}", "pass" if ok else "fail",
                            f"enough effective draws ({'centre' if method == 'bulk' else 'tails'})" if ok else
                            f"too few effective draws at {where}: run more draws or reparameterise"))
    stats = result.sample_stats
    if "diverging" in stats:
        n = int(np.asarray(stats["diverging"]).sum())
        checks.append(Check("divergences", n, "== 0", "pass" if n == 0 else "fail",
                            "none" if n == 0 else
                            f"{n} divergent transitions bias the draws: raise target_accept or reparameterise"))
    depth = result.config.get("engine", {}).get("options", {}).get("max_tree_depth")
    if "tree_depth" in stats and depth is not None:
        share = float((np.asarray(stats["tree_depth"]) >= depth).mean())
        checks.append(Check("tree_depth_saturation", share, "== 0", "pass" if share == 0 else "fail",
                            "none" if share == 0 else
                            f"{share:.1%} of trajectories cut short at depth {depth}: raise max_tree_depth"))
    if "energy" in stats:
        bfmi = float(np.min(az.bfmi(idata)))
        ok = bfmi >= BFMI_MIN
        checks.append(Check("e_bfmi", bfmi, f">= {BFMI_MIN}", "pass" if ok else "fail",
                            "energy explored" if ok else
                            "the momentum resampling explores the energy poorly: heavy tails or poor adaptation"))
    return checks


def _svi_checks(result: Result) -> tuple[list[Check], dict[str, dict[str, Any]]]:
    checks: list[Check] = []
    losses = np.asarray(result.losses, dtype=float)
    window = elbo_window(losses)
    if len(losses) >= 2 * window:
        last, before = losses[-window:], losses[-2 * window:-window]
        change = abs(last.mean() - before.mean())
        relative = change / (abs(last.mean()) + 1e-12)
        # Noise of the difference of two window means, from ArviZ's MCSE of each window treated
        # as one chain (Adam's iterates are autocorrelated, so the plain standard error is too small).
        noise = math.hypot(*(np.asarray(az.mcse(w[None, :], method="mean")).item() for w in (last, before)))
        ok = relative < ELBO_RTOL or change < 2 * noise
        checks.append(Check("elbo_converged", relative, f"< {ELBO_RTOL} or within noise",
                            "pass" if ok else "fail",
                            f"loss stable over the last {window} steps" if ok else
                            f"loss still moving over the last {window} steps: run more steps or raise learning_rate"))
    else:
        checks.append(Check("elbo_converged", math.nan, f">= {2 * ELBO_MIN_WINDOW} steps", "fail",
                            f"only {len(losses)} steps: too few to judge convergence"))
    means: dict[str, dict[str, Any]] = {}
    if {"log_joint", "log_q"} <= set(result.sample_stats):
        names = _continuous(result)
        if not names and _local_latents(result):
            checks.append(_local_pareto_k(result))
        elif not names:
            checks.append(Check("pareto_k", math.nan, f"<= {KHAT_MAX}", "warn",
                                "the guide is a point estimate (no spread): k-hat does not apply"))
        else:
            khat, corrected = psis_means(result)
            if khat <= KHAT_GOOD:
                verdict, reason = "pass", "the guide fits the posterior well (importance ratios light-tailed)"
            elif khat <= KHAT_MAX:
                verdict, reason = "warn", "the guide is usable; prefer the PSIS-corrected means"
            else:
                verdict, reason = "fail", ("the guide misses posterior mass (heavy-tailed p/q): estimates are "
                                           "unreliable; try guide='multivariate_normal', more steps, or NUTS")
            if khat <= KHAT_MAX:
                means = corrected
            checks.append(Check("pareto_k", khat, f"<= {KHAT_MAX}", verdict, reason))
    return checks, means


def _local_latents(result: Result) -> bool:
    """Whether the posterior has float variables too large for the joint check: latent variables per
    data point (a VAE's ``z``), whose draws do spread."""
    return any(v.dtype.kind == "f" and v[0, 0].size > 1000 and np.ptp(v, axis=(0, 1)).max(initial=0) > 0
               for v in result.posterior.values())


def _local_pareto_k(result: Result) -> Check:
    """Pareto k-hat per data point for a guide with latent variables per point (an amortised encoder).

    The joint ratio p/q over all points' latents has a variance that grows with their number, so its
    k-hat judges the data set's size, not the guide. A model with ``pareto_k(data, num_particles)``
    (a VAE) gets the check of Yao et al. (2018) per point instead, on up to ``LOCAL_POINTS`` of its
    data points with ``LOCAL_PARTICLES`` draws of q(z | x) each.
    """
    model = result.model
    khat = None
    if callable(getattr(model, "pareto_k", None)) and "obs" in result.observed_data:
        model = result.fitted_model()  # a loaded result's model is rebuilt untrained
        X = np.asarray(result.observed_data["obs"])
        rows = np.unique(np.linspace(0, len(X) - 1, min(len(X), LOCAL_POINTS)).astype(int))
        data = (X[rows], np.asarray(result.constant_data["C"])[rows]) if "C" in result.constant_data else X[rows]
        try:
            khat = np.asarray(model.pareto_k(data, num_particles=LOCAL_PARTICLES, seed=0), dtype=float)
        except LatentkitError:
            khat = None
    if khat is None:
        return Check("pareto_k", math.nan, f"<= {KHAT_MAX} per data point", "warn",
                     "the guide has latent variables per data point (e.g. an amortised encoder): the joint "
                     "k-hat over all points does not apply, and this model offers no per-point check "
                     "(a VAE's pareto_k)")
    worst, bad = float(np.max(khat)), float(np.mean(khat > KHAT_MAX))
    where = f"per-point k-hat of the amortised guide on {len(khat)} data points: median {np.median(khat):.2f}"
    if worst <= KHAT_GOOD:
        verdict, reason = "pass", f"{where}, all <= {KHAT_GOOD}: the encoder fits each point's posterior well"
    elif worst <= KHAT_MAX:
        verdict, reason = "warn", (f"{where}, all <= {KHAT_MAX}: the encoder is usable; importance-weighted "
                                   "estimates (vae.log_likelihood) correct it")
    else:
        verdict = "warn" if bad <= LOCAL_BAD_SHARE else "fail"
        reason = (f"{where}, {bad:.0%} above {KHAT_MAX}: the encoder misses posterior mass of those points, "
                  "so their importance-weighted estimates are unreliable; try guide='iaf', more epochs, or "
                  "NUTS on vae.latent_posterior(x) for them")
    return Check("pareto_k", worst, f"<= {KHAT_MAX} per data point", verdict, reason)
