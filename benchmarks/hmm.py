"""GaussianHMM (latentkit) against hmmlearn's GaussianHMM, and Pyro's DiscreteHMM for the forward pass.

Synthetic 4-state, 1-D Gaussian data (sticky transitions), one run, printed as ratios:

(a) one forward log-likelihood at T = 100,000 and 1,000,000 at the true parameters (best of 3):
    latentkit's ``HMMSequence.log_prob`` (on CPU the forward algorithm as a Numba loop), hmmlearn's
    ``score`` (C++ log-space forward), Pyro's ``DiscreteHMM.log_prob`` (parallel scan);
(b) MAP fit at T = 100,000: latentkit ``engine="svi", guide="delta"`` (Adam, k-means start)
    against hmmlearn's EM (``n_iter=1000, tol=1e-2``, its k-means start): wall time, final
    log-likelihood per step (exact, at the fitted parameters), the last steps' relative loss
    change as a convergence check, then a fresh fit of as many steps as the first needed for
    its loss to stay within 1e-5 of its final value (the time to convergence);
(c) NUTS at T = 1,000 (2 chains x 300 + 300 draws): wall time and minimum bulk ESS per second, to track.

    python benchmarks/hmm.py            # full size (several minutes)
    python benchmarks/hmm.py --smoke    # seconds
"""

import argparse
import time

import numpy as np
import pyro.distributions as dist
import torch
from hmmlearn.hmm import GaussianHMM as HmmlearnGaussianHMM

import latentkit as lk
from latentkit.datasets import make_markov_chain
from latentkit.models.hmm_ops import HMMSequence

K = 4
LOCS = np.array([-3.0, -1.0, 1.0, 3.0])
SCALES = np.array([0.6, 0.5, 0.5, 0.7])
TRANSITION = np.full((K, K), 0.02 / (K - 1)) + np.eye(K) * (0.98 - 0.02 / (K - 1))
INITIAL = np.full(K, 1.0 / K)


def simulate(T: int, seed: int = 0) -> np.ndarray:
    z = make_markov_chain(T, TRANSITION, INITIAL, seed=seed)
    return np.random.default_rng(seed + 1).normal(LOCS[z], SCALES[z])


def best_of(fn, repeats: int = 3) -> tuple[float, float]:
    """(seconds of the fastest run, its value)."""
    best, value = np.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - start)
    return best, value


def exact_log_likelihood(initial, transition, locs, scales, x: np.ndarray) -> float:
    """log p(x) at the given parameters, by latentkit's forward algorithm."""
    emission = dist.Normal(torch.as_tensor(locs).reshape(1, K, 1), torch.as_tensor(scales).reshape(1, K, 1))
    hmm = HMMSequence(torch.as_tensor(initial).log(), torch.as_tensor(transition).log(), emission.to_event(1),
                      num_steps=len(x))
    with torch.no_grad():
        return float(hmm.log_prob(torch.as_tensor(x).reshape(-1, 1)))


def forward(T: int) -> list[tuple[str, float, float]]:
    x = simulate(T)
    ref = HmmlearnGaussianHMM(K, covariance_type="diag", init_params="", params="")
    ref.n_features = 1
    ref.startprob_, ref.transmat_ = INITIAL, TRANSITION
    ref.means_, ref.covars_ = LOCS[:, None], (SCALES**2)[:, None]
    rows = [("hmmlearn score", *best_of(lambda: ref.score(x[:, None])))]
    rows.append(("latentkit HMMSequence", *best_of(lambda: exact_log_likelihood(INITIAL, TRANSITION, LOCS, SCALES, x))))
    # DiscreteHMM's initial distribution is of the state before the first step: make the first
    # transition row log INITIAL from every state so that it computes the same likelihood.
    first = torch.as_tensor(INITIAL).log().expand(1, K, K)
    steps = torch.cat([first, torch.as_tensor(TRANSITION).log().expand(T - 1, K, K)])
    obs = dist.Normal(torch.as_tensor(LOCS)[:, None], torch.as_tensor(SCALES)[:, None]).to_event(1)
    value = torch.as_tensor(x)[:, None]

    def pyro_forward() -> float:
        with torch.no_grad():
            return float(dist.DiscreteHMM(torch.zeros(K), steps, obs).log_prob(value))

    rows.append(("pyro DiscreteHMM", *best_of(pyro_forward)))
    return rows


