"""latentkit NUTS against stock Pyro NUTS (jit) and NumPyro NUTS (vectorised chains).

Four models, each with 4 chains x (1,000 warm-up + 1,000 draws), one CPU core, float64 (``--dtype
float32``: every library's default precision, for all engines alike). The process is pinned to the
core (``--cores``): PyTorch keeps to the threads it is given, but XLA runs work on others too (NumPyro's
logistic regression: 13 s of CPU in 8.2 s unpinned, 11.5 s pinned).

(a) non-centred eight schools;
(b) 1-D Gaussian mixture, K = 3, N = 1,000, assignments enumerated (NumPyro: MixtureSameFamily,
    the same marginal density);
(c) 2-state Gaussian HMM, T = 1,000, states summed out exactly (Pyro/latentkit: DiscreteHMM's
    parallel-scan forward algorithm; NumPyro: the forward algorithm in ``lax.scan``);
(d) logistic regression, N = 10,000, D = 20.

For each engine: wall time of sampling including initialisation and compilation (library imports
excluded), min bulk-ESS over all scalar parameters per second of it, max R-hat; then speed ratios, and
agreement of posterior means and sds with stock Pyro (largest |difference| / combined MCSE; the
correctness bar is 4). ``lk.fit`` then also computes each draw's pointwise log-likelihood and a
posterior predictive draw (for LOO and checks), work NumPyro's ``MCMC.run`` does not do: for the two
Pyro engines (both run through ``lk.fit``) the whole fit's wall time and ESS/s are printed too.

    python benchmarks/mcmc.py                 # all engines, full size (about 15 minutes)
    python benchmarks/mcmc.py --smoke         # seconds
    python benchmarks/mcmc.py --models a,b --engines latentkit,numpyro
    python benchmarks/mcmc.py --engines latentkit --jit inductor   # twice: cold, then cached
    python benchmarks/mcmc.py --dtype float32
    python benchmarks/mcmc.py --seeds 3 --engines latentkit,numpyro   # the spread from seed to seed

NumPyro comes with ``pip install -e .[bench]``; without it its columns are skipped.
"""

import argparse
import os
import time
from collections.abc import Callable
from typing import Any
from unittest import mock

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import torch
import torch._dynamo  # noqa: F401 - latentkit's tracer imports it on first use (1 s); JAX's import is untimed too
from pyro.distributions import constraints
from pyro.ops.indexing import Vindex

import latentkit as lk
from latentkit.inference import mcmc as lk_mcmc
from latentkit.inference import posterior as lk_posterior
from latentkit.inference import pyro_nuts as lk_pyro_nuts

