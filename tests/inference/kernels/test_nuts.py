import math

import numpy as np
import pytest
import torch

from latentkit.inference.kernels import nuts
from latentkit.inference.kernels.integrators import IntegratorState, leapfrog
from latentkit.inference.kernels.metrics import (
    identity_metric,
    kinetic_energy,
    metric_from_inverse_mass,
    sample_momentum,
    velocity,
)
from latentkit.inference.kernels.nuts import _checkpoint_range, is_turning
from latentkit.inference.kernels.state import init


def test_u_turn_criterion_hand_computed():
    # Three points with momenta r_left = (1, 0), r_mid = (0, 1), r_right = (-2, 0.2) and
    # M^{-1} = diag(1, 2): rho = sum - (r_left + r_right) / 2 = (-1, 1.2) - (-0.5, 0.1)
    # = (-0.5, 1.1); v_left = (1, 0) gives v_left . rho = -0.5 <= 0: turning at the left end,
    # while v_right = (-2, 0.4) gives 1.44 > 0.
    inverse_mass = torch.tensor([1.0, 2.0])
    r_left, r_right = torch.tensor([1.0, 0.0]), torch.tensor([-2.0, 0.2])
    momentum_sum = r_left + torch.tensor([0.0, 1.0]) + r_right
    assert is_turning(inverse_mass * r_left, inverse_mass * r_right, r_left, r_right, momentum_sum)
    # Same ends, middle momentum (1, 1): rho = (0, 2.2) - (-0.5, 0.1) = (0.5, 2.1);
    # v_left . rho = 0.5 > 0 and v_right . rho = -1 + 0.84 = -0.16 <= 0: turning at the right.
    momentum_sum = r_left + torch.tensor([1.0, 1.0]) + r_right
    assert is_turning(inverse_mass * r_left, inverse_mass * r_right, r_left, r_right, momentum_sum)
    # Middle momentum (2, 1): rho = (1.5, 2.1); 1.5 > 0 and -3 + 0.84 = -2.16: still turning.
    # Middle momentum (4, 3): rho = (3.5, 4.1); 3.5 > 0 and -7 + 1.64 < 0: turning.
    # A straight trajectory r = (1, 0) three times: rho = (2, 0), both products 2 > 0.
    r = torch.tensor([1.0, 0.0])
    assert not is_turning(inverse_mass * r, inverse_mass * r, r, r, 3 * r)


def test_u_turn_criterion_uses_the_trapezoidal_momentum_integral():
    # r_left = r_right = (1, 0), r_mid = (-1.2, 0): the plain sum (0.8, 0) would say "not
    # turning", the trapezoidal rho = (0.8, 0) - (1, 0) = (-0.2, 0) says turning.
    r, middle = torch.tensor([[1.0, 0.0]]), torch.tensor([[-1.2, 0.0]])
    assert is_turning(r, r, r, r, 2 * r + middle).item()
    assert not is_turning(r, r, r, r, 2 * r + middle + 0.5 * r).item()


def test_checkpoints_cover_exactly_the_subtrees_a_leaf_closes():
    # Replay the checkpoint writes of a 1024-leaf subtree: at each odd leaf, the checkpoints
    # in range must hold the first leaves of the balanced sub-subtrees the leaf closes.
    assert [_checkpoint_range(n) for n in (6, 7, 13)] == [(3, 2), (0, 2), (2, 2)]  # NumPyro's
    checkpoints: dict[int, int] = {}
    for leaf in range(1024):
        low, high = _checkpoint_range(leaf)
        if leaf % 2 == 0:
            checkpoints[high] = leaf
            continue
        closed = set()
        size = 2
        while leaf % size == size - 1:
            closed.add(leaf - size + 1)
            size *= 2
        assert {checkpoints[i] for i in range(low, high + 1)} == closed


