"""Synthetic data generators with known ground truth."""

import numpy as np

__all__ = ["make_gaussian_mixture", "make_markov_chain"]


def make_gaussian_mixture(
    n: int,
    locs: np.ndarray,
    scales: np.ndarray,
    weights: np.ndarray | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``n`` points from a diagonal Gaussian mixture.

    Args:
        n: number of points.
        locs: component means, shape (K, D).
        scales: component standard deviations, shape (K, D).
        weights: mixing weights, shape (K,); uniform when omitted.
        seed: seed of the NumPy generator.

    Returns:
        ``(X, labels)`` with shapes (n, D) and (n,).
    """
    locs, scales = np.asarray(locs, float), np.asarray(scales, float)
    k = locs.shape[0]
    weights = np.full(k, 1.0 / k) if weights is None else np.asarray(weights, float)
    rng = np.random.default_rng(seed)
    labels = rng.choice(k, size=n, p=weights)
    x = locs[labels] + scales[labels] * rng.standard_normal((n, locs.shape[1]))
    return x, labels


def make_markov_chain(
    n_steps: int,
    transition: np.ndarray,
    initial: np.ndarray | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Simulate the states of a Markov chain (e.g. the hidden states of an HMM).

    Args:
        n_steps: length T of the chain.
        transition: (K, K) row-stochastic matrix, row = current state.
        initial: (K,) distribution of the first state; uniform when omitted.
        seed: seed of the NumPy generator.

    Returns:
        states, shape (T,), integers in 0..K-1.

    Example:
        >>> make_markov_chain(5, np.eye(2), np.array([0.0, 1.0])).tolist()
        [1, 1, 1, 1, 1]
    """
    transition = np.asarray(transition, float)
    k = transition.shape[0]
    initial = np.full(k, 1.0 / k) if initial is None else np.asarray(initial, float)
    rng = np.random.default_rng(seed)
    cumulative = np.cumsum(transition, axis=1)
    u = rng.random(n_steps)
    states = np.empty(n_steps, dtype=np.int64)
    states[0] = min(int(np.searchsorted(np.cumsum(initial), u[0], side="right")), k - 1)
    for t in range(1, n_steps):
        states[t] = min(int(np.searchsorted(cumulative[states[t - 1]], u[t], side="right")), k - 1)
    return states
