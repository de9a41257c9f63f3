"""The No-U-Turn Sampler, vectorised over chains that each go at their own pace.

Each transition draws a momentum, then doubles the trajectory in a random direction until the
generalised no-U-turn criterion fails on the whole trajectory or on a subtree, a leapfrog step
diverges, or ``max_tree_depth`` doublings were made. Points are chosen by multinomial sampling:
biased progressive sampling between the old trajectory and each new subtree, uniform
progressive sampling within a subtree (Stan's scheme, Betancourt 2017, appendix A.3).

Subtrees are built iteratively, one leaf at a time, as NumPyro's ``_iterative_build_subtree``
does: the U-turn checks of all sub-subtrees that end at a leaf use checkpoints of the momentum
and of the running momentum sum stored at earlier even-numbered leaves, so a subtree of
``2**d`` leaves keeps only ``d`` checkpoints.

The unit of work is one leaf (:func:`advance`): every chain takes one leapfrog step per call and
does whatever bookkeeping that step ends (a subtree, a transition), with masks instead of
branches, so a call is one fixed graph of tensor operations that can be compiled whole. A chain
whose transition ends starts its next one at the next call, so chains never wait for each
other: over a run each does its own number of leapfrog steps, not the slowest chain's (NumPyro's
vectorised chains, which build their trees in lock-step, wait; Radul et al. 2020 batch NUTS
this way). :func:`step` makes one transition of every chain, for tests and single steps.

Conventions (NumPyro's): ``tree_depth`` counts the doublings made, including a last subtree
that was rejected because it turned or diverged, so ``1 <= tree_depth <= max_tree_depth`` and
``2**(tree_depth - 1) <= n_steps <= 2**tree_depth - 1``. (Stan does not count the rejected last
subtree in ``treedepth__``.) The U-turn criterion is NumPyro's, without the extra checks across
merged subtrees that Stan added in 2.23.

References:
    Hoffman & Gelman (2014), The No-U-Turn Sampler, JMLR 15.
    Betancourt (2017), A Conceptual Introduction to Hamiltonian Monte Carlo, arXiv:1701.02434.
    Radul et al. (2020), Automatically Batching Control-Intensive Programs for Modern
    Accelerators, MLSys.
"""

import functools
import math
from typing import NamedTuple

import torch
from torch import Tensor

from latentkit.inference.kernels.integrators import PhasePoint, leapfrog
from latentkit.inference.kernels.metrics import Metric, kinetic_energy, sample_momentum, velocity
from latentkit.inference.kernels.state import HMCState, Info, PotentialAndGrad, select_where

__all__ = ["MAX_DELTA_ENERGY", "Tree", "advance", "draw_randomness", "is_turning", "start_tree", "step"]

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


class Tree(NamedTuple):
    """Every chain's NUTS transition in progress, between two leapfrog steps.

    A chain's transition builds a trajectory around ``state`` by doublings; the doubling in
    progress builds a subtree of ``2**depth`` leaves one leaf per call of :func:`advance`,
    from ``frontier`` in the direction ``going_right``. Chains are at different places in
    their transitions; each starts its next transition as soon as one ends.

    Attributes:
        state: the chain's current point, where its transition started.
        begin: whether the next call starts a new transition (the last one ended).
        left, right: the trajectory's two ends.
        momentum_sum: the trajectory's summed momenta.
        log_weight: the log of the trajectory's summed weights ``exp(H0 - H)``.
        proposal: the trajectory's current proposal.
        reference_energy: ``H0``, the energy at the start (``-inf`` if not finite).
        depth: doublings made, the current one excluded.
        sum_accept, n_steps, diverging: statistics over all leaves of the transition.
        frontier: the subtree's outermost leaf.
        going_right: the subtree's direction.
        leaf: the index within the subtree of the next leaf.
        sub_momentum_sum, sub_log_weight, sub_proposal: the subtree's own sums and proposal.
        checkpoints: momentum, velocity and momentum sum at the first leaves of the subtree's
            open sub-subtrees, for its U-turn checks (see :func:`_checkpoint_range`).

    Shapes:
        per-chain scalars ``(C,)``; states and sums ``(C, D)``; ``checkpoints``
        ``(3, max(max_tree_depth - 1, 1), C, D)``.
    """

    state: HMCState
    begin: Tensor
    left: PhasePoint
    right: PhasePoint
    momentum_sum: Tensor
    log_weight: Tensor
    proposal: _Proposal
    reference_energy: Tensor
    depth: Tensor
    sum_accept: Tensor
    n_steps: Tensor
    diverging: Tensor
    frontier: PhasePoint
    going_right: Tensor
    leaf: Tensor
    sub_momentum_sum: Tensor
    sub_log_weight: Tensor
    sub_proposal: _Proposal
    checkpoints: Tensor


