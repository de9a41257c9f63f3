"""The velocity Verlet (leapfrog) integrator, batched over chains."""

from typing import NamedTuple

import torch
from torch import Tensor

from latentkit.inference.kernels.metrics import Metric, velocity
from latentkit.inference.kernels.state import PotentialAndGrad, evaluate_potential

__all__ = ["IntegratorState", "PhasePoint", "leapfrog"]


class IntegratorState(NamedTuple):
    """A point in phase space, with the quantities the next step and the energy need.

    Attributes:
        position: ``z``.
        momentum: ``r``.
        potential_energy: ``U(z)``; ``+inf`` where the potential was not finite.
        potential_grad: ``dU/dz(z)``.
        velocity: ``M^{-1} r``, cached for the kinetic energy and the U-turn criterion.

    Shapes:
        ``potential_energy``: ``(C,)``; the other fields ``(C, D)``.
    """

    position: Tensor
    momentum: Tensor
    potential_energy: Tensor
    potential_grad: Tensor
    velocity: Tensor


class PhasePoint(NamedTuple):
    """What :func:`leapfrog` needs of a point: position ``z``, momentum ``r`` and ``dU/dz(z)``.

    Shapes:
        all fields ``(C, D)``.
    """

    position: Tensor
    momentum: Tensor
    potential_grad: Tensor


def leapfrog(
    potential_and_grad: PotentialAndGrad,
    metric: Metric,
    state: IntegratorState | PhasePoint,
    step_size: Tensor,
) -> IntegratorState:
    """One velocity Verlet step of ``dz/dt = M^{-1} r``, ``dr/dt = -dU/dz``.

    The step is symplectic and time reversible; its energy error is ``O(step_size^2)`` over a
    fixed integration time. A negative step size integrates backwards in time.

    Args:
        potential_and_grad: the batched potential.
        metric: the per-chain metric.
        state: the current point of each chain.
        step_size: a per-chain (signed) step size.

    Returns:
        The point one step further along each chain's trajectory.

    Shapes:
        ``step_size``: ``(C,)``; ``state`` as in :class:`IntegratorState`.

    Example:
        >>> from latentkit.inference.kernels.metrics import identity_metric
        >>> def potential(z):
        ...     return 0.5 * (z**2).sum(-1), z
        >>> z, r = torch.zeros(1, 1), torch.ones(1, 1)
        >>> state = IntegratorState(z, r, *potential(z), r)
        >>> metric = identity_metric(z, dense=False)
        >>> leapfrog(potential, metric, state, torch.tensor([0.1])).position
        tensor([[0.1000]])
    """
    step = step_size.unsqueeze(-1)
    half_step = 0.5 * step
    momentum = torch.addcmul(state.momentum, half_step, state.potential_grad, value=-1.0)
    position = torch.addcmul(state.position, step, velocity(metric, momentum))
    potential_energy, potential_grad = evaluate_potential(potential_and_grad, position)
    momentum = torch.addcmul(momentum, half_step, potential_grad, value=-1.0)
    return IntegratorState(
        position, momentum, potential_energy, potential_grad, velocity(metric, momentum)
    )

