"""Stock Pyro NUTS as an engine (``engine="pyro-nuts"``): the reference the fast engine is
checked and benchmarked against, with the same options and the same kind of result."""

import dataclasses
import warnings
from typing import Any

import numpy as np
import pyro
from pyro.infer import MCMC, NUTS

from latentkit.errors import ConfigError
from latentkit.inference.base import parse_options, register_engine, seeded, versions
from latentkit.inference.initialization import init_to_unconstrained_uniform
from latentkit.inference.mcmc import MCMCOptions
from latentkit.inference.posterior import complete_result
from latentkit.inference.result import Result
from latentkit.inference.target import bind, model_config
from latentkit.inference.vectorize import BatchedModel

__all__ = ["PyroNUTSEngine"]

#: MCMCOptions that stock Pyro NUTS has no counterpart for.
UNSUPPORTED = ("num_steps", "trajectory_length", "init")


class PyroNUTSEngine:
    """``pyro.infer.MCMC`` with ``pyro.infer.NUTS`` (``jit_compile`` follows ``jit``).

    Pyro runs the chains one after another, or in worker processes when there are more free
    CPUs than chains. Its per-draw statistics are not exposed beyond divergences, so the
    result's ``sample_stats`` holds ``diverging`` only.
    """

    name = "pyro-nuts"

    def __init__(self, **options: Any) -> None:
        for key in UNSUPPORTED:
            if key in options:
                raise ConfigError(f"{key}: stock Pyro NUTS has no such option; use engine='nuts' or drop it.")
        self.options = parse_options(MCMCOptions, options, self.name)

    def fit(self, model: Any, data: Any, *, seed: int = 0, progress: bool = True) -> Result:
        opts = self.options
        with seeded(seed, opts.device):
            pyro.set_rng_seed(seed)
            target = bind(model, data, opts.device)
            kernel = NUTS(target.fn, target_accept_prob=opts.target_accept, max_tree_depth=opts.max_tree_depth,
                          full_mass=opts.dense_mass, jit_compile=opts.jit, ignore_jit_warnings=True,
                          max_plate_nesting=target.max_plate_nesting,
                          # Pyro's default init_to_uniform raises on ImproperUniform sites.
                          init_strategy=init_to_unconstrained_uniform())
            with warnings.catch_warnings():
                # Running chains one after another on a small machine is documented above; Pyro's
                # jit_compile is built on torch.jit.trace, which torch now marks deprecated.
                warnings.filterwarnings("ignore", "num_chains=.* is more than available_cpu", UserWarning)
                warnings.filterwarnings("ignore", ".*torch.jit.trace. is deprecated", DeprecationWarning)
                mcmc = MCMC(kernel, num_samples=opts.num_samples, warmup_steps=opts.num_warmup,
                            num_chains=opts.num_chains, disable_progbar=not progress)
                mcmc.run(**target.kwargs)
            samples = mcmc.get_samples(group_by_chain=True)
            samples = {k: v.reshape(v.shape[:2] + target.sites[k].shape) for k, v in samples.items()}
            diverging = np.zeros((opts.num_chains, opts.num_samples), dtype=bool)
            for chain, draws in enumerate(mcmc.diagnostics()["divergences"].values()):
                diverging[chain, draws] = True
            config = {
                "model": model_config(model),
                "engine": {"name": self.name, "options": {k: v for k, v in dataclasses.asdict(opts).items()
                                                          if k not in UNSUPPORTED}},
                "seed": seed,
                "versions": versions(),
            }
            batched = BatchedModel(target)
            # As the fast engine does: evaluate draws one at a time if the model does not broadcast
            # over a batch of them (e.g. `X @ beta`), instead of broadcasting it into huge tensors.
            batched.check_vectorization({k: v[:, 0] for k, v in samples.items()})
            return complete_result(target, batched, samples, model=model,
                                   sample_stats={"diverging": diverging}, config=config, seed=seed)


register_engine("pyro-nuts", PyroNUTSEngine)
