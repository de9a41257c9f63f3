"""Synthetic data generators with known ground truth."""

import numpy as np

__all__ = ["make_gaussian_mixture"]


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
