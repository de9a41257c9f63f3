"""Bayesian Gaussian mixture with full or diagonal covariances."""

from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import torch
from pyro.ops.indexing import Vindex
from scipy.cluster.vq import kmeans2

from latentkit.data import as_matrix
from latentkit.diagnostics.relabel import relabel
from latentkit.errors import ConfigError, DataError
from latentkit.models.base import LatentModel

__all__ = ["GaussianMixture"]


class GaussianMixture(LatentModel):
    r"""Mixture of K multivariate Gaussians, with weakly informative priors scaled to the data.

    Sites (stable names):
        ``weights`` (K,) ~ Dirichlet(``concentration`` * 1),
        ``locs`` (K, D) ~ Normal(mean(X), 2 sd(X)) per coordinate,
        ``scales`` (K, D) ~ LogNormal(log(sd(X) / 2), 1) per coordinate (95% prior mass
        between 0.07 and 3.7 times the data's sd, which keeps MAP fits away from collapsed
        components),
        for ``covariance="full"`` also ``corr_cholesky`` (K, D, D) ~ LKJCholesky(D, 2) and the
        deterministic ``scale_tril`` (K, D, D) = diag(scales) @ corr_cholesky,
        ``assignment`` (N,) ~ Categorical(weights), enumerated (summed out) during fitting and
        recovered afterwards with ``infer_discrete``,
        observed ``obs`` (N, D).

    Here mean(X) and sd(X) are the per-column mean and standard deviation of the data.
    Component labels are made consistent across draws and chains after fitting by matching
    each draw's ``locs`` to a pivot (the Hungarian algorithm, see
    :func:`latentkit.diagnostics.relabel`), so that R-hat and summaries are about the same
    component; ``relabel=False`` keeps the labels as sampled.

    Args:
        n_components: K >= 1.
        covariance: ``"full"`` or ``"diag"``.
        concentration: Dirichlet concentration of the weights' prior.
        relabel: relabel components after fitting (default); False keeps the sampled labels.

    Shapes:
        data: (N, D) array or DataFrame of numeric columns.

    Example:
        >>> gmm = GaussianMixture(n_components=2, covariance="diag")
        >>> sorted(gmm.prepare(np.eye(3)))
        ['X', 'loc_center', 'loc_scale', 'scale_center', 'subsample_size']
    """

    def __init__(self, n_components: int = 2, covariance: Literal["full", "diag"] = "full",
                 concentration: float = 1.0, relabel: bool = True) -> None:
        super().__init__()
        if not isinstance(n_components, (int, np.integer)) or isinstance(n_components, bool) or n_components < 1:
            raise ConfigError(f"n_components: must be an integer >= 1, got {n_components!r}.")
        if covariance not in ("full", "diag"):
            raise ConfigError(f"covariance: must be 'full' or 'diag', got {covariance!r}.")
        if not concentration > 0:
            raise ConfigError(f"concentration: must be positive, got {concentration!r}.")
        self.n_components = int(n_components)
        self.covariance = covariance
        self.concentration = float(concentration)
        self.relabel_draws = bool(relabel)
        self.init_args = {"n_components": self.n_components, "covariance": covariance,
                          "concentration": self.concentration, "relabel": self.relabel_draws}

    # -- data ---------------------------------------------------------------------------------
    def prepare(self, data: Any) -> dict[str, Any]:
        X = as_matrix(data, "data")
        if X.shape[0] < self.n_components:
            raise DataError(
                f"n_components: {self.n_components} components need at least as many points, "
                f"but data has {X.shape[0]} rows; lower n_components or pass more data."
            )
        sd = X.std(0) if X.shape[0] > 1 else torch.ones(X.shape[1], dtype=X.dtype)
        sd = torch.where(sd > 0, sd, torch.ones_like(sd))
        return {"X": X, "loc_center": X.mean(0), "loc_scale": 2 * sd, "scale_center": sd / 2,
                "subsample_size": None}

    def coords(self, data: Any) -> dict[str, list[Any]]:
        coords: dict[str, list[Any]] = {"component": list(range(self.n_components))}
        if isinstance(data, pd.DataFrame):
            coords["feature"] = [str(c) for c in data.columns]
            coords["feature_"] = list(coords["feature"])
        return coords

    def dims(self, kwargs: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
        return {
            "weights": ("component",),
            "locs": ("component", "feature"),
            "scales": ("component", "feature"),
            "corr_cholesky": ("component", "feature", "feature_"),
            "scale_tril": ("component", "feature", "feature_"),
            "assignment": ("obs_id",),
            "obs": ("obs_id", "feature"),
        }

    # -- model --------------------------------------------------------------------------------
    def model(self, X: torch.Tensor | None, loc_center: torch.Tensor, loc_scale: torch.Tensor,
              scale_center: torch.Tensor, subsample_size: int | None = None,
              num_points: int | None = None) -> None:
        """The Pyro model. ``X`` may be None with ``num_points`` given, to simulate data."""
        K, D = self.n_components, loc_center.shape[-1]
        N = X.shape[0] if X is not None else int(num_points or 1)
        weights = pyro.sample("weights", dist.Dirichlet(
            torch.full((K,), self.concentration, dtype=loc_center.dtype, device=loc_center.device)))
        locs = pyro.sample("locs", dist.Normal(loc_center, loc_scale).expand([K, D]).to_event(2))
        scales = pyro.sample("scales", dist.LogNormal(scale_center.log(), 1.0).expand([K, D]).to_event(2))
        if self.covariance == "full":
            corr = pyro.sample("corr_cholesky", dist.LKJCholesky(D, 2.0).expand([K]).to_event(1))
            scale_tril = pyro.deterministic("scale_tril", scales.unsqueeze(-1) * corr, event_dim=3)
        with pyro.plate("data", N, subsample_size=subsample_size) as index:
            assignment = pyro.sample("assignment", dist.Categorical(weights),
                                     infer={"enumerate": "parallel"})
            x = X[index] if X is not None else None
            loc = Vindex(locs)[..., assignment, :]
            if self.covariance == "full":
                component = dist.MultivariateNormal(loc, scale_tril=Vindex(scale_tril)[..., assignment, :, :])
            else:
                component = dist.Normal(loc, Vindex(scales)[..., assignment, :]).to_event(1)
            pyro.sample("obs", component, obs=x)

    # -- robust starting points and relabelling --------------------------------------------------
    def initial_values(self, kwargs: Mapping[str, Any], seed: int) -> dict[str, torch.Tensor]:
        """k-means++ centres (SciPy's ``kmeans2``, best of 10 restarts as scikit-learn's
        ``n_init``) with per-cluster spreads and sizes.

        Random data-point starts end in poor optima noticeably often; k-means starts do not.
        """
        X = kwargs["X"]
        K = self.n_components
        x = X.detach().cpu().double().numpy()
        z = (x - x.mean(0)) / (x.std(0) + 1e-12)
        best = None
        for restart in range(10):
            centres, labels = kmeans2(z, K, minit="++", seed=seed * 10 + restart)
            inertia = ((z - centres[labels]) ** 2).sum()
            if best is None or inertia < best[0]:
                best = (inertia, labels)
        labels = best[1]
        centres = np.stack([x[labels == k].mean(0) if (labels == k).any() else x.mean(0)
                            for k in range(K)])
        counts = np.bincount(labels, minlength=K).astype(float)
        floor = kwargs["scale_center"].detach().cpu().double().numpy() / 4
        spreads = np.stack([x[labels == k].std(0) if counts[k] > 1 else floor * 2 for k in range(K)])
        spreads = np.maximum(spreads, floor)
        as_tensor = lambda a: torch.as_tensor(a, dtype=X.dtype, device=X.device)  # noqa: E731
        values = {
            "weights": as_tensor((counts + 1) / (counts + 1).sum()),
            "locs": as_tensor(centres),
            "scales": as_tensor(spreads),
        }
        if self.covariance == "full":
            D = x.shape[1]
            values["corr_cholesky"] = torch.eye(D, dtype=X.dtype, device=X.device).expand(K, D, D).clone()
        return values

    def relabel(self, posterior: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Permute component labels of each draw to best match a pivot.

        The pivot is the mean of ``locs`` over the first chain's draws, refined twice with the
        relabelled draws; the cost of a match is the squared distance between standardised
        component means. ``assignment`` values are mapped through the same permutations.
        """
        if self.n_components == 1 or "locs" not in posterior or not self.relabel_draws:
            return posterior
        sites = ("weights", "locs", "scales", "corr_cholesky", "scale_tril")
        out, _ = relabel(posterior, "locs", permute={k: 0 for k in sites if k in posterior},
                         labels=[k for k in ("assignment",) if k in posterior])
        return out

    # -- new data -----------------------------------------------------------------------------------
    def sample(self, n: int, result: Any = None, seed: int = 0) -> np.ndarray:
        """Draw ``n`` new points, shape (n, D).

        With a fitted ``result`` each point comes from the mixture at an independently chosen
        posterior draw (the posterior predictive for new points); without one, the parameters
        must be given by a result.
        """
        if result is None:
            raise ConfigError("result: pass the fitted result, e.g. gmm.sample(n, result=res).")
        if not isinstance(n, int) or n < 1:
            raise ConfigError(f"n: must be a positive integer, got {n!r}.")
        rng = np.random.default_rng(seed)
        post = result.posterior
        C, S = post["weights"].shape[:2]
        pick = rng.integers(C * S, size=n)
        weights = post["weights"].reshape(C * S, -1)[pick]
        locs = post["locs"].reshape((C * S,) + post["locs"].shape[2:])[pick]
        labels = (rng.random((n, 1)) > np.cumsum(weights, 1)).sum(1).clip(max=self.n_components - 1)
        loc = locs[np.arange(n), labels]
        z = rng.standard_normal(loc.shape)
        if self.covariance == "full":
            tril = post["scale_tril"].reshape((C * S,) + post["scale_tril"].shape[2:])[pick]
            return loc + np.einsum("nij,nj->ni", tril[np.arange(n), labels], z)
        scales = post["scales"].reshape((C * S,) + post["scales"].shape[2:])[pick]
        return loc + scales[np.arange(n), labels] * z
