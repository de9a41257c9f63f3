"""Run folders: everything about a fit on disk, written atomically, read back without pickle.

Layout::

    runs/NAME/
      config.json         model class and arguments, engine and options, seed, versions
      inference.nc        result.to_arviz() as NetCDF
      params.safetensors  fitted parameters (constrained values by name)
      metrics.csv         loss and ELBO per step (SVI), or sampler statistics per draw (MCMC)
      plots/*.png         trace, rank, ELBO curve
"""

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import arviz as az
import numpy as np
import pandas as pd
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from latentkit.errors import RunFolderError
from latentkit.inference.result import Result

__all__ = ["save_result", "load", "atomic_write"]

FILES = ("config.json", "inference.nc", "params.safetensors", "metrics.csv")
GROUPS = ("posterior", "sample_stats", "log_likelihood", "posterior_predictive",
          "observed_data", "constant_data")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, fsync it, then rename it over
    ``path``: readers see the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _metrics(result: Result) -> pd.DataFrame:
    if result.losses is not None:
        return pd.DataFrame({"step": np.arange(1, len(result.losses) + 1),
                             "loss": result.losses, "elbo": -result.losses})
    if result.sample_stats:
        C, S = result.num_chains, result.num_draws
        columns = {"chain": np.repeat(np.arange(C), S), "draw": np.tile(np.arange(S), C)}
        columns.update({k: v.reshape(C * S) for k, v in result.sample_stats.items() if v.ndim == 2})
        return pd.DataFrame(columns)
    return pd.DataFrame()


def save_result(result: Result, path: str | Path, *, plots: bool = True) -> Path:
    """Write ``result`` into the run folder ``path`` (created if needed)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        config = {**result.config, "dims": result.dims, "coords": result.coords}
        text = json.dumps(config, indent=2, default=_json_default)
        atomic_write(path / "config.json", lambda p: p.write_text(text))
        idata = result.to_arviz()
        atomic_write(path / "inference.nc", lambda p: idata.to_netcdf(str(p), engine="h5netcdf"))
        tensors = {k: v.detach().cpu().contiguous() for k, v in result.params.items()}
        atomic_write(path / "params.safetensors", lambda p: save_file(tensors, str(p)))
        metrics = _metrics(result)
        atomic_write(path / "metrics.csv", lambda p: metrics.to_csv(p, index=False))
    except OSError as error:
        raise RunFolderError(
            f"path: could not write the run folder {str(path)!r} ({error.strerror or error}); "
            "choose a writable folder with free space. Files already there are unchanged."
        ) from error
    if plots:
        from latentkit.diagnostics.plots import write_plots

        write_plots(result, path / "plots")
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def _rebuild_model(config: dict[str, Any]) -> Any:
    from latentkit.models import MODELS

    spec = config.get("model", {})
    cls = MODELS.get(spec.get("class", ""))
    return cls(**spec.get("args", {})) if cls is not None else None


def load(path: str | Path, model: Any = None) -> Result:
    """Read a run folder back into a :class:`Result` equal to the one saved.

    Built-in models are rebuilt from ``config.json``; for a plain Pyro function pass it as
    ``model``. Nothing is unpickled.

    Raises:
        RunFolderError: the folder or one of its files is missing or unreadable.
    """
    path = Path(path)
    if not path.is_dir():
        raise RunFolderError(f"path: {str(path)!r} is not a run folder (no such directory); "
                             "pass the folder given to result.save() or latentkit fit --out.")
    missing = [name for name in FILES if not (path / name).is_file()]
    if missing:
        raise RunFolderError(f"path: run folder {str(path)!r} lacks {missing}; it was not "
                             "completely written. Re-run the fit or restore the files.")
    try:
        config = json.loads((path / "config.json").read_text())
        idata = az.from_netcdf(str(path / "inference.nc"), engine="h5netcdf")
        params = load_file(str(path / "params.safetensors"))
    except (json.JSONDecodeError, OSError, ValueError, SafetensorError) as error:
        raise RunFolderError(f"path: run folder {str(path)!r} is corrupted ({error}); re-run the "
                             "fit or restore the files from a backup.") from error
    dims = config.pop("dims", {})
    coords = config.pop("coords", {})
    groups = {}
    for group in GROUPS:
        if group in idata.groups():
            dataset = idata[group]
            groups[group] = {k: dataset[k].values for k in dataset.data_vars}
    losses = None
    if "optimization" in idata.groups():
        losses = idata["optimization"]["loss"].values
    return Result(
        **groups,
        dims=dims,
        coords=coords,
        params=params,
        losses=losses,
        config=config,
        model=model if model is not None else _rebuild_model(config),
    )
