"""Shared test set-up: float64, a fixed seed per test, one thread per process."""

import numpy as np
import pyro
import pytest
import torch

torch.set_num_threads(1)
torch.set_default_dtype(torch.float64)  # for module-scoped fixtures too


@pytest.fixture(autouse=True)
def _fixed_seed():
    pyro.set_rng_seed(0)
    pyro.clear_param_store()


@pytest.fixture(scope="session")
def three_blobs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """500 points from a well-separated 3-component 2-D mixture: (X, labels, true locs)."""
    from latentkit.datasets import make_gaussian_mixture

    locs = np.array([[-4.0, 0.0], [0.0, 3.0], [4.0, 0.0]])
    scales = np.array([[0.7, 0.7], [0.5, 1.0], [1.0, 0.5]])
    X, labels = make_gaussian_mixture(500, locs, scales, seed=1)
    return X, labels, locs
