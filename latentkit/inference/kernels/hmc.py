"""Static Hamiltonian Monte Carlo: a fixed number of leapfrog steps and a Metropolis correction.

References:
    Neal (2011), MCMC Using Hamiltonian Dynamics, Handbook of Markov Chain Monte Carlo.
"""

import math

import torch
from torch import Tensor

from latentkit.inference.kernels.integrators import IntegratorState, leapfrog
from latentkit.inference.kernels.metrics import Metric, kinetic_energy, sample_momentum, velocity
from latentkit.inference.kernels.nuts import MAX_DELTA_ENERGY
from latentkit.inference.kernels.state import HMCState, Info, PotentialAndGrad, select_where

__all__ = ["step"]


def step(
    generator: torch.Generator,
    state: HMCState,
    *,
    potential_and_grad: PotentialAndGrad,
    metric: Metric,
    step_size: Tensor,
    num_steps: int | Tensor,
) -> tuple[HMCState, Info]:
    """One static HMC transition of every chain.

    Every chain integrates its trajectory for its number of steps and accepts the end point
    with probability ``min(1, exp(H0 - H))``. Chains with fewer steps than others are frozen
    while the others finish. A transition is divergent when the energy error at the end point
    exceeds :data:`~latentkit.inference.kernels.nuts.MAX_DELTA_ENERGY` or is not finite (as in
    NumPyro); it is then rejected.

    Args:
        generator: the source of all randomness, on the device of ``state``.
        state: the current state of the chains.
        potential_and_grad: the batched potential.
        metric: the per-chain metric.
        step_size: the per-chain leapfrog step size.
        num_steps: the number of leapfrog steps, shared or per chain, each at least 1.

    Returns:
        The new state and the transition's statistics (``tree_depth`` is 0: no tree is built).

    Shapes:
        ``state.position``: ``(C, D)``; ``step_size``: ``(C,)``; ``num_steps``: ``int`` or
        ``(C,)`` ``int64``; every ``Info`` field ``(C,)``.

    Example:
        >>> from latentkit.inference.kernels.metrics import identity_metric
        >>> from latentkit.inference.kernels.state import init
        >>> def potential(z):
        ...     return 0.5 * (z**2).sum(-1), z
        >>> state = init(torch.zeros(2, 3), potential)
        >>> metric = identity_metric(state.position, dense=False)
        >>> state, info = step(torch.Generator().manual_seed(0), state,
        ...                    potential_and_grad=potential, metric=metric,
        ...                    step_size=torch.full((2,), 0.3), num_steps=5)
        >>> info.n_steps
        tensor([5, 5])
    """
    num_chains, dim = state.position.shape
    dtype, device = state.position.dtype, state.position.device
    noise = torch.randn(num_chains, dim, generator=generator, dtype=dtype, device=device)
    uniform = torch.rand(num_chains, generator=generator, dtype=dtype, device=device)
    momentum = sample_momentum(metric, noise)
    start = IntegratorState(
        state.position,
        momentum,
        state.potential_energy,
        state.potential_grad,
        velocity(metric, momentum),
    )
    initial_energy = state.potential_energy + kinetic_energy(momentum, start.velocity)

    end = start
    if isinstance(num_steps, int):
        for _ in range(num_steps):
            end = leapfrog(potential_and_grad, metric, end, step_size)
        n_steps = torch.full((num_chains,), num_steps, dtype=torch.int64, device=device)
    else:
        for index in range(int(num_steps.max())):
            new = leapfrog(potential_and_grad, metric, end, step_size)
            end = select_where(index < num_steps, new, end)
        n_steps = num_steps

    final_energy = end.potential_energy + kinetic_energy(end.momentum, end.velocity)
    delta = (final_energy - initial_energy).nan_to_num(math.inf, posinf=math.inf)
    # A chain whose current energy is not finite cannot compare energies: it stays put.
    delta = torch.where(torch.isfinite(initial_energy), delta, math.inf)
    acceptance_rate = torch.exp(-delta).clamp(max=1.0)
    diverging = delta > MAX_DELTA_ENERGY
    accept = uniform < acceptance_rate
    vector_accept = accept.unsqueeze(-1)
    new_state = HMCState(
        torch.where(vector_accept, end.position, state.position),
        torch.where(accept, end.potential_energy, state.potential_energy),
        torch.where(vector_accept, end.potential_grad, state.potential_grad),
    )
    info = Info(
        acceptance_rate,
        torch.zeros(num_chains, dtype=torch.int64, device=device),
        n_steps,
        diverging,
        torch.where(accept, final_energy, initial_energy),
    )
    return new_state, info
