"""Bayesian hidden Markov models with Gaussian, categorical and Poisson emissions.

The hidden states are summed out exactly inside the likelihood (:class:`~latentkit.models.hmm_ops.HMMSequence`, the
forward algorithm), so every engine fits the continuous parameters only; state paths are
recovered afterwards by forward filtering, backward sampling, and :meth:`decode`,
:meth:`smooth`, :meth:`filter`, :meth:`forecast` and :meth:`sample` work from any result.
"""

import warnings
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from scipy.cluster.vq import kmeans2

from latentkit.errors import ConfigError, DataError
from latentkit.models.hmm_base import Forecast, HiddenMarkovModel, check_count

__all__ = ["GaussianHMM", "CategoricalHMM", "PoissonHMM", "Forecast"]


def _kmeans(z: np.ndarray, K: int, seed: int, restarts: int = 10) -> np.ndarray:
    """k-means++ labels of the rows of z, best of ``restarts`` (scikit-learn's ``n_init``)."""
    best = None
    for restart in range(restarts):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SciPy warns when a cluster ends empty; it is refilled below
            centres, labels = kmeans2(z, K, minit="++", seed=seed * restarts + restart)
        inertia = ((z - centres[labels]) ** 2).sum()
        if best is None or inertia < best[0]:
            best = (inertia, labels)
    return best[1]


def _labels_in_place(values_shape: tuple[int, int], valid: np.ndarray, labels: np.ndarray) -> np.ndarray:
    out = np.full(values_shape, -1, dtype=np.int64)
    out[valid] = labels
    return out


def _valid(kwargs: Mapping[str, Any], shape: tuple[int, int]) -> np.ndarray:
    mask = kwargs["mask"]
    return np.ones(shape, bool) if mask is None else mask.cpu().numpy()


