"""Euclidean metrics: momentum draws, velocities and kinetic energy for a diagonal or dense mass.

The kinetic energy is ``K(r) = r^T M^{-1} r / 2`` and momenta are drawn from ``N(0, M)``. Every
chain has its own inverse mass matrix ``M^{-1}``, either diagonal, stored as ``(C, D)``, or
dense, stored as ``(C, D, D)``; functions dispatch on that number of dimensions.
"""

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "Metric",
    "identity_metric",
    "kinetic_energy",
    "metric_from_inverse_mass",
    "sample_momentum",
    "velocity",
]


class Metric(NamedTuple):
    """A per-chain Euclidean metric.

    Attributes:
        inverse_mass_matrix: ``M^{-1}``, the (co)variance the metric is tuned to.
        momentum_scale: a square root of ``M`` that maps standard normal noise to momenta:
            ``1 / sqrt(M^{-1})`` if diagonal, ``L^{-T}`` with ``L L^T = M^{-1}`` if dense.

    Shapes:
        both fields are ``(C, D)`` (diagonal) or ``(C, D, D)`` (dense).
    """

    inverse_mass_matrix: Tensor
    momentum_scale: Tensor


def identity_metric(position: Tensor, *, dense: bool) -> Metric:
    """The unit metric, shaped for ``position``'s chains.

    Args:
        position: any positions of the chains, for shape, dtype and device.
        dense: whether to store dense ``(C, D, D)`` matrices instead of diagonals.

    Shapes:
        ``position``: ``(C, D)``.

    Example:
        >>> identity_metric(torch.zeros(3, 2), dense=True).inverse_mass_matrix.shape
        torch.Size([3, 2, 2])
    """
    ones = torch.ones_like(position)
    if dense:
        eye = torch.diag_embed(ones)
        return Metric(eye, eye.clone())
    return Metric(ones, ones.clone())


def metric_from_inverse_mass(inverse_mass_matrix: Tensor) -> Metric:
    """Build a metric from ``M^{-1}``, typically an estimate of the posterior (co)variance.

    A dense matrix whose Cholesky factorisation fails for a chain (not positive definite in
    floating point) falls back to its diagonal for that chain, so that one bad chain never stops
    the others.

    Args:
        inverse_mass_matrix: ``M^{-1}``, positive diagonals or symmetric positive definite.

    Shapes:
        ``inverse_mass_matrix``: ``(C, D)`` or ``(C, D, D)``.

    Example:
        >>> metric = metric_from_inverse_mass(torch.tensor([[4.0, 0.25]]))
        >>> metric.momentum_scale
        tensor([[0.5000, 2.0000]])
    """
    if inverse_mass_matrix.dim() == 2:
        return Metric(inverse_mass_matrix, torch.rsqrt(inverse_mass_matrix))
    cholesky, failed = torch.linalg.cholesky_ex(inverse_mass_matrix)
    failed = (failed != 0)[:, None, None]
    diagonal = torch.diag_embed(torch.diagonal(inverse_mass_matrix, dim1=-2, dim2=-1))
    inverse_mass_matrix = torch.where(failed, diagonal, inverse_mass_matrix)
    cholesky = torch.where(failed, diagonal.sqrt(), cholesky)
    eye = torch.eye(cholesky.shape[-1], dtype=cholesky.dtype, device=cholesky.device)
    cholesky_inverse = torch.linalg.solve_triangular(cholesky, eye.expand_as(cholesky), upper=False)
    return Metric(inverse_mass_matrix, cholesky_inverse.mT)


def sample_momentum(metric: Metric, noise: Tensor) -> Tensor:
    """Map standard normal ``noise`` to momenta ``r ~ N(0, M)``.

    Shapes:
        ``noise``: ``(C, D)``; returns ``(C, D)``.

    Example:
        >>> sample_momentum(metric_from_inverse_mass(torch.tensor([[4.0]])), torch.ones(1, 1))
        tensor([[0.5000]])
    """
    if metric.momentum_scale.dim() == 2:
        return metric.momentum_scale * noise
    return (metric.momentum_scale @ noise.unsqueeze(-1)).squeeze(-1)


def velocity(metric: Metric, momentum: Tensor) -> Tensor:
    """The velocity ``M^{-1} r``, the gradient of the kinetic energy.

    Shapes:
        ``momentum``: ``(C, D)``; returns ``(C, D)``.

    Example:
        >>> velocity(identity_metric(torch.zeros(1, 2), dense=True), torch.tensor([[1.0, 2.0]]))
        tensor([[1., 2.]])
    """
    if metric.inverse_mass_matrix.dim() == 2:
        return metric.inverse_mass_matrix * momentum
    return (metric.inverse_mass_matrix @ momentum.unsqueeze(-1)).squeeze(-1)


def kinetic_energy(momentum: Tensor, velocity: Tensor) -> Tensor:
    """``K = r . v / 2`` from a momentum and its velocity ``v = M^{-1} r``.

    Shapes:
        ``momentum``, ``velocity``: ``(C, D)``; returns ``(C,)``.

    Example:
        >>> kinetic_energy(torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 2.0]]))
        tensor([2.5000])
    """
    return 0.5 * torch.linalg.vecdot(momentum, velocity)
