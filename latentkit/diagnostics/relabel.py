"""Label switching: make exchangeable component labels consistent across draws and chains.

Pivot-based relabelling (Marin, Mengersen and Robert 2005): every draw's components are matched
to a pivot by the Hungarian algorithm (SciPy's ``linear_sum_assignment``) on the squared
distance between standardised component parameters; the pivot is then refined as the mean of the
relabelled draws. ArviZ has no relabelling, so this is written here.
"""

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from latentkit.errors import ConfigError
from latentkit.inference.result import Result

__all__ = ["relabel", "relabel_result", "match_permutations"]

Arrays = dict[str, np.ndarray]


def match_permutations(features: np.ndarray, pivot: np.ndarray | int | None = None,
                       num_refinements: int = 2) -> np.ndarray:
    """Permutation of each draw's components that best matches a pivot.

    Args:
        features: ``(chain, draw, K, F)`` component features (e.g. flattened locations).
        pivot: ``(K, F)`` reference components; an int picks that (flattened) draw; None uses
            the mean of the first chain (labels rarely switch within an MCMC chain).
        num_refinements: times the pivot is replaced by the mean of the relabelled draws and
            the matching repeated.

    Returns:
        ``perms`` of shape ``(chain, draw, K)``: new label ``j`` of a draw is its old component
        ``perms[..., j]``.
    """
    C, S, K, F = features.shape
    flat = features.reshape(C * S, K, F).astype(float)
    scale = flat.reshape(-1, F).std(0) + 1e-12
    if pivot is None:
        reference = flat[:S].mean(0)
    elif isinstance(pivot, (int, np.integer)):
        reference = flat[int(pivot)]
    else:
        reference = np.asarray(pivot, dtype=float).reshape(K, F)
    perms = np.tile(np.arange(K), (C * S, 1))
    for _ in range(num_refinements + 1):
        cost = (((flat[:, :, None, :] - reference[None, None, :, :]) / scale) ** 2).sum(-1)  # (n, old, new)
        for i in range(C * S):
            rows, cols = linear_sum_assignment(cost[i])
            perms[i, cols] = rows
        reference = np.take_along_axis(flat, perms[:, :, None], axis=1).mean(0)
    return perms.reshape(C, S, K)


def relabel(
    posterior: Mapping[str, np.ndarray],
    by: str | Sequence[str],
    *,
    permute: Mapping[str, int | Sequence[int]] | None = None,
    labels: Sequence[str] = (),
    pivot: np.ndarray | int | None = None,
) -> tuple[Arrays, np.ndarray]:
    """Relabel exchangeable components of every draw to match a pivot.

    Args:
        posterior: draws ``{site: (chain, draw, ...)}``.
        by: site(s) whose components are matched, with the component axis first after
            ``(chain, draw)`` (e.g. ``"locs"`` of shape ``(chain, draw, K, D)``).
        permute: sites to reorder and their component axes (counted after chain and draw), e.g.
            ``{"weights": 0, "transition": (0, 1)}``; by default the ``by`` sites on axis 0.
        labels: integer sites holding component labels (``assignment``, ``states``), mapped
            through the same permutation.
        pivot: see :func:`match_permutations`; a ``(K, F)`` array holds the ``by`` sites'
            components flattened and concatenated in order.

    Returns:
        The relabelled posterior (other sites unchanged) and the permutations ``(chain, draw, K)``.

    Example:
        >>> locs = np.array([[[[0.0], [5.0]], [[5.0], [0.0]]]])  # two draws, labels swapped
        >>> out, perms = relabel({"locs": locs}, "locs", pivot=np.array([[0.0], [5.0]]))
        >>> out["locs"][0, :, :, 0].tolist()
        [[0.0, 5.0], [0.0, 5.0]]
    """
    names = [by] if isinstance(by, str) else list(by)
    missing = [n for n in [*names, *(permute or {}), *labels] if n not in posterior]
    if missing:
        raise ConfigError(f"relabel: no posterior sites {missing}; it has {sorted(posterior)}.")
    C, S, K = posterior[names[0]].shape[:3]
    features = np.concatenate([posterior[n].reshape(C, S, K, -1) for n in names], axis=-1)
    perms = match_permutations(features, pivot)
    out = dict(posterior)
    for name, axes in (permute or {n: 0 for n in names}).items():
        array = out[name]
        for axis in ([axes] if isinstance(axes, (int, np.integer)) else axes):
            position = 2 + int(axis)
            index = perms.reshape((C, S) + (1,) * (position - 2) + (K,) + (1,) * (array.ndim - position - 1))
            array = np.take_along_axis(array, index, axis=position)
        out[name] = array
    inverse = np.argsort(perms, axis=-1)  # old label -> new label
    for name in labels:
        flat = out[name].reshape(C, S, -1)
        out[name] = np.take_along_axis(inverse, flat, axis=-1).reshape(out[name].shape)
    return out, perms


def relabel_result(result: Result, by: str | Sequence[str], **kwargs: object) -> Result:
    """A copy of ``result`` with its posterior relabelled by :func:`relabel` (same arguments).

    Only the posterior changes; log-likelihoods and predictive draws do not depend on labels.
    """
    posterior, _ = relabel(result.posterior, by, **kwargs)  # type: ignore[arg-type]
    return dataclasses.replace(result, posterior=posterior)
