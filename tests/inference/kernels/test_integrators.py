import pytest
import torch

from latentkit.inference.kernels.integrators import IntegratorState, leapfrog
from latentkit.inference.kernels.metrics import (
    identity_metric,
    kinetic_energy,
    metric_from_inverse_mass,
    velocity,
)


def standard_normal(position):
    return 0.5 * (position**2).sum(-1), position


def max_energy_error(metric, step_size: float, time: float = 2.0) -> torch.Tensor:
    """Largest |H(t) - H(0)| along a leapfrog trajectory from a fixed point, per chain."""
    position = torch.tensor([[1.0, -0.5, 0.3], [0.2, 0.8, -1.1]])
    momentum = torch.tensor([[0.4, 1.0, -0.7], [-1.2, 0.3, 0.5]])
    state = IntegratorState(
        position, momentum, *standard_normal(position), velocity(metric, momentum)
    )
    initial = state.potential_energy + kinetic_energy(state.momentum, state.velocity)
    error = torch.zeros(2)
    for _ in range(round(time / step_size)):
        state = leapfrog(standard_normal, metric, state, torch.full((2,), step_size))
        energy = state.potential_energy + kinetic_energy(state.momentum, state.velocity)
        error = torch.maximum(error, (energy - initial).abs())
    return error


@pytest.mark.parametrize("dense", [False, True])
def test_energy_error_is_second_order(dense):
    if dense:
        metric = metric_from_inverse_mass(
            torch.tensor([[1.5, 0.3, 0.0], [0.3, 1.0, 0.2], [0.0, 0.2, 0.7]]).expand(2, 3, 3)
        )
    else:
        metric = identity_metric(torch.zeros(2, 3), dense=False)
    coarse = max_energy_error(metric, 0.02)
    fine = max_energy_error(metric, 0.01)
    assert (coarse < 1e-3).all()
    ratio = coarse / fine
    assert ((ratio > 3.6) & (ratio < 4.4)).all(), ratio


def test_leapfrog_is_time_reversible(generator):
    metric = identity_metric(torch.zeros(2, 3), dense=False)
    position = torch.randn(2, 3, generator=generator)
    momentum = torch.randn(2, 3, generator=generator)
    start = IntegratorState(
        position, momentum, *standard_normal(position), velocity(metric, momentum)
    )
    step_size = torch.tensor([0.3, 0.1])
    state = start
    for _ in range(5):
        state = leapfrog(standard_normal, metric, state, step_size)
    for _ in range(5):
        state = leapfrog(standard_normal, metric, state, -step_size)
    torch.testing.assert_close(state.position, start.position)
    torch.testing.assert_close(state.momentum, start.momentum)
