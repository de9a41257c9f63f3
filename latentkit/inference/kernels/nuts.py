"""The No-U-Turn Sampler, vectorised over chains that build their trees in lock-step.

Each transition draws a momentum, then doubles the trajectory in a random direction until the
generalised no-U-turn criterion fails on the whole trajectory or on a subtree, a leapfrog step
diverges, or ``max_tree_depth`` doublings were made. Points are chosen by multinomial sampling:
biased progressive sampling between the old trajectory and each new subtree, uniform
progressive sampling within a subtree (Stan's scheme, Betancourt 2017, appendix A.3).

Subtrees are built iteratively, one leaf at a time, as NumPyro's ``_iterative_build_subtree``
does: the U-turn checks of all sub-subtrees that end at a leaf use checkpoints of the momentum
and of the running momentum sum stored at earlier even-numbered leaves, so a subtree of
``2**d`` leaves keeps only ``d`` checkpoints.

All chains take their leapfrog steps together. A chain whose tree is finished is frozen with
masks; the loops stop when every chain is finished. The host synchronises once per doubling to
stop the doubling loop and, inside a subtree, after leaves ``1, 2, 4, ...`` to stop early when
all chains ended their subtree (on CPU, where a check costs no device synchronisation, after
every leaf). Randomness is drawn per doubling, so where the loops stop never changes the draws.

Conventions (NumPyro's): ``tree_depth`` counts the doublings made, including a last subtree
that was rejected because it turned or diverged, so ``1 <= tree_depth <= max_tree_depth`` and
``2**(tree_depth - 1) <= n_steps <= 2**tree_depth - 1``. (Stan does not count the rejected last
subtree in ``treedepth__``.) The U-turn criterion is NumPyro's, without the extra checks across
merged subtrees that Stan added in 2.23.

References:
    Hoffman & Gelman (2014), The No-U-Turn Sampler, JMLR 15.
    Betancourt (2017), A Conceptual Introduction to Hamiltonian Monte Carlo, arXiv:1701.02434.
"""

import math
from typing import NamedTuple

import torch
from torch import Tensor

from latentkit.inference.kernels.integrators import IntegratorState, leapfrog, select_state
from latentkit.inference.kernels.metrics import Metric, kinetic_energy, sample_momentum, velocity
from latentkit.inference.kernels.state import HMCState, Info, PotentialAndGrad

__all__ = ["MAX_DELTA_ENERGY", "is_turning", "step"]

# Energy error above which a trajectory is declared divergent (Stan's default max_deltaH).
MAX_DELTA_ENERGY = 1000.0


def is_turning(
    velocity_left: Tensor,
    velocity_right: Tensor,
    momentum_left: Tensor,
    momentum_right: Tensor,
    momentum_sum: Tensor,
) -> Tensor:
    """The generalised no-U-turn criterion for a trajectory from its two end points.

    With ``rho = momentum_sum - (momentum_left + momentum_right) / 2`` (the trapezoidal
    integral of the momentum along the trajectory, Betancourt 2017, appendix A.4.2, as in
    NumPyro), the trajectory turns when ``velocity_left . rho <= 0`` or
    ``velocity_right . rho <= 0``, the velocities being ``M^{-1} r`` at the ends.

    Args:
        velocity_left: ``M^{-1} r`` at the first point of the trajectory.
        velocity_right: ``M^{-1} r`` at the last point.
        momentum_left: ``r`` at the first point.
        momentum_right: ``r`` at the last point.
        momentum_sum: the sum of the momenta of all points of the trajectory, ends included.

    Returns:
        Whether each trajectory turned.

    Shapes:
        all arguments ``(..., D)``, broadcast together; returns ``(...)``.

    Example:
        >>> r = torch.tensor([[1.0, 0.0]])
        >>> is_turning(r, -r, r, -r, torch.zeros(1, 2))
        tensor([True])
    """
    rho = momentum_sum - 0.5 * (momentum_left + momentum_right)
    return (torch.linalg.vecdot(velocity_left, rho) <= 0) | (
        torch.linalg.vecdot(velocity_right, rho) <= 0
    )


class _Proposal(NamedTuple):
    """The point a trajectory currently proposes, with what the next transition needs."""

    position: Tensor
    potential_energy: Tensor
    potential_grad: Tensor
    energy: Tensor


def _choose(mask: Tensor, new: _Proposal, old: _Proposal) -> _Proposal:
    """Per chain, ``new`` where ``mask`` holds, else ``old``."""
    vector_mask = mask.unsqueeze(-1)
    return _Proposal(
        torch.where(vector_mask, new.position, old.position),
        torch.where(mask, new.potential_energy, old.potential_energy),
        torch.where(vector_mask, new.potential_grad, old.potential_grad),
        torch.where(mask, new.energy, old.energy),
    )


