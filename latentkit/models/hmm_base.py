"""What the hidden Markov models share: priors on the state dynamics, data handling, the
marginalised likelihood, state recovery, relabelling, decoding, smoothing and simulation.

Emission families (:mod:`latentkit.models.hmm`) subclass :class:`HiddenMarkovModel` and fill in
its emission hooks.
"""

from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import torch

from latentkit.diagnostics.relabel import match_permutations
from latentkit.errors import ConfigError, DataError
from latentkit.models.base import LatentModel
from latentkit.models.hmm_data import Sequences, pad, read_sequences
from latentkit.models.hmm_ops import (
    HMMSequence,
    filter_log_marginals,
    sample_chain,
    sample_states,
    smooth_log_marginals,
    viterbi,
)

__all__ = ["HiddenMarkovModel", "Forecast"]

#: Bound on step-matrix elements (draws x sequences x T x K x K) per batched posterior pass.
CHUNK_ELEMENTS = 2**22


class Forecast(NamedTuple):
    """Simulated continuations of one sequence, one row per posterior draw.

    Shapes: ``states`` (draws, horizon) int; ``obs`` (draws, horizon) or (draws, horizon, D).
    """

    states: np.ndarray
    obs: np.ndarray


def check_count(value: Any, name: str) -> int:
    """An integer >= 1 (a number of states or symbols), else a DataError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise DataError(f"{name}: must be an integer >= 1, got {value!r}; pass e.g. {name}=2.")
    return int(value)


class HiddenMarkovModel(LatentModel):
    """What the three emission families share: priors on ``initial`` and ``transition``, data
    handling, the marginalised likelihood, state recovery, relabelling, decoding, simulation."""

    _param_names: tuple[str, ...] = ()

    def __init__(self, n_states: int, *, concentration: float, sticky: float, sequence_column: str | None,
                 max_state_draws: int, relabel: bool) -> None:
        super().__init__()
        self.n_states = check_count(n_states, "n_states")
        if not concentration > 0:
            raise ConfigError(f"concentration: must be positive, got {concentration!r}.")
        if not sticky >= 0:
            raise ConfigError(f"sticky: must be >= 0, got {sticky!r}.")
        if isinstance(max_state_draws, bool) or not isinstance(max_state_draws, int) or max_state_draws < 0:
            raise ConfigError(f"max_state_draws: must be an integer >= 0, got {max_state_draws!r}.")
        self.concentration = float(concentration)
        self.sticky = float(sticky)
        self.sequence_column = sequence_column
        self.max_state_draws = max_state_draws
        self.relabel_draws = bool(relabel)
        self.init_args = {"n_states": self.n_states, "concentration": self.concentration,
                          "sticky": self.sticky, "sequence_column": sequence_column,
                          "max_state_draws": max_state_draws, "relabel": self.relabel_draws}

    # -- hooks of the emission families ---------------------------------------------------------
    def _check(self, array: np.ndarray, name: str) -> np.ndarray:
        raise NotImplementedError  # abstract

    def _summaries(self, values: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError  # abstract

    def _emission_sites(self, data_mean: torch.Tensor, data_sd: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError  # abstract

    def _emission(self, params: Mapping[str, torch.Tensor]) -> dist.TorchDistribution:
        raise NotImplementedError  # abstract

    def _init_emission(self, values: np.ndarray, kwargs: Mapping[str, Any], seed: int,
                       ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        raise NotImplementedError  # abstract

    def _label_features(self, posterior: Mapping[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError  # abstract

    # -- data ---------------------------------------------------------------------------------------
    def _read(self, data: Any) -> Sequences:
        sequences, single = read_sequences(data, self._check, sequence_column=self.sequence_column)
        shapes = {a.shape[1:] for _, a in sequences}
        if len(shapes) > 1:
            key0, a0 = sequences[0]
            key, a = next((k, a) for k, a in sequences if a.shape[1:] != a0.shape[1:])
            raise DataError(f"data: sequences have different dimensions: sequence {key!r} has shape {a.shape[1:]} "
                            f"per step, sequence {key0!r} has {a0.shape[1:]}; pass sequences with one D.")
        features = None
        if isinstance(data, pd.DataFrame):
            features = [str(c) for c in data.columns if c != self.sequence_column]
        dtype = torch.long if sequences[0][1].dtype.kind in "iu" else torch.get_default_dtype()
        return pad(sequences, dtype=dtype, single=single, features=features)

    def prepare(self, data: Any) -> dict[str, Any]:
        seqs = self._read(data)
        values = seqs.values.numpy()
        valid = values.reshape((-1,) + values.shape[2:]) if seqs.mask is None else values[seqs.mask.numpy()]
        data_mean, data_sd = self._summaries(valid)
        return {"X": seqs.values, "mask": seqs.mask, "data_mean": data_mean, "data_sd": data_sd,
                "subsample_size": None}

    def coords(self, data: Any) -> dict[str, list[Any]]:
        seqs = self._read(data)
        coords: dict[str, list[Any]] = {"state": list(range(self.n_states)),
                                        "state_next": list(range(self.n_states)),
                                        "sequence": list(seqs.ids)}
        if seqs.features is not None and seqs.values.dim() == 3:
            coords["feature"] = list(seqs.features)
            coords["feature_"] = list(seqs.features)
        return coords

    def dims(self, kwargs: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
        per_step = ("feature",) if kwargs["X"].dim() == 3 else ()
        return {"initial": ("state",), "transition": ("state", "state_next"),
                "obs": ("sequence", "time") + per_step, "mask": ("sequence", "time"), "states": ("sequence", "time"),
                "data_mean": per_step, "data_sd": per_step}

    # -- model -----------------------------------------------------------------------------------------
    def model(self, X: torch.Tensor, mask: torch.Tensor | None = None, data_mean: torch.Tensor | None = None,
              data_sd: torch.Tensor | None = None, subsample_size: int | None = None) -> None:
        """The Pyro model: priors, then ``obs`` (N sequences, a plate ``"sequences"``) with the
        states summed out by :class:`HMMSequence`."""
        K = self.n_states
        ones = torch.ones(K, dtype=data_mean.dtype, device=data_mean.device)
        initial = pyro.sample("initial", dist.Dirichlet(self.concentration * ones))
        rows = self.concentration * ones.expand(K, K) + self.sticky * torch.diag(ones)
        transition = pyro.sample("transition", dist.Dirichlet(rows).to_event(1))
        emission = self._emission(self._emission_sites(data_mean, data_sd))
        N, T = X.shape[:2]
        with pyro.plate("sequences", N, subsample_size=subsample_size) as index:
            if subsample_size is not None:
                X, mask = X[index], (mask[index] if mask is not None else None)
            pyro.sample("obs", HMMSequence(initial.log(), transition.log(), emission, mask=mask, num_steps=T),
                        obs=X)

    # -- starting points ------------------------------------------------------------------------------
    def initial_values(self, kwargs: Mapping[str, Any], seed: int) -> dict[str, torch.Tensor]:
        """Emission parameters from clustering the observations (k-means, ignoring time), and
        ``initial`` / ``transition`` from the cluster labels' first values and consecutive pairs
        (plus one pseudo-count each).

        Random transition rows, as hmmlearn draws them, often start the optimiser next to a
        degenerate solution; label counts start it where states persist as long as the
        clusters do.
        """
        X, mask = kwargs["X"], kwargs["mask"]
        K = self.n_states
        values = X.cpu().numpy()
        valid = np.ones(values.shape[:2], bool) if mask is None else mask.cpu().numpy()
        labels, emission = self._init_emission(values, kwargs, seed)  # labels (N, T), -1 where padded
        pairs = np.zeros((K, K))
        for seq, ok in zip(labels, valid, strict=True):
            seq = seq[ok]
            np.add.at(pairs, (seq[:-1], seq[1:]), 1.0)
        firsts = np.bincount(labels[:, 0], minlength=K) + 1.0
        transition = (pairs + 1.0) / (pairs + 1.0).sum(1, keepdims=True)
        dtype, device = kwargs["data_mean"].dtype, kwargs["data_mean"].device
        out = {"initial": firsts / firsts.sum(), "transition": transition, **emission}
        return {k: torch.as_tensor(v, dtype=dtype, device=device) for k, v in out.items()}

    # -- after fitting ------------------------------------------------------------------------------------
    def _params(self, posterior: Mapping[str, np.ndarray], index: np.ndarray | None,
                like: torch.Tensor) -> dict[str, torch.Tensor]:
        """Parameters of the chosen flat draws (or the posterior mean when ``index`` is None),
        shaped (B, 1, ...) to broadcast over sequences."""
        out = {}
        for name in ("initial", "transition", *self._param_names):
            array = posterior[name]
            flat = array.reshape((-1,) + array.shape[2:])
            chosen = flat.mean(0, keepdims=True) if index is None else flat[index]
            out[name] = torch.as_tensor(chosen, dtype=like.dtype, device=like.device).unsqueeze(1)
        return out

    def _factors(self, params: Mapping[str, torch.Tensor], seqs: Sequences,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """log_init (B, 1, K), log_trans (B, 1, K, K), obs_logp (B, N, T, K)."""
        emission = self._emission(params)
        event = len(emission.event_shape)
        obs_logp = emission.log_prob(seqs.values.unsqueeze(-1 - event))
        return params["initial"].log(), params["transition"].log(), obs_logp

    def _like(self) -> torch.Tensor:
        return torch.zeros((), dtype=torch.get_default_dtype())

    def _chunks(self, draws: np.ndarray, seqs: Sequences) -> list[np.ndarray]:
        per_draw = seqs.values.shape[0] * seqs.values.shape[1] * self.n_states**2
        size = max(1, CHUNK_ELEMENTS // per_draw)
        return [draws[i:i + size] for i in range(0, len(draws), size)]

    @staticmethod
    def _spread(total: int, num: int) -> np.ndarray:
        return np.unique(np.linspace(0, total - 1, min(total, num)).round().astype(int))

    def recover_latents(self, kwargs: Mapping[str, Any], posterior: dict[str, np.ndarray],
                        seed: int) -> dict[str, np.ndarray]:
        """``states`` (chain, draw, sequence, time): one path per draw sampled from
        p(states | parameters of that draw, data) by forward filtering, backward sampling.

        Paths are drawn for at most ``max_state_draws`` draws spread evenly over all chains and
        draws (all draws when there are fewer); the other draws, and padded time steps of
        shorter sequences, hold -1. Select the recovered draws with ``states[..., 0, 0] >= 0``.
        """
        if self.max_state_draws == 0 or "initial" not in posterior:
            return {}
        C, S = posterior["initial"].shape[:2]
        X, mask = kwargs["X"], kwargs["mask"]
        seqs = Sequences(values=X, mask=mask, lengths=np.array([]), ids=[], features=None, single=False)
        N, T = X.shape[:2]
        dtype = np.int8 if self.n_states <= 127 else np.int32
        states = np.full((C * S, N, T), -1, dtype=dtype)
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            for chunk in self._chunks(self._spread(C * S, self.max_state_draws), seqs):
                params = self._params(posterior, chunk, kwargs["data_mean"])
                path = sample_states(*self._factors(params, seqs), mask)
                if mask is not None:
                    path = torch.where(mask, path, -1)
                states[chunk] = path.cpu().numpy()
        return {"states": states.reshape(C, S, N, T)}

    def relabel(self, posterior: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Permute state labels of each draw to best match a pivot (the Hungarian algorithm on
        standardised emission parameters, see :func:`~latentkit.diagnostics.relabel.relabel`),
        so that chains agree on what state k is. ``initial``, both axes of ``transition``, the
        emission parameters and ``states`` values follow the same permutation."""
        if self.n_states == 1 or not self.relabel_draws or "initial" not in posterior:
            return posterior
        perms = match_permutations(self._label_features(posterior))
        C, S, K = perms.shape
        out = dict(posterior)
        axes = {"initial": (0,), "transition": (0, 1), "corr_cholesky": (0,), "scale_tril": (0,)}
        for name in ("initial", "transition", "corr_cholesky", "scale_tril", *self._param_names):
            if name not in out:
                continue
            array = out[name]
            for axis in axes.get(name, (0,)):
                shape = [C, S] + [1] * (array.ndim - 2)
                shape[2 + axis] = K
                array = np.take_along_axis(array, perms.reshape(shape), axis=2 + axis)
            out[name] = array
        if "states" in out:
            inverse = np.argsort(perms, axis=-1).reshape(C * S, K)  # old label -> new label
            flat = out["states"].reshape(C * S, -1)
            mapped = np.take_along_axis(inverse, np.clip(flat, 0, K - 1).astype(np.int64), axis=1)
            out["states"] = np.where(flat >= 0, mapped, flat).astype(flat.dtype).reshape(out["states"].shape)
        return out

    def decode(self, result: Any, data: Any) -> np.ndarray | list[np.ndarray]:
        """The most probable state path of each sequence (Viterbi), at the posterior-mean
        parameters (the MAP for ``guide="delta"`` fits; labels as in ``result`` after
        relabelling).

        Returns: (T,) int array for one sequence, else a list of (T_n,) arrays in data order.
        """
        seqs = self._read(data)
        with torch.no_grad():
            params = self._params(result.posterior, None, self._like())
            path = viterbi(*self._factors(params, seqs), seqs.mask)[0]
        return seqs.unpad(path.cpu().numpy())

    def _marginals(self, result: Any, data: Any, num_draws: int, smooth: bool) -> np.ndarray | list[np.ndarray]:
        seqs = self._read(data)
        C, S = result.posterior["initial"].shape[:2]
        total = torch.zeros(seqs.values.shape[:2] + (self.n_states,), dtype=torch.get_default_dtype())
        draws = self._spread(C * S, num_draws)
        fn = smooth_log_marginals if smooth else filter_log_marginals
        with torch.no_grad():
            for chunk in self._chunks(draws, seqs):
                params = self._params(result.posterior, chunk, self._like())
                total += fn(*self._factors(params, seqs), seqs.mask).exp().sum(0)
        return seqs.unpad((total / len(draws)).numpy())

    def smooth(self, result: Any, data: Any, num_draws: int = 200) -> np.ndarray | list[np.ndarray]:
        """Posterior state probabilities p(z_t = k | all data) per time step, averaged over up
        to ``num_draws`` posterior draws (so parameter uncertainty is included).

        Returns: (T, K) for one sequence, else a list of (T_n, K) arrays in data order.
        """
        return self._marginals(result, data, num_draws, smooth=True)

    def filter(self, result: Any, data: Any, num_draws: int = 200) -> np.ndarray | list[np.ndarray]:
        """Filtered state probabilities p(z_t = k | data up to t), averaged over up to
        ``num_draws`` posterior draws.

        Returns: (T, K) for one sequence, else a list of (T_n, K) arrays in data order.
        """
        return self._marginals(result, data, num_draws, smooth=False)

    def _emit(self, params: Mapping[str, torch.Tensor], states: torch.Tensor) -> torch.Tensor:
        """Observations for states (B, M, n) given params (B, 1, ...): (B, M, n) + event."""
        emission = self._emission(params)
        event = emission.event_shape
        draws = emission.expand(states.shape + (self.n_states,)).sample()
        index = states.reshape(states.shape + (1,) * (1 + len(event))).expand(states.shape + (1,) + event)
        return torch.gather(draws, -1 - len(event), index).squeeze(-1 - len(event))

    def forecast(self, result: Any, data: Any, horizon: int, num_draws: int = 200,
                 seed: int = 0) -> Forecast | list[Forecast]:
        """Simulate ``horizon`` steps after the end of each sequence, once per posterior draw
        (up to ``num_draws``), starting from the filtered state distribution at its last step.

        Returns: a :class:`Forecast` (states (draws, horizon), obs (draws, horizon[, D])) for one
        sequence, else a list of them in data order.
        """
        if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
            raise ConfigError(f"horizon: must be a positive integer, got {horizon!r}.")
        seqs = self._read(data)
        C, S = result.posterior["initial"].shape[:2]
        draws = self._spread(C * S, num_draws)
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            params = self._params(result.posterior, draws, self._like())
            log_init, log_trans, obs_logp = self._factors(params, seqs)
            last = filter_log_marginals(log_init, log_trans, obs_logp, seqs.mask)[..., -1, :]  # (B, N, K)
            following = (last.unsqueeze(-1) + log_trans).logsumexp(-2)
            states = sample_chain(following, log_trans, horizon)  # (B, N, horizon)
            obs = self._emit(params, states)
        parts = [Forecast(states[:, i].numpy(), obs[:, i].numpy()) for i in range(states.shape[1])]
        return parts[0] if seqs.single else parts

    def sample(self, n_steps: int, result: Any = None, seed: int = 0,
               return_states: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Simulate a new sequence of ``n_steps`` from the parameters of one posterior draw
        chosen at random.

        Returns: obs (n_steps,) or (n_steps, D); with ``return_states`` also the states
        (n_steps,).
        """
        if result is None:
            raise ConfigError("result: pass the fitted result, e.g. hmm.sample(100, result=res).")
        if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
            raise ConfigError(f"n_steps: must be a positive integer, got {n_steps!r}.")
        C, S = result.posterior["initial"].shape[:2]
        draw = np.random.default_rng(seed).integers(C * S, size=1)
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            params = self._params(result.posterior, draw, self._like())
            states = sample_chain(params["initial"].log(), params["transition"].log(), n_steps)  # (1, 1, n)
            obs = self._emit(params, states)[0, 0].numpy()
        return (obs, states[0, 0].numpy()) if return_states else obs
