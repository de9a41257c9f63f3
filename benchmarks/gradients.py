"""Cost of one potential-energy-and-gradient evaluation per chain: where NUTS spends its time.

For the four models of ``benchmarks/mcmc.py`` and a 2-state HMM written by hand with
``pyro.markov`` (T = 100, states enumerated step by step), one CPU thread, float64:

- latentkit: the compiled potential of ``lk.fit(engine="nuts")`` (4 chains per call, divided by
  4), its compile time, and the eager potential through the Pyro model (4 chains per call);
- stock Pyro: ``initialize_model``'s ``potential_fn`` and ``potential_grad``, as Pyro's NUTS
  calls them (one chain per call), with ``jit_compile`` on (its trace time apart) and off;
- for logistic regression, the floor: only the arithmetic over the data that any engine must do
  per gradient (the products with X forward and back, one log-sigmoid and one sigmoid per
  point), in torch's fastest layout, all chains in one call. NUTS needs ~7 gradients per draw
  here (tree depth 3), so 2,000 iterations cost at least 14,000 x this floor per chain.

    python benchmarks/gradients.py             # about 3 minutes
    python benchmarks/gradients.py --models e  # the pyro.markov HMM only
"""

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.infer.mcmc.util import initialize_model
from pyro.ops.indexing import Vindex
from pyro.ops.integrator import potential_grad

sys.path.insert(0, str(Path(__file__).parent))
import mcmc  # noqa: E402 - the benchmark models, from this folder

from latentkit.inference.initialization import init_to_unconstrained_uniform  # noqa: E402
from latentkit.inference.potential import Potential  # noqa: E402
from latentkit.inference.target import bind  # noqa: E402
from latentkit.inference.vectorize import BatchedModel  # noqa: E402

CHAINS = 4


def markov_hmm(y):
    """A 2-state Gaussian HMM as users write one: a Python loop under ``pyro.markov``."""
    probs = pyro.sample("probs", dist.Dirichlet(torch.tensor([[8.0, 2.0], [2.0, 8.0]])).to_event(1))
    locs = pyro.sample("locs", dist.ImproperUniform(constraints.ordered_vector, (), (2,)))
    pyro.factor("locs_prior", dist.Normal(0.0, 5.0).log_prob(locs).sum(-1))
    x = 0
    for t in pyro.markov(range(len(y))):
        x = pyro.sample(f"x_{t}", dist.Categorical(Vindex(probs)[..., x, :]), infer={"enumerate": "parallel"})
        pyro.sample(f"y_{t}", dist.Normal(Vindex(locs)[..., x], 1.0), obs=y[t])


def per_call(fn: Callable[[], Any], seconds: float = 2.0) -> float:
    """Mean seconds per call of ``fn`` over about ``seconds`` (after one warm-up call)."""
    fn()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or calls < 3:
        fn()
        calls += 1
    return (time.perf_counter() - start) / calls


def latentkit_costs(model: Callable[..., Any], data: dict[str, Any]) -> tuple[dict[str, float], dict[str, Any]]:
    """The costs, and the first chain's starting point and plate nesting (for Pyro's)."""
    with pyro.validation_enabled(False):
        target = bind(model, data, "cpu")
        batched = BatchedModel(target)
        potential = Potential(target, batched)
        z = 0.1 * torch.randn(CHAINS, potential.dim, generator=torch.Generator().manual_seed(0))
        batched.check_vectorization(potential.constrain(z)[0])
        eager = per_call(lambda: potential._value_and_grad(z)) / CHAINS
        start = time.perf_counter()
        compiled = potential.compile(z)
        compile_seconds = time.perf_counter() - start
        fast = per_call(lambda: potential(z)) / CHAINS if compiled else float("nan")
    sizes = [size for *_, size in potential.layout]
    start_point = {name: part.reshape(shape) for (name, shape, *_), part
                   in zip(potential.layout, z[0].split(sizes), strict=True)}
    setup = {"initial_params": start_point, "max_plate_nesting": target.max_plate_nesting,
             "init_strategy": init_to_unconstrained_uniform()}  # Pyro's default raises on ImproperUniform
    return {"compiled": fast, "compile": compile_seconds, "eager": eager}, setup


def pyro_costs(model: Callable[..., Any], data: dict[str, Any], setup: dict[str, Any], jit: bool) -> dict[str, float]:
    kwargs = {k: torch.as_tensor(v) for k, v in data.items()}
    start = time.perf_counter()
    params, potential_fn, _, _ = initialize_model(model, model_kwargs=kwargs, jit_compile=jit, skip_jit_warnings=True,
                                                  **setup)
    potential_grad(potential_fn, params)  # the first call traces when jit_compile is on
    seconds = time.perf_counter() - start
    return {"per_gradient": per_call(lambda: potential_grad(potential_fn, params)), "setup": seconds}


def logistic_floor(data: dict[str, Any]) -> float:
    """Seconds per chain of the data-sized arithmetic of one logistic-regression gradient."""
    X = torch.as_tensor(data["X"])
    transposed = X.t().contiguous()
    coefficients = torch.randn(CHAINS, X.shape[1], generator=torch.Generator().manual_seed(0))

    def arithmetic() -> tuple[torch.Tensor, torch.Tensor]:
        logits = coefficients @ transposed  # (C, N), rows contiguous: the fastest layout measured
        return torch.nn.functional.logsigmoid(logits).sum(-1), torch.sigmoid(logits) @ X

    return per_call(arithmetic) / CHAINS


def main(args: argparse.Namespace) -> None:
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    problems = dict(mcmc.problems(smoke=False))
    problems["e"] = ("pyro.markov HMM K=2 T=100", markov_hmm, {"y": torch.tensor(mcmc.hmm_data(100))})
    print(f"{'model':<28}{'latentkit compiled':>20}{'(compile)':>11}{'eager':>11}"
          f"{'Pyro jit':>11}{'(trace)':>10}{'Pyro':>11}{'vs Pyro jit':>13}{'vs Pyro':>9}")
    for key in args.models.split(","):
        name, model, data = problems[key]
        ours, setup = latentkit_costs(model, data)
        jit = pyro_costs(model, data, setup, jit=True)
        plain = pyro_costs(model, data, setup, jit=False)
        print(f"{name:<28}{ours['compiled'] * 1e6:>17.0f} us{ours['compile']:>9.1f} s{ours['eager'] * 1e6:>8.0f} us"
              f"{jit['per_gradient'] * 1e6:>8.0f} us{jit['setup']:>8.1f} s{plain['per_gradient'] * 1e6:>8.0f} us"
              f"{jit['per_gradient'] / ours['compiled']:>12.1f}x{plain['per_gradient'] / ours['compiled']:>8.1f}x",
              flush=True)
        if key == "d":
            print(f"{'  floor (data arithmetic)':<28}{logistic_floor(data) * 1e6:>17.0f} us", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="a,b,c,d,e", help="comma-separated keys: a-d as in mcmc.py, e the "
                                                             "pyro.markov HMM")
    main(parser.parse_args())
