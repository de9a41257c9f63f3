import torch

from latentkit.inference.kernels.metrics import (
    identity_metric,
    kinetic_energy,
    metric_from_inverse_mass,
    sample_momentum,
    velocity,
)


def test_dense_momentum_has_covariance_mass_matrix(generator):
    inverse_mass = torch.tensor([[2.0, 0.6], [0.6, 0.5]])
    metric = metric_from_inverse_mass(inverse_mass.expand(200_000, 2, 2))
    momentum = sample_momentum(metric, torch.randn(200_000, 2, generator=generator))
    torch.testing.assert_close(
        momentum.T.cov(), torch.linalg.inv(inverse_mass), rtol=0.02, atol=0.02
    )
    torch.testing.assert_close(velocity(metric, momentum)[:3], momentum[:3] @ inverse_mass)


def test_diagonal_momentum_has_variance_inverse_of_inverse_mass(generator):
    metric = metric_from_inverse_mass(torch.tensor([4.0, 0.01]).expand(100_000, 2))
    momentum = sample_momentum(metric, torch.randn(100_000, 2, generator=generator))
    torch.testing.assert_close(momentum.var(0), torch.tensor([0.25, 100.0]), rtol=0.02, atol=0)
    energy = kinetic_energy(momentum, velocity(metric, momentum))
    # K = |noise|^2 / 2 for any metric: E[K] = D / 2.
    assert abs(energy.mean().item() - 1.0) < 0.02


def test_non_positive_definite_chain_falls_back_to_its_diagonal():
    inverse_mass = torch.stack([torch.tensor([[1.0, 2.0], [2.0, 1.0]]), torch.eye(2) * 3.0])
    metric = metric_from_inverse_mass(inverse_mass)
    torch.testing.assert_close(metric.inverse_mass_matrix[0], torch.eye(2))
    torch.testing.assert_close(metric.inverse_mass_matrix[1], torch.eye(2) * 3.0)
    torch.testing.assert_close(metric.momentum_scale[1], torch.eye(2) / 3.0**0.5)


def test_identity_metric_shapes():
    assert identity_metric(torch.zeros(3, 2), dense=False).momentum_scale.shape == (3, 2)
    assert identity_metric(torch.zeros(3, 2), dense=True).momentum_scale.shape == (3, 2, 2)
