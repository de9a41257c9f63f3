import math

import torch

from latentkit.inference.kernels.state import evaluate_potential, init


def test_evaluate_potential_never_passes_non_finite_positions():
    def strict(position):
        if not torch.isfinite(position).all():
            raise ValueError("a model's support check would raise here")
        return -position.sum(-1), -torch.ones_like(position)

    position = torch.tensor([[1.0, 2.0], [math.nan, 0.0], [math.inf, 1.0]])
    potential, grad = evaluate_potential(strict, position)
    assert potential.tolist() == [-3.0, math.inf, math.inf]
    assert torch.isfinite(grad).all()


def test_evaluate_potential_maps_nan_and_minus_inf_to_plus_inf():
    def broken(position):
        return torch.tensor([math.nan, -math.inf, 1.0]), position

    potential, _ = evaluate_potential(broken, torch.zeros(3, 1))
    assert potential.tolist() == [math.inf, math.inf, 1.0]


def test_init_marks_invalid_starting_points_with_infinite_potential():
    def potential(position):
        return torch.tensor([0.0, math.nan]), position

    state = init(torch.zeros(2, 3), potential)
    assert state.potential_energy.tolist() == [0.0, math.inf]