def _checkpoint_range(leaf: int) -> tuple[int, int]:
    """The checkpoints to test for U-turns when ``leaf`` closes one or more subtrees.

    Leaf ``n`` (counted from 0 within the subtree) closes as many balanced sub-subtrees as ``n``
    has trailing one bits; their first leaves are checkpointed at indices ``idx_max`` down to
    ``idx_min``, where ``idx_max`` is the number of one bits of ``n >> 1`` (NumPyro's
    ``_leaf_idx_to_ckpt_idxs``). Even leaves close no subtree: the range is empty.
    """
    idx_max = (leaf >> 1).bit_count()
    num_subtrees = (~leaf & (leaf + 1)).bit_length() - 1
    return idx_max - num_subtrees + 1, idx_max


class _Subtree(NamedTuple):
    """A subtree of ``2**depth`` leaves built from one end of the trajectory.

    For chains that built it to the end without turning or diverging (the only ones that use
    the first four fields): its outermost leaf, its proposal, the log of its summed weights
    ``exp(H0 - H)`` and its momentum sum. The flags and the statistics count every chain's
    leaves up to where it stopped.
    """

    last: IntegratorState
    proposal: _Proposal
    log_weight: Tensor
    momentum_sum: Tensor
    turning: Tensor
    diverging: Tensor
    sum_accept: Tensor
    n_steps: Tensor


def _build_subtree(
    potential_and_grad: PotentialAndGrad,
    metric: Metric,
    start: IntegratorState,
    step_size: Tensor,
    reference_energy: Tensor,
    building: Tensor,
    uniforms: Tensor,
    checkpoints: Tensor,
) -> _Subtree:
    """Build a subtree of ``uniforms.shape[1] + 1`` leaves leaf by leaf, for all chains at once.

    Chains not ``building`` and chains whose subtree turned or diverged are frozen. Leaf ``n``
    closes the balanced sub-subtrees that end at it; each is checked for a U-turn from the
    checkpointed momentum and momentum sum at its first leaf (NumPyro's
    ``_iterative_build_subtree``).

    Shapes:
        ``step_size`` (signed by direction), ``reference_energy``, ``building``: ``(C,)``;
        ``uniforms``: ``(C, num_leaves - 1)``; ``checkpoints``: ``(3, >= depth - 1, C, D)``.
    """
    # On CPU, checking whether any chain is still going costs no device synchronisation.
    check_every_leaf = building.device.type == "cpu"
    active = building
    turning = torch.zeros_like(building)
    diverging = torch.zeros_like(building)
    sum_accept = torch.zeros_like(reference_energy)
    n_steps = torch.zeros_like(building, dtype=torch.int64)
    frontier = start
    for leaf in range(uniforms.shape[1] + 1):
        if leaf > 0 and (check_every_leaf or leaf & (leaf - 1) == 0):
            if not bool(active.any()):
                break
        new = leapfrog(potential_and_grad, metric, frontier, step_size)
        energy = new.potential_energy + kinetic_energy(new.momentum, new.velocity)
        delta = (energy - reference_energy).nan_to_num(math.inf, posinf=math.inf)
        leaf_proposal = _Proposal(new.position, new.potential_energy, new.potential_grad, energy)
        if leaf == 0:
            log_weight, momentum_sum, proposal = -delta, new.momentum, leaf_proposal
        else:
            # Uniform progressive sampling: the new leaf replaces the subtree's proposal with
            # probability w_leaf / (w_subtree + w_leaf).
            take = active & (uniforms[:, leaf - 1] < torch.sigmoid(-delta - log_weight))
            proposal = _choose(take, leaf_proposal, proposal)
            # Not masked: only chains active for the whole subtree use these sums.
            log_weight = torch.logaddexp(log_weight, -delta)
            momentum_sum = momentum_sum + new.momentum
        sum_accept = sum_accept + torch.where(active, torch.exp(-delta).clamp(max=1.0), 0.0)
        n_steps = n_steps + active
        frontier = select_state(active, new, frontier)

        leaf_diverging = delta > MAX_DELTA_ENERGY
        low, high = _checkpoint_range(leaf)
        if leaf % 2 == 0:
            checkpoints[0, high] = new.momentum
            checkpoints[1, high] = new.velocity
            checkpoints[2, high] = momentum_sum
            stop = leaf_diverging
        else:
            ckpt_momentum, ckpt_velocity, ckpt_sum = checkpoints[:, low : high + 1]
            leaf_turning = is_turning(
                ckpt_velocity,
                new.velocity,
                ckpt_momentum,
                new.momentum,
                momentum_sum - ckpt_sum + ckpt_momentum,
            ).any(0)
            turning = turning | (active & leaf_turning)
            stop = leaf_diverging | leaf_turning
        diverging = diverging | (active & leaf_diverging)
        active = active & ~stop
    return _Subtree(
        frontier, proposal, log_weight, momentum_sum, turning, diverging, sum_accept, n_steps
    )