def start_tree(state: HMCState, max_tree_depth: int) -> Tree:
    """A tree whose chains all begin a transition from ``state`` at the next :func:`advance`.

    Shapes:
        ``state.position``: ``(C, D)``.
    """
    num_chains, dim = state.position.shape
    scalar = torch.zeros_like(state.potential_energy)
    vector = torch.zeros_like(state.position)
    count = torch.zeros(num_chains, dtype=torch.int64, device=state.position.device)
    flag = torch.zeros(num_chains, dtype=torch.bool, device=state.position.device)
    point = PhasePoint(state.position, vector, state.potential_grad)
    proposal = _Proposal(state.position, state.potential_energy, state.potential_grad, scalar)
    checkpoints = vector.expand(3, max(max_tree_depth - 1, 1), num_chains, dim).clone()
    return Tree(state, ~flag, point, point, vector, scalar, proposal, scalar, count, scalar, count, flag,
                point, flag, count, vector, scalar, proposal, checkpoints)


def draw_randomness(generator: torch.Generator, position: Tensor) -> tuple[Tensor, Tensor]:
    """The random numbers one call of :func:`advance` may use: momentum noise ``(C, D)`` and
    uniforms ``(C, 3)`` (direction of a new subtree, merging a subtree, sampling a leaf)."""
    num_chains, dim = position.shape
    options = {"generator": generator, "dtype": position.dtype, "device": position.device}
    return torch.randn(num_chains, dim, **options), torch.rand(num_chains, 3, **options)


