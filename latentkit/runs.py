"""Run folders: everything about a fit on disk, written atomically, read back without pickle.

Layout::

    runs/NAME/
      config.json         model class and arguments, engine and options, seed, versions
      inference.nc        result.to_arviz() as NetCDF
      params.safetensors  fitted parameters (constrained values by name)
      metrics.csv         loss and ELBO per step (SVI), or sampler statistics per draw (MCMC)
      plots/*.png         trace, rank, ELBO curve
      checkpoint-*        optimisation checkpoints (see :mod:`latentkit.checkpoint`)

A partial run (MCMC stopped by a signal) has ``"partial"`` in ``config.json`` with the draws kept.
"""

import copy
import dataclasses
import inspect
import json
import os
import signal
import sys
import tempfile
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import arviz as az
import numpy as np
import pandas as pd
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from latentkit.errors import ConfigError, RunFolderError
from latentkit.inference.result import Result

__all__ = ["save_result", "load", "atomic_write", "fsync_directory", "fit_in_folder"]

FILES = ("config.json", "inference.nc", "params.safetensors", "metrics.csv")
GROUPS = ("posterior", "sample_stats", "log_likelihood", "posterior_predictive",
          "observed_data", "constant_data")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, fsync it, then rename it over
    ``path`` (and fsync the folder): readers see the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_directory(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fsync_directory(folder: Path) -> None:
    """Make renames inside ``folder`` durable (POSIX; a no-op elsewhere)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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

    Built-in models are rebuilt from ``config.json``, with their fitted network weights (a VAE's
    encoder and decoder, a diffusion model's network) loaded from ``params``; for a plain Pyro
    function or a model with custom networks pass it as ``model`` (``result.fitted_model()`` then
    gives a copy of it with the fitted weights). Nothing is unpickled.

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
    losses, epoch_metrics = None, {}
    if "optimization" in idata.groups():
        optimization = idata["optimization"]
        losses = optimization["loss"].values
        epoch_metrics = {k.removeprefix("epoch_"): optimization[k].values for k in optimization.data_vars
                         if k.startswith("epoch_")}
    result = Result(
        **groups,
        dims=dims,
        coords=coords,
        params=params,
        losses=losses,
        epoch_metrics=epoch_metrics,
        config=config,
        model=model if model is not None else _rebuild_model(config),
    )
    if model is None and isinstance(result.model, torch.nn.Module) and result.model_state():
        result.model.load_state_dict(result.model_state())  # the rebuilt model is ours: fill in its weights
    return result


def fit_in_folder(
    engine: Any,
    model: Any,
    data: Any,
    *,
    seed: int,
    progress: bool,
    out: str | Path | None = None,
    resume: str | Path | None = None,
    distributed: bool = False,
) -> Result:
    """Run ``engine.fit`` with a run folder, resumption, graceful stops and torchrun processes.

    What :func:`latentkit.fit` does when given ``out``, ``resume`` or ``distributed``:

    * engines whose ``fit`` takes ``run_dir`` (SVI) checkpoint into the folder; ``resume``
      continues from the folder's checkpoint;
    * while the fit runs, SIGINT/SIGTERM end it at the next step: SVI writes a checkpoint, MCMC
      keeps the draws completed so far as a run folder marked ``"partial"`` in ``config.json``;
      then :class:`~latentkit.interrupt.Interrupted` (exit code 130) or
      :class:`~latentkit.interrupt.Terminated` (143) is raised after printing how to resume;
    * ``distributed``: SVI becomes data-parallel, MCMC chains are spread over the processes;
      only rank 0 writes the folder;
    * the result is saved into the folder at the end.
    """
    from latentkit import distributed as dist_tools
    from latentkit.interrupt import RunStopped, StopRequests, stopped

    if resume is not None and out is not None and Path(out).resolve() != Path(resume).resolve():
        raise ConfigError(f"out: a resumed run continues in its own folder {str(resume)!r}; drop out= "
                          f"(got {str(out)!r}) or pass the same folder.")
    folder = Path(resume if resume is not None else out) if (resume is not None or out is not None) else None
    accepts = set(inspect.signature(engine.fit).parameters)
    options = getattr(engine, "options", None)
    fields = {f.name for f in dataclasses.fields(options)} if dataclasses.is_dataclass(options) else set()
    name = getattr(engine, "name", type(engine).__name__)
    chains_over_ranks = False
    if distributed:
        if "distributed" in fields:
            engine = copy.copy(engine)
            engine.options = dataclasses.replace(options, distributed=True)
        elif "num_chains" in fields:
            chains_over_ranks = True
        else:
            raise ConfigError(f"distributed: engine {name!r} cannot run on several processes; use 'svi', "
                              "'nuts' or 'hmc', or drop distributed.")
        context = dist_tools.setup(getattr(options, "device", None))
    main = dist_tools.rank() == 0
    if resume is not None and "resume" not in accepts:
        raise ConfigError(f"resume: engine {name!r} writes no checkpoints, so its runs cannot be resumed; "
                          "run the fit again instead.")
    kwargs: dict[str, Any] = {}
    if folder is not None and "run_dir" in accepts:
        kwargs.update(run_dir=folder, resume=resume is not None)
    stop = StopRequests() if folder is not None and "should_stop" in accepts and not chains_over_ranks else None
    num_warmup = getattr(options, "num_warmup", None)
    with stop if stop is not None else nullcontext():
        if stop is not None:
            kwargs["should_stop"] = stop if num_warmup is None else _draws_stop(stop, num_warmup)
        try:
            if chains_over_ranks:
                result = dist_tools.fit_chains(engine, model, data, seed=seed, progress=progress, context=context)
            else:
                result = engine.fit(model, data, seed=seed, progress=progress, **kwargs)
        except RunStopped as error:
            if main:
                print(f"latentkit: {error}", file=sys.stderr)
            raise
    num_samples = getattr(options, "num_samples", None)
    if stop is not None and stop.signum is not None and num_samples and result.num_draws < num_samples:
        signame = signal.Signals(stop.signum).name
        partial = {"signal": signame, "draws": result.num_draws, "num_samples": num_samples}
        result = dataclasses.replace(result, config={**result.config, "partial": partial})
        assert folder is not None
        save_result(result, folder, plots=False)  # quickly: the process is being asked to end
        message = (f"{signame}: stopped sampling after {result.num_draws} of {num_samples} draws of each of "
                   f"{result.num_chains} chains (they advance together); kept as a partial run in "
                   f"{str(folder)!r} (config.json: 'partial'). MCMC does not resume: run the fit again "
                   "for all draws.")
        print(f"latentkit: {message}", file=sys.stderr)
        raise stopped(stop.signum, message, run_dir=str(folder), result=result)
    if folder is not None and main:
        save_result(result, folder)
    return result


def _draws_stop(stop: Any, num_warmup: int) -> Callable[[int], bool]:
    """An MCMC ``should_stop``: stop after the current draw; during warm-up there is nothing to
    keep, so stop at once."""
    from latentkit.interrupt import stopped

    def should_stop(iteration: int) -> bool:
        if stop.signum is None:
            return False
        if iteration < num_warmup:
            raise stopped(stop.signum, f"{signal.Signals(stop.signum).name}: stopped during warm-up "
                          f"(iteration {iteration + 1} of {num_warmup}); no draws to keep. Run the fit again.")
        return True

    return should_stop
