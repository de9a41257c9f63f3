import math

import numpy as np
import pytest
import torch

from latentkit.inference.kernels import hmc
from latentkit.inference.kernels.metrics import identity_metric, metric_from_inverse_mass
from latentkit.inference.kernels.state import init


@pytest.mark.parametrize("dense", [False, True])
def test_transitions_leave_the_target_invariant(
    dense, generator, banana, banana_draws, banana_z_scores
):
    # Exact draws stay exact draws; per-chain numbers of steps exercise the masking.
    num_chains = 20_000
    if dense:
        inverse_mass = torch.tensor([[1.0, 0.3], [0.3, 0.5]]).expand(num_chains, 2, 2)
    else:
        inverse_mass = torch.tensor([1.5, 0.5]).expand(num_chains, 2)
    metric = metric_from_inverse_mass(inverse_mass)
    state = init(banana_draws(num_chains, generator), banana)
    num_steps = torch.randint(1, 8, (num_chains,), generator=generator)
    for _ in range(2):
        state, info = hmc.step(
            generator,
            state,
            potential_and_grad=banana,
            metric=metric,
            step_size=torch.full((num_chains,), 0.4),
            num_steps=num_steps,
        )
    z = banana_z_scores(state.position)
    assert (np.abs(z) < 5).all(), z
    assert torch.equal(info.n_steps, num_steps)
    energy = info.energy
    assert abs(energy.mean().item() - 2.0) < 5 * energy.std().item() / num_chains**0.5


def test_divergent_trajectories_are_rejected_without_touching_other_chains(generator):
    # A box |x| <= 1 outside which the potential is +inf (chain 0) or NaN (chain 1); a step
    # size of 1000 leaves it at once. Chain 2 takes small steps inside.
    def potential(position):
        energy = 0.5 * (position**2).sum(-1)
        outside = (position.abs() > 1).any(-1)
        invalid = torch.tensor([math.inf, math.nan, math.inf])
        return torch.where(outside, invalid, energy), position

    start = torch.full((3, 2), 0.5)
    metric = identity_metric(start, dense=False)
    state, info = hmc.step(
        generator,
        init(start, potential),
        potential_and_grad=potential,
        metric=metric,
        step_size=torch.tensor([1e3, 1e3, 0.1]),
        num_steps=3,
    )
    assert info.diverging.tolist() == [True, True, False]
    assert info.acceptance_rate[:2].tolist() == [0.0, 0.0]
    assert torch.equal(state.position[:2], start[:2])
    assert not torch.equal(state.position[2], start[2])
    assert torch.isfinite(state.potential_energy).all() and torch.isfinite(info.energy).all()
    assert info.tree_depth.tolist() == [0, 0, 0]