# -- data ------------------------------------------------------------------------------------------
SCHOOLS_Y = np.array([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
SCHOOLS_SIGMA = np.array([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])


def mixture_data(n: int = 1000) -> np.ndarray:
    rng = np.random.default_rng(0)
    z = rng.choice(3, size=n, p=[0.3, 0.5, 0.2])
    return rng.normal(np.array([-3.0, 0.0, 3.0])[z], 1.0)


def hmm_data(t: int = 1000) -> np.ndarray:
    rng = np.random.default_rng(1)
    trans = np.array([[0.95, 0.05], [0.1, 0.9]])
    x, states = 0, []
    for _ in range(t):
        x = rng.choice(2, p=trans[x])
        states.append(x)
    return rng.normal(np.array([-1.0, 1.0])[states], 1.0)


def logistic_data(n: int = 10_000, d: int = 20) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(2)
    X = rng.normal(size=(n, d))
    beta = rng.normal(scale=0.5, size=d)
    return X, (rng.random(n) < 1 / (1 + np.exp(-(X @ beta)))).astype(float)


# -- Pyro models (latentkit and stock Pyro fit the same functions) -----------------------------------
def eight_schools(sigma, y=None):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("school", len(sigma)):
        theta_raw = pyro.sample("theta_raw", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(mu + tau * theta_raw, sigma), obs=y)


def mixture(y):
    weights = pyro.sample("weights", dist.Dirichlet(torch.ones(3)))
    locs = pyro.sample("locs", dist.ImproperUniform(constraints.ordered_vector, (), (3,)))
    pyro.factor("locs_prior", dist.Normal(0.0, 10.0).log_prob(locs).sum(-1))
    scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", len(y)):
        z = pyro.sample("z", dist.Categorical(weights), infer={"enumerate": "parallel"})
        pyro.sample("y", dist.Normal(Vindex(locs)[..., z], scale), obs=y)


def hmm(y):
    initial = pyro.sample("initial", dist.Dirichlet(torch.ones(2)))
    transition = pyro.sample("transition", dist.Dirichlet(torch.tensor([[8.0, 2.0], [2.0, 8.0]])).to_event(1))
    locs = pyro.sample("locs", dist.ImproperUniform(constraints.ordered_vector, (), (2,)))
    pyro.factor("locs_prior", dist.Normal(0.0, 5.0).log_prob(locs).sum(-1))
    scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
    emission = dist.Normal(locs.unsqueeze(-2), scale.unsqueeze(-1).unsqueeze(-1))
    log_trans = transition.log().unsqueeze(-3)
    pyro.sample("y", dist.DiscreteHMM(initial.log(), log_trans, emission, duration=len(y)), obs=y)


def logistic(X, y=None):
    beta = pyro.sample("beta", dist.Normal(0.0, 1.0).expand([X.shape[-1]]).to_event(1))
    alpha = pyro.sample("alpha", dist.Normal(0.0, 2.0))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Bernoulli(logits=alpha.unsqueeze(-1) + (X @ beta.unsqueeze(-1)).squeeze(-1)), obs=y)


def problems(smoke: bool) -> dict[str, tuple[str, Callable[..., Any], dict[str, Any]]]:
    n, t = (200, 200) if smoke else (1000, 1000)
    X, y = logistic_data(2000 if smoke else 10_000)
    return {
        "a": ("eight schools", eight_schools, {"sigma": SCHOOLS_SIGMA, "y": SCHOOLS_Y}),
        "b": (f"mixture K=3 N={n}", mixture, {"y": mixture_data(n)}),
        "c": (f"HMM K=2 T={t}", hmm, {"y": hmm_data(t)}),
        "d": (f"logistic N={len(y)} D=20", logistic, {"X": X, "y": y}),
    }


# -- NumPyro twins ------------------------------------------------------------------------------------
def numpyro_models() -> dict[str, Callable[..., Any]]:
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as ndist
    from jax import lax
    from jax.scipy.special import logsumexp

    def eight_schools_np(sigma, y=None):
        mu = numpyro.sample("mu", ndist.Normal(0.0, 5.0))
        tau = numpyro.sample("tau", ndist.HalfCauchy(5.0))
        with numpyro.plate("school", len(sigma)):
            theta_raw = numpyro.sample("theta_raw", ndist.Normal(0.0, 1.0))
            numpyro.sample("y", ndist.Normal(mu + tau * theta_raw, sigma), obs=y)

    def ordered(name, k, prior_scale):
        locs = numpyro.sample(name, ndist.ImproperUniform(ndist.constraints.ordered_vector, (), (k,)))
        numpyro.factor(f"{name}_prior", ndist.Normal(0.0, prior_scale).log_prob(locs).sum(-1))
        return locs

    def mixture_np(y):
        weights = numpyro.sample("weights", ndist.Dirichlet(jnp.ones(3)))
        locs = ordered("locs", 3, 10.0)
        scale = numpyro.sample("scale", ndist.LogNormal(0.0, 1.0))
        with numpyro.plate("data", len(y)):
            numpyro.sample("y", ndist.MixtureSameFamily(ndist.Categorical(weights), ndist.Normal(locs, scale)), obs=y)

    def hmm_np(y):
        initial = numpyro.sample("initial", ndist.Dirichlet(jnp.ones(2)))
        transition = numpyro.sample("transition", ndist.Dirichlet(jnp.array([[8.0, 2.0], [2.0, 8.0]])).to_event(1))
        locs = ordered("locs", 2, 5.0)
        scale = numpyro.sample("scale", ndist.LogNormal(0.0, 1.0))
        log_obs = ndist.Normal(locs, scale).log_prob(jnp.asarray(y)[:, None])  # (T, K)
        log_trans = jnp.log(transition)

        def forward(alpha, lp):
            alpha = logsumexp(alpha[:, None] + log_trans, axis=0) + lp
            return alpha, None

        alpha, _ = lax.scan(forward, jnp.log(initial) + log_obs[0], log_obs[1:])
        numpyro.factor("y", logsumexp(alpha))

    def logistic_np(X, y=None):
        beta = numpyro.sample("beta", ndist.Normal(0.0, 1.0).expand([X.shape[-1]]).to_event(1))
        alpha = numpyro.sample("alpha", ndist.Normal(0.0, 2.0))
        with numpyro.plate("data", X.shape[0]):
            numpyro.sample("y", ndist.Bernoulli(logits=alpha + X @ beta), obs=y)

    return {"a": eight_schools_np, "b": mixture_np, "c": hmm_np, "d": logistic_np}


# -- running -------------------------------------------------------------------------------------------
def run_torch(engine: str, model: Callable[..., Any], data: dict[str, Any], draws: int, seed: int,
              **options: Any) -> tuple[float, float, Any]:
    """Wall times of the whole ``lk.fit`` and of its sampling (the fit less ``complete_result``)."""
    finishing = []

    def timed_complete_result(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        result = lk_posterior.complete_result(*args, **kwargs)
        finishing.append(time.perf_counter() - start)
        return result

    with mock.patch.object(lk_mcmc, "complete_result", timed_complete_result), \
            mock.patch.object(lk_pyro_nuts, "complete_result", timed_complete_result):
        start = time.perf_counter()
        res = lk.fit(model, data, engine=engine, num_warmup=draws, num_samples=draws, num_chains=4, seed=seed,
                     progress=False, **options)
        seconds = time.perf_counter() - start
    # The benchmark models have no deterministic sites: the float arrays are the continuous latents.
    return seconds, seconds - sum(finishing), az.from_dict(
        posterior={k: v for k, v in res.posterior.items() if v.dtype.kind == "f"})


def run_numpyro(model: Callable[..., Any], data: dict[str, Any], draws: int, seed: int) -> tuple[float, float, Any]:
    import jax
    from numpyro.infer import MCMC, NUTS

    start = time.perf_counter()
    mcmc = MCMC(NUTS(model), num_warmup=draws, num_samples=draws, num_chains=4, chain_method="vectorized",
                progress_bar=False)
    mcmc.run(jax.random.PRNGKey(seed), **{k: np.asarray(v) for k, v in data.items()})
    samples = {k: np.asarray(v) for k, v in mcmc.get_samples(group_by_chain=True).items()}
    seconds = time.perf_counter() - start
    return seconds, seconds, az.from_dict(posterior=samples)


def measure(idata: Any, seconds: float, sampling: float) -> dict[str, float]:
    ess = az.ess(idata, method="bulk").to_array().values
    rhat = az.rhat(idata).to_array().values
    min_ess = float(np.nanmin(np.concatenate([np.ravel(e) for e in ess])))
    return {"seconds": seconds, "sampling": sampling, "min_ess": min_ess, "ess_per_s": min_ess / sampling,
            "fit_ess_per_s": min_ess / seconds,
            "max_rhat": float(np.nanmax(np.concatenate([np.ravel(r) for r in rhat])))}


def agreement(a: Any, b: Any) -> float:
    """Largest |mean_a - mean_b| / sqrt(mcse_a^2 + mcse_b^2) over scalar parameters, and for the sds."""
    sa, sb = az.summary(a, kind="all", round_to="none"), az.summary(b, kind="all", round_to="none")
    sb = sb.loc[sa.index]
    z_mean = (sa["mean"] - sb["mean"]).abs() / np.sqrt(sa["mcse_mean"] ** 2 + sb["mcse_mean"] ** 2)
    z_sd = (sa["sd"] - sb["sd"]).abs() / np.sqrt(sa["mcse_sd"] ** 2 + sb["mcse_sd"] ** 2)
    return float(max(z_mean.max(), z_sd.max()))


def main(args: argparse.Namespace) -> None:
    torch.set_default_dtype(getattr(torch, args.dtype))
    # Before JAX starts its threads: they inherit the affinity.
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.cores])
    torch.set_num_threads(args.cores)
    engines = args.engines.split(",")
    if "numpyro" in engines:
        try:
            import numpyro

            numpyro.enable_x64(args.dtype == "float64")
            numpyro.set_host_device_count(1)
            twins = numpyro_models()
        except ImportError:
            print("numpyro is not installed (pip install -e .[bench]); skipping it")
            engines.remove("numpyro")
    draws = 100 if args.smoke else 1000
    rows = []
    for key, (label, model, data) in problems(args.smoke).items():
        if key not in args.models.split(","):
            continue
        results = {}
        for engine in engines:
            runs = []
            for seed in range(args.seeds):
                if engine == "numpyro":
                    seconds, sampling, idata = run_numpyro(twins[key], data, draws, seed)
                else:
                    options = {"jit": args.jit} if engine == "latentkit" else {}
                    seconds, sampling, idata = run_torch("nuts" if engine == "latentkit" else "pyro-nuts", model,
                                                         data, draws, seed, **options)
                runs.append((measure(idata, seconds, sampling), idata))
                m = runs[-1][0]
                whole = "" if engine == "numpyro" else \
                    f"  (whole fit {m['seconds']:6.1f} s, {m['fit_ess_per_s']:7.1f} ESS/s)"
                print(f"{label:26s} {engine:10s} {m['sampling']:8.1f} s  min bulk-ESS {m['min_ess']:7.0f}  "
                      f"{m['ess_per_s']:8.1f} ESS/s  max R-hat {m['max_rhat']:.3f}  seed {seed}{whole}", flush=True)
            # The run with the median ESS/s stands for the engine (seed to seed, adaptation decides
            # how long the slowest chain's trajectories are: +-15% in wall time).
            results[engine] = sorted(runs, key=lambda run: run[0]["ess_per_s"])[len(runs) // 2]
        rows.append((label, results))
    print("\nmin bulk-ESS per second of sampling, latentkit / peer (higher is better; median runs over seeds; "
          "whole fits in brackets); agreement with stock Pyro in MCSE")
    for label, results in rows:
        if "latentkit" not in results:
            continue
        ours, idata = results["latentkit"]
        parts = [f"{label:26s}"]
        for peer in ("pyro", "numpyro"):
            if peer in results:
                parts.append(f"vs {peer}: {ours['ess_per_s'] / results[peer][0]['ess_per_s']:6.2f}x")
                if peer == "pyro":
                    parts.append(f"({ours['fit_ess_per_s'] / results[peer][0]['fit_ess_per_s']:5.2f}x)")
        if "pyro" in results:
            parts.append(f"max |diff|/MCSE vs pyro: {agreement(idata, results['pyro'][1]):.2f}")
        print("  ".join(parts))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="100 + 100 draws on smaller data")
    parser.add_argument("--models", default="a,b,c,d", help="comma-separated subset of a,b,c,d")
    parser.add_argument("--engines", default="latentkit,pyro,numpyro", help="comma-separated subset")
    parser.add_argument("--seeds", type=int, default=1,
                        help="runs per engine and model, seeds 0, 1, ...; the median ESS/s run is compared")
    parser.add_argument("--dtype", default="float64", choices=["float64", "float32"],
                        help="floating-point precision of every engine (float32: their default)")
    parser.add_argument("--cores", type=int, default=1, help="CPU cores the process is pinned to (and torch's threads)")
    parser.add_argument("--jit", default=True, type=lambda v: v if v == "inductor" else v != "false",
                        help="latentkit's jit option: true (default), inductor or false")
    main(parser.parse_args())