@pytest.mark.parametrize("dense", [False, True])
def test_transitions_leave_the_target_invariant(
    dense, generator, banana, banana_draws, banana_z_scores
):
    # Start 20 000 chains at exact draws of a curved target: after NUTS transitions they must
    # still be exact, independent draws; moments are checked against iid standard errors.
    num_chains = 20_000
    if dense:
        inverse_mass = torch.tensor([[1.0, 0.3], [0.3, 0.5]]).expand(num_chains, 2, 2)
    else:
        inverse_mass = torch.tensor([1.5, 0.5]).expand(num_chains, 2)
    metric = metric_from_inverse_mass(inverse_mass)
    state = init(banana_draws(num_chains, generator), banana)
    for _ in range(2):
        state, info = nuts.step(
            generator,
            state,
            potential_and_grad=banana,
            metric=metric,
            step_size=torch.full((num_chains,), 0.4),
            max_tree_depth=6,
        )
    z = banana_z_scores(state.position)
    assert (np.abs(z) < 5).all(), z
    # E[H] = E[U] + D / 2 = (1/2 + 1/2) + 1 at the selected point.
    energy = info.energy
    assert abs(energy.mean().item() - 2.0) < 5 * energy.std().item() / num_chains**0.5
    assert ((info.acceptance_rate >= 0) & (info.acceptance_rate <= 1)).all()


def test_tree_depth_and_step_count_conventions(generator, gaussian):
    # 2**(depth - 1) <= n_steps <= 2**depth - 1, with some trees cut short inside their last
    # subtree so that the bounds are not trivially met by full trees only.
    num_chains = 64
    target = gaussian(torch.zeros(3), torch.diag(torch.tensor([1.0, 4.0, 0.25])))
    state = init(torch.randn(num_chains, 3, generator=generator), target)
    metric = identity_metric(state.position, dense=False)
    depths, steps = [], []
    for _ in range(20):
        state, info = nuts.step(
            generator,
            state,
            potential_and_grad=target,
            metric=metric,
            step_size=torch.full((num_chains,), 0.25),
        )
        depths.append(info.tree_depth)
        steps.append(info.n_steps)
    depth, n_steps = torch.stack(depths), torch.stack(steps)
    assert (depth >= 1).all()
    assert (n_steps >= 2 ** (depth - 1)).all() and (n_steps <= 2**depth - 1).all()
    assert (n_steps < 2**depth - 1).any()
    assert len(depth.unique()) >= 3


def test_max_tree_depth_is_respected(generator, gaussian):
    # sd 100 against step size 0.01: no U-turn within 7 steps, every tree stops at depth 3.
    target = gaussian(torch.zeros(2), torch.diag(torch.tensor([1e4, 1e4])))
    state = init(torch.zeros(8, 2), target)
    metric = identity_metric(state.position, dense=False)
    for _ in range(5):
        state, info = nuts.step(
            generator,
            state,
            potential_and_grad=target,
            metric=metric,
            step_size=torch.full((8,), 0.01),
            max_tree_depth=3,
        )
        assert (info.tree_depth == 3).all()
        assert (info.n_steps == 7).all()


def test_chain_at_an_invalid_point_stays_put_and_others_move(generator):
    def potential(position):
        energy = 0.5 * (position**2).sum(-1)
        return torch.where(position[:, 0] > 5, math.nan, energy), position

    start = torch.tensor([[0.5, 0.5], [6.0, 0.0], [-0.5, 1.0]])
    state = init(start, potential)
    metric = identity_metric(start, dense=False)
    state, info = nuts.step(
        generator,
        state,
        potential_and_grad=potential,
        metric=metric,
        step_size=torch.full((3,), 0.5),
    )
    assert torch.equal(state.position[1], start[1])
    assert info.diverging.tolist() == [False, True, False]
    assert info.n_steps[1] == 1 and info.acceptance_rate[1] == 0
    assert not torch.equal(state.position[[0, 2]], start[[0, 2]])
    assert torch.isfinite(state.position).all()
    assert torch.isfinite(info.acceptance_rate).all()