def step(
    generator: torch.Generator,
    state: HMCState,
    *,
    potential_and_grad: PotentialAndGrad,
    metric: Metric,
    step_size: Tensor,
    max_tree_depth: int = 10,
) -> tuple[HMCState, Info]:
    """One NUTS transition of every chain.

    Args:
        generator: the source of all randomness, on the device of ``state``.
        state: the current state of the chains.
        potential_and_grad: the batched potential.
        metric: the per-chain metric.
        step_size: the per-chain leapfrog step size.
        max_tree_depth: the most trajectory doublings, at least 1 (Stan's and NumPyro's
            default of 10 allows up to 1023 leapfrog steps).

    Returns:
        The new state and the transition's statistics.

    Shapes:
        ``state.position``: ``(C, D)``; ``step_size``: ``(C,)``; every ``Info`` field ``(C,)``.

    Example:
        >>> from latentkit.inference.kernels.metrics import identity_metric
        >>> from latentkit.inference.kernels.state import init
        >>> def potential(z):
        ...     return 0.5 * (z**2).sum(-1), z
        >>> state = init(torch.zeros(4, 3), potential)
        >>> metric = identity_metric(state.position, dense=False)
        >>> state, info = step(torch.Generator().manual_seed(0), state,
        ...                    potential_and_grad=potential, metric=metric,
        ...                    step_size=torch.full((4,), 0.5))
        >>> bool((info.n_steps <= 2**info.tree_depth - 1).all())
        True
    """
    num_chains, dim = state.position.shape
    dtype, device = state.position.dtype, state.position.device
    momentum = sample_momentum(
        metric, torch.randn(num_chains, dim, generator=generator, dtype=dtype, device=device)
    )
    start = IntegratorState(
        state.position,
        momentum,
        state.potential_energy,
        state.potential_grad,
        velocity(metric, momentum),
    )
    initial_energy = state.potential_energy + kinetic_energy(momentum, start.velocity)
    # A chain whose current energy is not finite cannot compare energies: with a reference of
    # -inf every step it takes has an infinite energy error, i.e. diverges, and it stays put.
    reference_energy = torch.where(torch.isfinite(initial_energy), initial_energy, -math.inf)

    left = right = start
    momentum_sum = momentum
    log_weight = torch.zeros(num_chains, dtype=dtype, device=device)
    proposal = _Proposal(
        state.position, state.potential_energy, state.potential_grad, initial_energy
    )
    sum_accept = torch.zeros(num_chains, dtype=dtype, device=device)
    n_steps = torch.zeros(num_chains, dtype=torch.int64, device=device)
    tree_depth = torch.zeros(num_chains, dtype=torch.int64, device=device)
    diverging = torch.zeros(num_chains, dtype=torch.bool, device=device)
    building = torch.ones(num_chains, dtype=torch.bool, device=device)
    # Checkpoints for the U-turn checks inside a subtree: a subtree of 2**d leaves uses d, and
    # the largest subtree has d = max_tree_depth - 1.
    checkpoints = torch.empty(
        3, max(max_tree_depth - 1, 1), num_chains, dim, dtype=dtype, device=device
    )

    for depth in range(max_tree_depth):
        if depth > 0 and not bool(building.any()):
            break
        # Column 0: direction; column 1: the top-level transition; columns 2...: leaves 1...
        uniforms = torch.rand(
            num_chains, 2**depth + 1, generator=generator, dtype=dtype, device=device
        )
        going_right = uniforms[:, 0] < 0.5
        subtree = _build_subtree(
            potential_and_grad,
            metric,
            select_state(going_right, right, left),
            torch.where(going_right, step_size, -step_size),
            reference_energy,
            building,
            uniforms[:, 2:],
            checkpoints,
        )
        sum_accept = sum_accept + subtree.sum_accept
        n_steps = n_steps + subtree.n_steps
        tree_depth = tree_depth + building
        diverging = diverging | subtree.diverging

        # Biased progressive sampling: move to the new subtree with probability
        # min(1, w_subtree / w_old_trajectory), never to a subtree that turned or diverged.
        valid = building & ~subtree.turning & ~subtree.diverging
        take = valid & (uniforms[:, 1] < torch.exp(subtree.log_weight - log_weight))
        proposal = _choose(take, subtree.proposal, proposal)
        log_weight = torch.where(valid, torch.logaddexp(log_weight, subtree.log_weight), log_weight)
        left = select_state(valid & ~going_right, subtree.last, left)
        right = select_state(valid & going_right, subtree.last, right)
        momentum_sum = torch.where(
            valid.unsqueeze(-1), momentum_sum + subtree.momentum_sum, momentum_sum
        )
        turning = is_turning(
            left.velocity, right.velocity, left.momentum, right.momentum, momentum_sum
        )
        building = valid & ~turning

    position, potential_energy, potential_grad, energy = proposal
    info = Info(sum_accept / n_steps, tree_depth, n_steps, diverging, energy)
    return HMCState(position, potential_energy, potential_grad), info
