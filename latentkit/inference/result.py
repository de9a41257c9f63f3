"""The one result type every engine returns, and its conversion to ArviZ."""

import copy
import math
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import arviz as az
import numpy as np
import pandas as pd
import torch
import xarray as xr

__all__ = ["Result"]

Arrays = dict[str, np.ndarray]

#: Sample statistics shared by every MCMC engine, with ArviZ's names.
MCMC_STATS = ("lp", "acceptance_rate", "step_size", "n_steps", "tree_depth", "diverging", "energy")


def _arrays_equal(a: Arrays, b: Arrays) -> bool:
    return a.keys() == b.keys() and all(
        a[k].shape == b[k].shape and np.array_equal(a[k], b[k], equal_nan=a[k].dtype.kind == "f")
        for k in a
    )


@dataclass(frozen=True, eq=False)
class Result:
    """Everything a fit produced, engine-independent.

    Shapes:
        ``posterior``, ``sample_stats``, ``log_likelihood``, ``posterior_predictive``:
        arrays of shape ``(chain, draw, *site_shape)``; SVI results have one chain of
        ``num_samples`` draws from the fitted guide.
        ``observed_data``, ``constant_data``: arrays of the data's own shape.
        ``losses``: loss per optimisation step (negative ELBO, nats), ``(steps,)``, or None.
        ``epoch_metrics``: per-epoch values of an optimisation run, ``(epochs, ...)``: e.g. ``elbo``,
        ``validation_elbo``, and a VAE's ``kl_per_dim`` ``(epochs, latent_dim)`` and ``active_units``.

    Attributes:
        dims: dimension names per variable, after ``(chain, draw)``.
        coords: coordinate values per dimension name.
        params: fitted parameters (guide and network weights), constrained values by name.
        config: what is needed to repeat the run (model, engine, options, seed, versions).
        model: the model object that was fitted (not saved; rebuilt from ``config`` on load).
    """

    posterior: Arrays
    sample_stats: Arrays = field(default_factory=dict)
    log_likelihood: Arrays = field(default_factory=dict)
    posterior_predictive: Arrays = field(default_factory=dict)
    observed_data: Arrays = field(default_factory=dict)
    constant_data: Arrays = field(default_factory=dict)
    dims: dict[str, list[str]] = field(default_factory=dict)
    coords: dict[str, list[Any]] = field(default_factory=dict)
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    losses: np.ndarray | None = None
    epoch_metrics: Arrays = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    model: Any = None

    # -- basic facts -------------------------------------------------------------------------
    @property
    def num_chains(self) -> int:
        return next(iter(self.posterior.values())).shape[0]

    @property
    def num_draws(self) -> int:
        return next(iter(self.posterior.values())).shape[1]

    @property
    def engine(self) -> str:
        return str(self.config.get("engine", {}).get("name", "unknown"))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Result):
            return NotImplemented
        for f in fields(self):
            if f.name == "model":
                continue
            a, b = getattr(self, f.name), getattr(other, f.name)
            if f.name == "params":
                same = a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)
            elif f.name == "losses":
                same = (a is None) == (b is None) and (a is None or np.array_equal(a, b))
            elif isinstance(a, dict) and a and isinstance(next(iter(a.values())), np.ndarray):
                same = _arrays_equal(a, b)
            else:
                same = a == b
            if not same:
                return False
        return True

    __hash__ = None  # type: ignore[assignment]

    # -- ArviZ ---------------------------------------------------------------------------------
    def _group(self, group: Arrays, with_sample_dims: bool) -> xr.Dataset:
        variables = {}
        for name, array in group.items():
            rank = array.ndim - (2 if with_sample_dims else 0)
            # A log-likelihood has the leading (batch) dims of its observed site.
            dims = list(self.dims.get(name, [f"{name}_dim_{i}" for i in range(rank)]))[:rank]
            if with_sample_dims:
                dims = ["chain", "draw"] + dims
            variables[name] = (dims, array)
        coords = {}
        if with_sample_dims and group:
            coords = {"chain": np.arange(self.num_chains), "draw": np.arange(self.num_draws)}
        for dims, _ in variables.values():
            for dim in dims:
                if dim in self.coords:
                    coords[dim] = np.asarray(self.coords[dim])
        return xr.Dataset(variables, coords=coords)

    def to_arviz(self) -> az.InferenceData:
        """Convert to :class:`arviz.InferenceData`.

        Groups: ``posterior``, ``sample_stats`` (MCMC: ``lp``, ``acceptance_rate``,
        ``step_size``, ``n_steps``, ``tree_depth``, ``diverging``, ``energy``),
        ``log_likelihood`` (per observation, discrete latents summed out),
        ``posterior_predictive``, ``observed_data``, ``constant_data`` where present, and for
        optimisation-based engines ``optimization`` with the ``loss`` and ``elbo`` per ``step`` (and
        the ``epoch_metrics`` per ``epoch``, prefixed ``epoch_``).
        Chains are numbered 0, 1, ... in numeric order.
        """
        groups: dict[str, xr.Dataset] = {}
        for name in ("posterior", "sample_stats", "log_likelihood", "posterior_predictive"):
            if getattr(self, name):
                groups[name] = self._group(getattr(self, name), with_sample_dims=True)
        for name in ("observed_data", "constant_data"):
            if getattr(self, name):
                groups[name] = self._group(getattr(self, name), with_sample_dims=False)
        if self.losses is not None:
            steps = np.arange(1, len(self.losses) + 1)
            variables: dict[str, tuple[list[str], np.ndarray]] = {
                "loss": (["step"], self.losses), "elbo": (["step"], -self.losses)}
            coords = {"step": steps}
            for name, array in self.epoch_metrics.items():
                variables[f"epoch_{name}"] = (["epoch"] + [f"{name}_dim_{i}" for i in range(array.ndim - 1)], array)
                coords["epoch"] = np.arange(1, len(array) + 1)
            groups["optimization"] = xr.Dataset(variables, coords=coords)
        attrs = {
            "inference_library": "latentkit",
            "engine": self.engine,
            "model": str(self.config.get("model", {}).get("name", "")),
            "seed": str(self.config.get("seed", "")),
        }
        for dataset in groups.values():
            dataset.attrs.update(attrs)
        return az.InferenceData(**groups)

    def fitted_model(self) -> Any:
        """The fitted model: :attr:`model` with the network weights of :attr:`params` (``model.*``)
        loaded into a copy, since a loaded result's model is rebuilt from ``config`` untrained; the
        model itself when there are no such weights."""
        if not isinstance(self.model, torch.nn.Module) or not self.model_state():
            return self.model
        model = copy.deepcopy(self.model)
        model.load_state_dict(self.model_state())
        return model

    def model_state(self) -> dict[str, torch.Tensor]:
        """The fitted weights of the model's networks in :attr:`params` (``model.*``), by state-dict name."""
        return {k.removeprefix("model."): v for k, v in self.params.items() if k.startswith("model.")}

    def summary(self, var_names: list[str] | None = None, **kwargs: Any) -> pd.DataFrame:
        """ArviZ's summary table (mean, sd, hdi, mcse, ess_bulk, ess_tail, r_hat).

        By default it covers the continuous posterior variables (discrete per-observation
        sites such as ``assignment`` are left out; name them in ``var_names`` to include them).
        A single chain (SVI's independent guide draws) gets ``kind="stats"``: R-hat needs
        several chains.
        """
        if var_names is None:
            var_names = [k for k, v in self.posterior.items()
                         if v.dtype.kind == "f" and math.prod(v.shape[2:]) <= 1000]
        if self.num_chains == 1:
            kwargs.setdefault("kind", "stats")
        # Constant elements (the unit diagonal of a correlation Cholesky factor) have no
        # variance: ArviZ reports NaN for their R-hat/ESS, which is right; silence numpy's noise.
        with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Degrees of freedom", RuntimeWarning)  # one draw: sd undefined
            return az.summary(self.to_arviz(), var_names=var_names, **kwargs)

    def save(self, path: str | Path, *, plots: bool = True) -> Path:
        """Write the run folder (see :mod:`latentkit.runs`) and return its path."""
        from latentkit.runs import save_result

        return save_result(self, path, plots=plots)