@functools.cache
def _leaf_tables(max_tree_depth: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Per leaf index of the largest subtree, over checkpoint slots: which checkpoints the leaf's
    U-turn checks read (odd leaves, :func:`_checkpoint_range`) and which one it stores (even
    leaves), ``(K, 2**(max_tree_depth - 1))`` each; and the subtree sizes ``2**depth`` per depth."""
    slots = max(max_tree_depth - 1, 1)
    reads = torch.zeros(slots, 2 ** (max_tree_depth - 1), dtype=torch.bool)
    stores = torch.zeros_like(reads)
    for leaf in range(reads.shape[1]):
        low, high = _checkpoint_range(leaf)
        if leaf % 2 == 0:
            stores[high, leaf] = True
        else:
            reads[low : high + 1, leaf] = True
    sizes = torch.tensor([2**depth for depth in range(max_tree_depth)], dtype=torch.int64)
    return reads.to(device), stores.to(device), sizes.to(device)


def advance(
    tree: Tree,
    *,
    potential_and_grad: PotentialAndGrad,
    metric: Metric,
    step_size: Tensor,
    noise: Tensor,
    uniforms: Tensor,
    max_tree_depth: int,
) -> tuple[Tree, Tensor, Info]:
    """One leapfrog step of every chain's NUTS transition, with all the tree building it ends.

    A chain that begins a transition draws its momentum from ``noise``; a chain that begins a
    subtree picks its direction with ``uniforms[:, 0]``. Then every chain takes one leapfrog step
    and adds the new leaf to its subtree (uniform progressive sampling with ``uniforms[:, 2]``,
    U-turn checks of the sub-subtrees the leaf closes). A subtree that ends, complete or stopped
    by a U-turn or a divergence, is merged into the trajectory (biased progressive sampling with
    ``uniforms[:, 1]``), and the transition ends when the subtree was stopped, the trajectory
    turns, or ``max_tree_depth`` doublings were made: the chain moves to the proposal.

    Every operation is a tensor operation on all chains (branches are masks): one call is one
    fixed graph, which :func:`~latentkit.inference.kernels.compile.compile_function` compiles.

    Args:
        tree: every chain's transition in progress (:func:`start_tree` for new ones).
        potential_and_grad: the batched potential.
        metric: the per-chain metric; a chain's metric and step size may change only between
            its transitions.
        step_size: the per-chain step size.
        noise, uniforms: from :func:`draw_randomness`.
        max_tree_depth: the most doublings per transition.

    Returns:
        The tree after the step, which chains ended a transition with it (their new point is
        ``tree.state``), and those transitions' statistics (other rows are meaningless).

    Shapes:
        ``step_size``: ``(C,)``; see :class:`Tree`, :func:`draw_randomness` and :class:`Info`.
    """
    begin, state = tree.begin, tree.state
    # Chains that begin a transition: a momentum, a trajectory of the one point ``state``.
    momentum = sample_momentum(metric, noise)
    start = PhasePoint(state.position, momentum, state.potential_grad)
    initial_energy = state.potential_energy + kinetic_energy(momentum, velocity(metric, momentum))
    left = select_where(begin, start, tree.left)
    right = select_where(begin, start, tree.right)
    momentum_sum = torch.where(begin.unsqueeze(-1), momentum, tree.momentum_sum)
    log_weight = torch.where(begin, 0.0, tree.log_weight)
    proposal = select_where(
        begin, _Proposal(state.position, state.potential_energy, state.potential_grad, initial_energy),
        tree.proposal,
    )
    # A chain whose current energy is not finite cannot compare energies: with a reference of
    # -inf every step it takes has an infinite energy error, i.e. diverges, and it stays put.
    reference_energy = torch.where(
        begin, torch.where(torch.isfinite(initial_energy), initial_energy, -math.inf), tree.reference_energy
    )
    depth = torch.where(begin, 0, tree.depth)
    sum_accept = torch.where(begin, 0.0, tree.sum_accept)
    n_steps = torch.where(begin, 0, tree.n_steps)
    diverging = tree.diverging & ~begin

    # Chains that begin a subtree: a direction, the trajectory's end in that direction.
    first = tree.leaf == 0
    going_right = torch.where(first, uniforms[:, 0] < 0.5, tree.going_right)
    frontier = select_where(first, select_where(going_right, right, left), tree.frontier)
    new = leapfrog(potential_and_grad, metric, frontier, torch.where(going_right, step_size, -step_size))
    energy = new.potential_energy + kinetic_energy(new.momentum, new.velocity)
    delta = (energy - reference_energy).nan_to_num(math.inf, posinf=math.inf)

    # Uniform progressive sampling: the new leaf replaces the subtree's proposal with
    # probability w_leaf / (w_subtree + w_leaf).
    take_leaf = first | (uniforms[:, 2] < torch.sigmoid(-delta - tree.sub_log_weight))
    sub_proposal = select_where(
        take_leaf, _Proposal(new.position, new.potential_energy, new.potential_grad, energy), tree.sub_proposal
    )
    sub_log_weight = torch.where(first, -delta, torch.logaddexp(tree.sub_log_weight, -delta))
    sub_momentum_sum = torch.where(first.unsqueeze(-1), new.momentum, tree.sub_momentum_sum + new.momentum)
    sum_accept = sum_accept + torch.exp(-delta).clamp(max=1.0)
    n_steps = n_steps + 1
    leaf_diverging = delta > MAX_DELTA_ENERGY
    diverging = diverging | leaf_diverging

    # Odd leaves close balanced sub-subtrees: check each for a U-turn from the checkpoint at its
    # first leaf. Even leaves store a checkpoint.
    reads_table, stores_table, sizes = _leaf_tables(max_tree_depth, step_size.device)
    ckpt_momentum, ckpt_velocity, ckpt_sum = tree.checkpoints
    turns = is_turning(
        ckpt_velocity, new.velocity, ckpt_momentum, new.momentum, sub_momentum_sum - ckpt_sum + ckpt_momentum
    )
    leaf_turning = (reads_table[:, tree.leaf] & turns).any(0)
    stores = stores_table[:, tree.leaf].unsqueeze(-1)
    checkpoints = torch.where(stores, torch.stack([new.momentum, new.velocity, sub_momentum_sum]).unsqueeze(1),
                              tree.checkpoints)

    # Biased progressive sampling when a subtree ends: move to it with probability
    # min(1, w_subtree / w_old_trajectory), never to a subtree that turned or diverged.
    stopped = leaf_diverging | leaf_turning
    subtree_ends = stopped | (tree.leaf + 1 == sizes[depth])
    valid = subtree_ends & ~stopped
    take = valid & (uniforms[:, 1] < torch.exp(sub_log_weight - log_weight))
    proposal = select_where(take, sub_proposal, proposal)
    log_weight = torch.where(valid, torch.logaddexp(log_weight, sub_log_weight), log_weight)
    point = PhasePoint(new.position, new.momentum, new.potential_grad)
    left = select_where(valid & ~going_right, point, left)
    right = select_where(valid & going_right, point, right)
    momentum_sum = torch.where(valid.unsqueeze(-1), momentum_sum + sub_momentum_sum, momentum_sum)
    turning = is_turning(velocity(metric, left.momentum), velocity(metric, right.momentum), left.momentum,
                         right.momentum, momentum_sum)
    depth = depth + subtree_ends
    ends = subtree_ends & (stopped | turning | (depth >= max_tree_depth))

    state = select_where(ends, HMCState(proposal.position, proposal.potential_energy, proposal.potential_grad), state)
    tree = Tree(
        state, ends, left, right, momentum_sum, log_weight, proposal, reference_energy, depth, sum_accept,
        n_steps, diverging, point, going_right, torch.where(subtree_ends, 0, tree.leaf + 1), sub_momentum_sum,
        sub_log_weight, sub_proposal, checkpoints,
    )
    return tree, ends, Info(sum_accept / n_steps, depth, n_steps, diverging, proposal.energy)


def step(
    generator: torch.Generator,
    state: HMCState,
    *,
    potential_and_grad: PotentialAndGrad,
    metric: Metric,
    step_size: Tensor,
    max_tree_depth: int = 10,
) -> tuple[HMCState, Info]:
    """One NUTS transition of every chain, by :func:`advance` until every chain ended one.

    Chains that end first start their next transition meanwhile, which is discarded: long runs
    use :func:`advance` directly (see :func:`~latentkit.inference.kernels.run_chains`), so that no
    chain waits for another.

    Args:
        generator: the source of all randomness, on the device of ``state``; each call of
            :func:`advance` takes :func:`draw_randomness`'s numbers.
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
    tree = start_tree(state, max_tree_depth)
    ended = torch.zeros_like(tree.begin)
    info = None
    while not bool(ended.all()):
        noise, uniforms = draw_randomness(generator, state.position)
        tree, ends, leaf_info = advance(
            tree, potential_and_grad=potential_and_grad, metric=metric, step_size=step_size, noise=noise,
            uniforms=uniforms, max_tree_depth=max_tree_depth,
        )
        first_end = ends & ~ended
        state = select_where(first_end, tree.state, state)
        info = leaf_info if info is None else select_where(first_end, leaf_info, info)
        ended = ended | ends
    return state, info