class GaussianHMM(HiddenMarkovModel):
    r"""Hidden Markov model with K states and D-dimensional Gaussian emissions.

    Sites (stable names):
        ``initial`` (K,) ~ Dirichlet(``concentration``),
        ``transition`` (K, K), each row ~ Dirichlet(``concentration`` + ``sticky`` on the
        diagonal; ``sticky`` > 0 favours staying in a state),
        ``locs`` (K, D) ~ Normal(mean(X), 2 sd(X)) per coordinate,
        ``scales`` (K, D) ~ LogNormal(log(sd(X) / 2), 1) per coordinate (95% prior mass between
        0.07 and 3.7 times the data's sd, as :class:`GaussianMixture`),
        for ``covariance="full"`` also ``corr_cholesky`` (K, D, D) ~ LKJCholesky(D, 2) and the
        deterministic ``scale_tril`` (K, D, D) = diag(scales) @ corr_cholesky,
        observed ``obs`` (sequence, time, D),
        recovered ``states`` (sequence, time) (see :meth:`recover_latents`).

    mean(X) and sd(X) are per-feature, pooled over all sequences. The states are summed out
    exactly (forward algorithm), so the ArviZ ``log_likelihood`` of ``obs`` has one value **per
    sequence** (``(chain, draw, sequence)``): PSIS-LOO leaves out whole sequences. State labels
    are made consistent across draws and chains by matching ``locs`` to a pivot.

    Args:
        n_states: K >= 1.
        covariance: ``"diag"`` or ``"full"``.
        concentration: Dirichlet concentration of ``initial`` and of each ``transition`` row.
        sticky: extra concentration on the diagonal of ``transition``.
        sequence_column: for DataFrame data in long format, the column holding sequence ids
            (rows are time steps in order; the other columns are the D features).
        max_state_draws: posterior draws for which ``states`` is sampled (0: none).
        relabel: make state labels consistent across draws and chains.

    Shapes:
        data: one sequence (T,) or (T, D) as an array, tensor or DataFrame; several sequences
        of any lengths as a list (or tuple) of such arrays (padded and masked, never
        truncated; a list is always read as several sequences); or a long DataFrame with
        ``sequence_column``.

    Example:
        >>> hmm = GaussianHMM(n_states=2)
        >>> kwargs = hmm.prepare([np.zeros(5), np.ones(3)])
        >>> kwargs["X"].shape, kwargs["mask"].sum(1).tolist()
        (torch.Size([2, 5, 1]), [5, 3])
    """

    def __init__(self, n_states: int = 2, covariance: Literal["diag", "full"] = "diag", *,
                 concentration: float = 1.0, sticky: float = 0.0, sequence_column: str | None = None,
                 max_state_draws: int = 200, relabel: bool = True) -> None:
        super().__init__(n_states, concentration=concentration, sticky=sticky, sequence_column=sequence_column,
                         max_state_draws=max_state_draws, relabel=relabel)
        if covariance not in ("diag", "full"):
            raise ConfigError(f"covariance: must be 'diag' or 'full', got {covariance!r}.")
        self.covariance = covariance
        self._param_names = ("locs", "scale_tril") if covariance == "full" else ("locs", "scales")
        self.init_args = {"n_states": self.n_states, "covariance": covariance, **{
            k: v for k, v in self.init_args.items() if k != "n_states"}}

    def _check(self, array: np.ndarray, name: str) -> np.ndarray:
        if array.ndim not in (1, 2):
            raise DataError(f"{name}: expected a sequence of shape (T,) or (T, D), got shape {array.shape}; "
                            "pass several sequences as a list of arrays.")
        return (array.reshape(-1, 1) if array.ndim == 1 else array).astype(float)

    def _summaries(self, values: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        sd = values.std(0) if len(values) > 1 else np.ones(values.shape[-1])
        sd = np.where(sd > 0, sd, 1.0)
        dtype = torch.get_default_dtype()
        return torch.as_tensor(values.mean(0), dtype=dtype), torch.as_tensor(sd, dtype=dtype)

    def dims(self, kwargs: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
        return {**super().dims(kwargs), "locs": ("state", "feature"), "scales": ("state", "feature"),
                "corr_cholesky": ("state", "feature", "feature_"), "scale_tril": ("state", "feature", "feature_")}

    def _emission_sites(self, data_mean: torch.Tensor, data_sd: torch.Tensor) -> dict[str, torch.Tensor]:
        K, D = self.n_states, data_mean.shape[-1]
        locs = pyro.sample("locs", dist.Normal(data_mean, 2 * data_sd).expand([K, D]).to_event(2))
        scales = pyro.sample("scales", dist.LogNormal((data_sd / 2).log(), 1.0).expand([K, D]).to_event(2))
        if self.covariance == "diag":
            return {"locs": locs, "scales": scales}
        corr = pyro.sample("corr_cholesky", dist.LKJCholesky(D, 2.0).expand([K]).to_event(1))
        scale_tril = pyro.deterministic("scale_tril", scales.unsqueeze(-1) * corr, event_dim=3)
        return {"locs": locs, "scale_tril": scale_tril}

    def _emission(self, params: Mapping[str, torch.Tensor]) -> dist.TorchDistribution:
        locs = params["locs"].unsqueeze(-3)  # a time dim of size 1
        if self.covariance == "full":
            return dist.MultivariateNormal(locs, scale_tril=params["scale_tril"].unsqueeze(-4))
        return dist.Normal(locs, params["scales"].unsqueeze(-3)).to_event(1)

    def _init_emission(self, values: np.ndarray, kwargs: Mapping[str, Any], seed: int,
                       ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        K = self.n_states
        valid = _valid(kwargs, values.shape[:2])
        x = values[valid]
        sd = kwargs["data_sd"].cpu().numpy()
        labels = _kmeans((x - x.mean(0)) / sd, K, seed) if K > 1 else np.zeros(len(x), int)
        locs = np.stack([x[labels == k].mean(0) if (labels == k).any() else x.mean(0) for k in range(K)])
        floor = sd / 8  # the GaussianMixture's floor: a quarter of the scale prior's median
        spreads = np.stack([x[labels == k].std(0) if (labels == k).sum() > 1 else 2 * floor for k in range(K)])
        out = {"locs": locs, "scales": np.maximum(spreads, floor)}
        if self.covariance == "full":
            out["corr_cholesky"] = np.broadcast_to(np.eye(x.shape[1]), (K, x.shape[1], x.shape[1])).copy()
        return _labels_in_place(values.shape[:2], valid, labels), out

    def _label_features(self, posterior: Mapping[str, np.ndarray]) -> np.ndarray:
        return posterior["locs"]


class PoissonHMM(HiddenMarkovModel):
    r"""Hidden Markov model with K states and Poisson counts.

    Sites (stable names):
        ``initial`` (K,) and ``transition`` (K, K) as in :class:`GaussianHMM`,
        ``rates`` (K,) ~ LogNormal(log(mean count), 1) (95% prior mass between 0.14 and 7.1
        times the mean count; a mean of 0 counts as 0.5, keeping the prior proper),
        observed ``obs`` (sequence, time), recovered ``states`` (sequence, time).

    ``log_likelihood`` has one value per sequence (the states are summed out). Labels are made
    consistent across draws and chains by matching log ``rates`` to a pivot.

    Args:
        n_states: K >= 1.
        concentration, sticky, sequence_column, max_state_draws, relabel: as in
            :class:`GaussianHMM`.

    Shapes:
        data: non-negative integer counts, one sequence (T,), a list of sequences, or a
        DataFrame with one value column (plus ``sequence_column``).

    Example:
        >>> PoissonHMM(n_states=2).prepare([3, 0, 5])["X"].tolist()
        [[3.0, 0.0, 5.0]]
    """

    _param_names = ("rates",)

    def __init__(self, n_states: int = 2, *, concentration: float = 1.0, sticky: float = 0.0,
                 sequence_column: str | None = None, max_state_draws: int = 200, relabel: bool = True) -> None:
        super().__init__(n_states, concentration=concentration, sticky=sticky, sequence_column=sequence_column,
                         max_state_draws=max_state_draws, relabel=relabel)

    def _check(self, array: np.ndarray, name: str) -> np.ndarray:
        array = _univariate(array, name, "counts")
        if (array < 0).any():
            where = int(np.argmax(array < 0))
            raise DataError(f"{name}: counts must be >= 0, got {array[where]!r} at time step {where}; "
                            "PoissonHMM models non-negative integer counts.")
        if (array != np.round(array)).any():
            where = int(np.argmax(array != np.round(array)))
            raise DataError(f"{name}: counts must be whole numbers, got {array[where]!r} at time step {where}; "
                            "round them, or use GaussianHMM for real-valued data.")
        return array.astype(float)

    def _summaries(self, values: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = torch.get_default_dtype()
        mean = values.mean() if values.mean() > 0 else 0.5
        return torch.tensor([mean], dtype=dtype), torch.tensor([values.std()], dtype=dtype)

    def dims(self, kwargs: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
        return {**super().dims(kwargs), "rates": ("state",), "data_mean": ("summary",), "data_sd": ("summary",)}

    def _emission_sites(self, data_mean: torch.Tensor, data_sd: torch.Tensor) -> dict[str, torch.Tensor]:
        rates = pyro.sample("rates", dist.LogNormal(data_mean.log(), 1.0).expand([self.n_states]).to_event(1))
        # data_mean has shape (1,): the prior's location, shared by the K rates.
        return {"rates": rates}

    def _emission(self, params: Mapping[str, torch.Tensor]) -> dist.TorchDistribution:
        return dist.Poisson(params["rates"].unsqueeze(-2))

    def _init_emission(self, values: np.ndarray, kwargs: Mapping[str, Any], seed: int,
                       ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        K = self.n_states
        valid = _valid(kwargs, values.shape[:2])
        x = values[valid].astype(float)
        z = np.sqrt(x)[:, None]  # variance-stabilised counts
        labels = _kmeans(z, K, seed) if K > 1 and z.std() > 0 else np.zeros(len(x), int)
        floor = 0.1 * float(kwargs["data_mean"])
        rates = np.array([max(x[labels == k].mean(), floor) if (labels == k).any() else x.mean() + floor
                          for k in range(K)])
        return _labels_in_place(values.shape[:2], valid, labels), {"rates": rates}

    def _label_features(self, posterior: Mapping[str, np.ndarray]) -> np.ndarray:
        return np.log(posterior["rates"])[..., None]


class CategoricalHMM(HiddenMarkovModel):
    r"""Hidden Markov model with K states emitting one of M symbols per step.

    Sites (stable names):
        ``initial`` (K,) and ``transition`` (K, K) as in :class:`GaussianHMM`,
        ``emission`` (K, M), each row ~ Dirichlet(``emission_concentration``),
        observed ``obs`` (sequence, time) with values in 0..M-1, recovered ``states``.

    ``log_likelihood`` has one value per sequence (the states are summed out). Labels are made
    consistent across draws and chains by matching ``emission`` rows to a pivot.

    Args:
        n_states: K >= 1.
        n_symbols: M >= 1.
        emission_concentration: Dirichlet concentration of each ``emission`` row.
        concentration, sticky, sequence_column, max_state_draws, relabel: as in
            :class:`GaussianHMM`.

    Shapes:
        data: integer symbols in [0, M): one sequence (T,), a list of sequences, or a DataFrame
        with one value column (plus ``sequence_column``).

    Example:
        >>> CategoricalHMM(n_states=2, n_symbols=3).prepare([0, 2, 1])["X"].tolist()
        [[0, 2, 1]]
    """

    _param_names = ("emission",)

    def __init__(self, n_states: int = 2, n_symbols: int = 2, *, emission_concentration: float = 1.0,
                 concentration: float = 1.0, sticky: float = 0.0, sequence_column: str | None = None,
                 max_state_draws: int = 200, relabel: bool = True) -> None:
        super().__init__(n_states, concentration=concentration, sticky=sticky, sequence_column=sequence_column,
                         max_state_draws=max_state_draws, relabel=relabel)
        self.n_symbols = check_count(n_symbols, "n_symbols")
        if not emission_concentration > 0:
            raise ConfigError(f"emission_concentration: must be positive, got {emission_concentration!r}.")
        self.emission_concentration = float(emission_concentration)
        self.init_args = {"n_states": self.n_states, "n_symbols": self.n_symbols,
                          "emission_concentration": self.emission_concentration,
                          **{k: v for k, v in self.init_args.items() if k != "n_states"}}

    def _check(self, array: np.ndarray, name: str) -> np.ndarray:
        array = _univariate(array, name, "symbols")
        if (array != np.round(array)).any():
            where = int(np.argmax(array != np.round(array)))
            raise DataError(f"{name}: symbols must be integers, got {array[where]!r} at time step {where}; "
                            "encode categories as 0..n_symbols-1.")
        bad = (array < 0) | (array >= self.n_symbols)
        if bad.any():
            where = int(np.argmax(bad))
            raise DataError(f"{name}: symbol {array[where]!r} at time step {where} is outside [0, {self.n_symbols}) "
                            f"(n_symbols={self.n_symbols}); raise n_symbols or recode the symbols.")
        return array.astype(np.int64)

    def _summaries(self, values: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = torch.get_default_dtype()
        freq = np.bincount(values, minlength=self.n_symbols) / len(values)
        return torch.as_tensor(freq, dtype=dtype), torch.as_tensor(np.sqrt(freq * (1 - freq)), dtype=dtype)

    def dims(self, kwargs: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
        return {**super().dims(kwargs), "emission": ("state", "symbol"), "data_mean": ("symbol",),
                "data_sd": ("symbol",)}

    def coords(self, data: Any) -> dict[str, list[Any]]:
        return {**super().coords(data), "symbol": list(range(self.n_symbols))}

    def _emission_sites(self, data_mean: torch.Tensor, data_sd: torch.Tensor) -> dict[str, torch.Tensor]:
        conc = torch.full((self.n_states, self.n_symbols), self.emission_concentration, dtype=data_mean.dtype,
                          device=data_mean.device)
        return {"emission": pyro.sample("emission", dist.Dirichlet(conc).to_event(1))}

    def _emission(self, params: Mapping[str, torch.Tensor]) -> dist.TorchDistribution:
        return dist.Categorical(probs=params["emission"].unsqueeze(-3))

    def _init_emission(self, values: np.ndarray, kwargs: Mapping[str, Any], seed: int,
                       ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Clusters of local symbol frequencies (one-hot codes averaged over 11 steps), so that
        k-means sees regimes rather than single symbols."""
        K, M = self.n_states, self.n_symbols
        valid = _valid(kwargs, values.shape[:2])
        onehot = np.eye(M)[values] * valid[..., None]
        csum = np.concatenate([np.zeros((values.shape[0], 1, M)), onehot.cumsum(1)], 1)
        half = 5
        T = values.shape[1]
        lo, hi = np.clip(np.arange(T) - half, 0, T), np.clip(np.arange(T) + half + 1, 0, T)
        counts = np.concatenate([np.zeros((values.shape[0], 1)), valid.cumsum(1)], 1)
        local = (csum[:, hi] - csum[:, lo]) / np.maximum(counts[:, hi] - counts[:, lo], 1)[..., None]
        z = local[valid]
        labels = _kmeans(z, K, seed) if K > 1 and z.std() > 0 else np.zeros(len(z), int)
        symbols = values[valid]
        emission = np.stack([np.bincount(symbols[labels == k], minlength=M) + 1.0 for k in range(K)])
        return _labels_in_place(values.shape[:2], valid, labels), {
            "emission": emission / emission.sum(1, keepdims=True)}

    def _label_features(self, posterior: Mapping[str, np.ndarray]) -> np.ndarray:
        return posterior["emission"]


def _univariate(array: np.ndarray, name: str, what: str) -> np.ndarray:
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 1:
        raise DataError(f"{name}: expected a 1-D sequence of {what}, got shape {array.shape}; pass several "
                        "sequences as a list of 1-D arrays.")
    return array