def test_same_seed_same_transition(gaussian):
    target = gaussian(torch.zeros(2), torch.eye(2))
    results = []
    for seed in (3, 3, 4):
        generator = torch.Generator().manual_seed(seed)
        state = init(torch.zeros(4, 2), target)
        metric = identity_metric(state.position, dense=True)
        state, info = nuts.step(
            generator,
            state,
            potential_and_grad=target,
            metric=metric,
            step_size=torch.full((4,), 0.3),
        )
        results.append(state.position)
    assert torch.equal(results[0], results[1])
    assert not torch.equal(results[0], results[2])


def reference_tree_size(
    potential, metric, position, momentum, step_size, directions, max_tree_depth
):
    """Tree depth, leapfrog steps and divergence of one NUTS trajectory, by brute force.

    Keeps the whole trajectory as a list and re-checks every balanced sub-subtree a new leaf
    closes with momentum sums recomputed from scratch, as the recursive algorithm defines it.
    """

    def turning(points):
        total = sum(point.momentum for point in points)
        ends = points[0], points[-1]
        return bool(
            is_turning(
                ends[0].velocity, ends[1].velocity, ends[0].momentum, ends[1].momentum, total
            )
        )

    start = IntegratorState(position, momentum, *potential(position), velocity(metric, momentum))
    initial_energy = start.potential_energy + kinetic_energy(momentum, start.velocity)
    trajectory, n_steps = [start], 0
    for depth in range(max_tree_depth):
        right = bool(directions[depth])
        point = trajectory[-1] if right else trajectory[0]
        subtree = []
        for leaf in range(2**depth):
            point = leapfrog(potential, metric, point, step_size if right else -step_size)
            n_steps += 1
            subtree.append(point)
            energy = point.potential_energy + kinetic_energy(point.momentum, point.velocity)
            if not energy - initial_energy <= nuts.MAX_DELTA_ENERGY:
                return depth + 1, n_steps, True
            size = 2
            while (leaf + 1) % size == 0:
                if turning(subtree[leaf + 1 - size : leaf + 1]):
                    return depth + 1, n_steps, False
                size *= 2
        trajectory = trajectory + subtree if right else subtree[::-1] + trajectory
        if turning(trajectory):
            return depth + 1, n_steps, False
    return max_tree_depth, n_steps, False


@pytest.mark.parametrize("dense", [False, True])
def test_tree_building_matches_brute_force_reference(dense, banana):
    # One chain at a time, so that the direction of each doubling can be replayed from the
    # generator: each leapfrog step (call of nuts.advance) draws a (1, 2) noise and (1, 3)
    # uniforms; the first noise is the momentum, and doubling d starts at step 2**d - 1, whose
    # first uniform picks the direction.
    if dense:
        metric = metric_from_inverse_mass(torch.tensor([[[1.0, 0.3], [0.3, 0.5]]]))
    else:
        metric = metric_from_inverse_mass(torch.tensor([[1.5, 0.5]]))
    draws = torch.Generator().manual_seed(1)
    outcomes = set()
    for seed in range(60):
        position = torch.randn(1, 2, generator=draws, dtype=torch.float64)
        step_size = torch.rand(1, generator=draws, dtype=torch.float64) * 0.9 + 0.05
        state = init(position, banana)
        _, info = nuts.step(
            torch.Generator().manual_seed(seed),
            state,
            potential_and_grad=banana,
            metric=metric,
            step_size=step_size,
            max_tree_depth=6,
        )
        replay = torch.Generator().manual_seed(seed)
        draws_per_step = [nuts.draw_randomness(replay, position) for _ in range(2**6 - 1)]
        momentum = sample_momentum(metric, draws_per_step[0][0])
        directions = [draws_per_step[2**d - 1][1][0, 0] < 0.5 for d in range(6)]
        expected = reference_tree_size(banana, metric, position, momentum, step_size, directions, 6)
        actual = (int(info.tree_depth), int(info.n_steps), bool(info.diverging))
        assert actual == expected, f"case {seed}"
        outcomes.add(expected[0])
    assert len(outcomes) >= 3