def map_fit(T: int, steps: int) -> list[tuple[str, float, float, float]]:
    x = simulate(T, seed=1)
    start = time.perf_counter()
    ref = HmmlearnGaussianHMM(K, covariance_type="diag", n_iter=1000, tol=1e-2, random_state=0).fit(x[:, None])
    ref_time = time.perf_counter() - start
    ref_ll = exact_log_likelihood(ref.startprob_, ref.transmat_, ref.means_[:, 0], np.sqrt(ref.covars_[:, 0, 0]), x)
    rows = [("hmmlearn EM", ref_time, ref_ll / T, float(ref.monitor_.iter))]
    start = time.perf_counter()
    res = lk.fit(lk.models.GaussianHMM(K), x, engine="svi", guide="delta", steps=steps, learning_rate=0.05,
                 num_samples=1, seed=0, progress=False)
    ours_time = time.perf_counter() - start
    post = {k: v[0, 0] for k, v in res.posterior.items()}
    ours_ll = exact_log_likelihood(post["initial"], post["transition"], post["locs"][:, 0], post["scales"][:, 0], x)
    tail = res.losses[-50:]
    change = abs(tail[-1] - tail[0]) / abs(tail[-1])  # relative loss change over the last 50 steps
    rows.append((f"latentkit SVI MAP ({steps} steps)", ours_time, ours_ll / T, change))
    # The first step from which the loss stays within 1e-5 (relative) of its final value: the
    # fit had converged there. Time a fresh fit of that many steps (setup and k-means included).
    within = np.abs(res.losses - res.losses[-1]) <= 1e-5 * abs(res.losses[-1])
    first = int(np.argmax(np.logical_and.accumulate(within[::-1])[::-1])) + 1
    start = time.perf_counter()
    res = lk.fit(lk.models.GaussianHMM(K), x, engine="svi", guide="delta", steps=first, learning_rate=0.05,
                 num_samples=1, seed=0, progress=False)
    short_time = time.perf_counter() - start
    post = {k: v[0, 0] for k, v in res.posterior.items()}
    short_ll = exact_log_likelihood(post["initial"], post["transition"], post["locs"][:, 0], post["scales"][:, 0], x)
    rows.append((f"latentkit SVI MAP ({first} steps)", short_time, short_ll / T, float(first)))
    return rows


def nuts(T: int, draws: int, chains: int) -> tuple[float, float, float]:
    x = simulate(T, seed=2)
    start = time.perf_counter()
    res = lk.fit(lk.models.GaussianHMM(K), x, engine="nuts", num_warmup=draws, num_samples=draws,
                 num_chains=chains, seed=0, progress=False)
    elapsed = time.perf_counter() - start
    ess = float(res.summary(var_names=["locs", "scales", "transition"])["ess_bulk"].min())
    return elapsed, ess, ess / elapsed


def main(args: argparse.Namespace) -> None:
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(args.threads)
    sizes = (10_000, 100_000) if args.smoke else (100_000, 1_000_000)
    print(f"4-state 1-D Gaussian HMM, torch threads = {args.threads}")
    print(f"\n(a) one forward log-likelihood (best of 3)\n{'T':>9}  {'method':<24}{'seconds':>9}{'ratio':>8}"
          f"{'log-lik':>18}")
    for T in sizes:
        rows = forward(T)
        base = rows[0][1]
        for name, seconds, value in rows:
            print(f"{T:>9}  {name:<24}{seconds:>9.4f}{seconds / base:>8.2f}{value:>18.4f}")

    T_fit = sizes[0]
    steps = 50 if args.smoke else args.steps
    rows = map_fit(T_fit, steps)
    print(f"\n(b) MAP fit at T = {T_fit}\n{'method':<34}{'seconds':>9}{'ratio':>8}{'log-lik/step':>14}"
          f"{'minus hmmlearn':>16}{'(relative)':>12}  convergence")
    base_time, base_ll = rows[0][1], rows[0][2]
    notes = ("EM iterations", "relative loss change, last 50 steps", "steps until the loss stayed within 1e-5")
    for (name, seconds, ll, extra), note in zip(rows, notes, strict=True):
        print(f"{name:<34}{seconds:>9.2f}{seconds / base_time:>8.2f}{ll:>14.6f}{ll - base_ll:>16.6f}"
              f"{(ll - base_ll) / abs(base_ll):>12.2e}  {note}: {extra:.3g}")

    T_nuts, draws, chains = (200, 30, 1) if args.smoke else (1000, 300, 2)
    elapsed, ess, rate = nuts(T_nuts, draws, chains)
    print(f"\n(c) NUTS at T = {T_nuts}, {chains} chains x {draws} warm-up + {draws} draws: {elapsed:.1f} s, "
          f"min bulk ESS {ess:.0f}, {rate:.2f} ESS/s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--steps", type=int, default=500, help="SVI steps of the MAP fit")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (hmmlearn uses one)")
    main(parser.parse_args())
