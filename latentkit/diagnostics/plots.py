"""Plots written into a run folder, drawn by ArviZ where it has the plot."""

import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import arviz as az  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import MatplotlibDeprecationWarning  # noqa: E402

from latentkit.inference.result import Result  # noqa: E402
from latentkit.runs import atomic_write  # noqa: E402

__all__ = ["write_plots"]

#: Plot at most this many variables, each at most this many elements, to keep figures legible.
MAX_VARS, MAX_SIZE = 6, 12


def _var_names(result: Result) -> list[str]:
    # Variables with constant elements (a correlation factor's unit diagonal) have no density
    # to draw.
    names = [k for k, v in result.posterior.items()
             if v.dtype.kind == "f" and v[0, 0].size <= MAX_SIZE and np.all(np.ptp(v, axis=(0, 1)) > 0)]
    return names[:MAX_VARS]


def _save(fig: plt.Figure, path: Path) -> None:
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=90, bbox_inches="tight"))
    plt.close(fig)


def write_plots(result: Result, folder: str | Path) -> list[Path]:
    """Write trace and rank plots (MCMC), the ELBO curve (SVI) and the posterior predictive
    overlay as PNG files into ``folder``; return their paths."""
    with warnings.catch_warnings():
        # ArviZ 0.23 calls matplotlib APIs that matplotlib 3.11 deprecates; nothing for users.
        warnings.simplefilter("ignore", MatplotlibDeprecationWarning)
        return _write_plots(result, Path(folder))


def _write_plots(result: Result, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    idata = result.to_arviz()
    names = _var_names(result)
    written = []
    if names:
        axes = az.plot_trace(idata, var_names=names, compact=True)
        _save(axes.ravel()[0].figure, folder / "trace.png")
        written.append(folder / "trace.png")
    if names and result.num_chains > 1:
        axes = az.plot_rank(idata, var_names=names)
        _save(axes.ravel()[0].figure if hasattr(axes, "ravel") else axes.figure, folder / "rank.png")
        written.append(folder / "rank.png")
    if result.losses is not None:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(-result.losses, lw=0.8)
        ax.set_xlabel("step")
        ax.set_ylabel("ELBO (nats)")
        ax.set_title("ELBO")
        _save(fig, folder / "elbo.png")
        written.append(folder / "elbo.png")
    if result.posterior_predictive and result.observed_data:
        axes = az.plot_ppc(idata, num_pp_samples=min(50, result.num_chains * result.num_draws))
        ax = axes.ravel()[0] if hasattr(axes, "ravel") else axes
        _save(ax.figure, folder / "ppc.png")
        written.append(folder / "ppc.png")
    return written
