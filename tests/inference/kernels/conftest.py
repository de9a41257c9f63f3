"""Targets and checks shared by the kernel tests; one thread, to leave a core free."""

from collections.abc import Callable

import arviz as az
import numpy as np
import pytest
import torch
from torch import Tensor

torch.set_num_threads(1)


class Gaussian:
    """The potential of ``N(mean, covariance)``, with one mean and covariance per chain.

    Shapes:
        ``mean``: ``(C, D)`` or ``(D,)``; ``covariance``: ``(C, D, D)`` or ``(D, D)``.
    """

    def __init__(self, mean: Tensor, covariance: Tensor) -> None:
        self.mean = mean
        self.covariance = covariance
        self.precision = torch.linalg.inv(covariance)

    def __call__(self, position: Tensor) -> tuple[Tensor, Tensor]:
        grad = ((position - self.mean).unsqueeze(-2) @ self.precision).squeeze(-2)
        return 0.5 * (grad * (position - self.mean)).sum(-1), grad


def check_moments(
    draws: Tensor,
    mean: Tensor,
    variance: Tensor,
    *,
    min_ess: float,
    max_rhat: float | None = 1.01,
) -> None:
    """Require a minimum bulk ESS, a small R-hat, and mean and variance within 5 MCSE.

    R-hat is skipped with ``max_rhat=None`` (single chains, or chains with different targets).

    The variance is checked as the mean of ``(x - true_mean)^2``, whose MCSE ArviZ estimates
    from the same draws.

    Shapes:
        ``draws``: ``(chain, draw, D)``; ``mean``, ``variance``: ``(D,)``.
    """
    x = draws.double().cpu().numpy()
    for d in range(x.shape[-1]):
        coordinate = x[..., d]
        squared = (coordinate - float(mean[d])) ** 2
        ess = az.ess(coordinate)
        assert ess > min_ess, f"coordinate {d}: bulk ESS {ess:.0f} <= {min_ess}"
        if max_rhat is not None:
            rhat = az.rhat(coordinate)
            assert rhat < max_rhat, f"coordinate {d}: R-hat {rhat:.4f}"
        for name, values, truth in (
            ("mean", coordinate, mean[d]),
            ("variance", squared, variance[d]),
        ):
            error = abs(values.mean() - float(truth))
            mcse = az.mcse(values)
            assert error < 5 * mcse, f"coordinate {d} {name}: error {error:.4g} >= 5 * {mcse:.4g}"


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.fixture
def gaussian() -> type[Gaussian]:
    return Gaussian


@pytest.fixture
def moments() -> Callable[..., None]:
    return check_moments


def banana_potential(position: Tensor) -> tuple[Tensor, Tensor]:
    """``x ~ N(0, 1)``, ``y | x ~ N(x^2 / 2, 0.5^2)``: curved, not Gaussian."""
    x, y = position[:, 0], position[:, 1]
    deviation = y - 0.5 * x**2
    potential = 0.5 * x**2 + 2.0 * deviation**2
    return potential, torch.stack([x - 4.0 * deviation * x, 4.0 * deviation], -1)


@pytest.fixture
def banana() -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    return banana_potential


@pytest.fixture
def banana_draws() -> Callable[[int, torch.Generator], Tensor]:
    """Exact independent draws from :func:`banana_potential`."""

    def draw(num: int, generator: torch.Generator) -> Tensor:
        x = torch.randn(num, generator=generator, dtype=torch.float64)
        y = 0.5 * x**2 + 0.5 * torch.randn(num, generator=generator, dtype=torch.float64)
        return torch.stack([x, y], -1)

    return draw


def iid_z_scores(position: Tensor) -> np.ndarray:
    """z-scores of E[x], E[x^2] - 1, E[r], E[r^2] - 1 with r = (y - x^2/2) / 0.5, iid draws."""
    x, y = position[:, 0].numpy(), position[:, 1].numpy()
    r = (y - 0.5 * x**2) / 0.5
    values = np.stack([x, x**2 - 1, r, r**2 - 1])
    return values.mean(1) / values.std(1) * np.sqrt(values.shape[1])


@pytest.fixture
def banana_z_scores() -> Callable[[Tensor], np.ndarray]:
    return iid_z_scores
