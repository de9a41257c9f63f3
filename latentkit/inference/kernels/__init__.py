"""Vectorised multi-chain MCMC kernels in pure PyTorch: NUTS, static HMC and their warm-up.

Each kernel follows one protocol: ``init(position, potential_and_grad) -> HMCState`` and
``step(generator, state, ...) -> (HMCState, Info)``, batched over a leading chain dimension;
NUTS also works one leapfrog step at a time (:func:`nuts.advance`), so that chains need not wait
for each other. :func:`run_chains` drives warm-up and sampling; :mod:`.compile` turns a step or a
potential into one graph, :mod:`.nuts_numba` runs NUTS's tree bookkeeping as compiled loops on
CPU, and :mod:`.discrete_hmm` sums out the states of Pyro's ``DiscreteHMM`` in one such loop.
"""

from latentkit.inference.kernels import adaptation, compile, hmc, integrators, metrics, nuts, simplify
from latentkit.inference.kernels.chains import Chains, run_chains
from latentkit.inference.kernels.metrics import Metric
from latentkit.inference.kernels.state import HMCState, Info, PotentialAndGrad, init

__all__ = [
    "Chains",
    "HMCState",
    "Info",
    "Metric",
    "PotentialAndGrad",
    "adaptation",
    "compile",
    "hmc",
    "init",
    "integrators",
    "metrics",
    "nuts",
    "run_chains",
    "simplify",
]
