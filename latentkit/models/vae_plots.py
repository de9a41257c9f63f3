"""Plots of a fitted VAE for its run folder: reconstructions, samples and latent traversals (image
data), and the training curves per epoch (ELBO, validation ELBO, KL per latent dimension, active units).

:func:`vae_plots` lists them for :func:`latentkit.diagnostics.write_plots`, which a run folder's
``result.save()`` calls; each function also returns a matplotlib figure for notebooks.
"""

import math
from collections.abc import Callable
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from latentkit.inference.result import Result  # noqa: E402

__all__ = ["image_shape", "plot_reconstructions", "plot_samples", "plot_latent_traversals", "plot_epoch_metrics",
           "vae_plots"]

#: Images per row of the image plots, and the traversal's range in prior standard deviations.
ROW, SPAN = 10, 2.5


def image_shape(vae: Any) -> tuple[int, ...] | None:
    """How one data point is drawn: ``(H, W)``, ``(H, W, 3)``, or None for data that are not images
    (vectors whose length is not a square, more than 3 channels)."""
    shape = tuple(vae.input_shape)
    if len(shape) == 1:
        side = math.isqrt(shape[0])
        return (side, side) if side * side == shape[0] else None
    if len(shape) == 2:
        return shape
    if len(shape) == 3 and shape[0] == 1:
        return shape[1:]
    if len(shape) == 3 and shape[0] == 3:
        return shape[1:] + (3,)
    return None


def _grid(rows: list[torch.Tensor], titles: list[str], vae: Any) -> Figure:
    """One row of images per tensor ``(n, *input_shape)`` in ``rows``, drawn as one mosaic (one
    ``imshow``: a subplot per image costs matplotlib ~20 ms each)."""
    shape = image_shape(vae)
    assert shape is not None  # callers check
    height, width = shape[:2]
    columns = max(len(r) for r in rows)
    top = {"bernoulli": 1.0, "categorical": float((vae.n_categories or 2) - 1)}.get(vae.likelihood)
    mosaic = np.full(((height + 1) * len(rows) - 1, (width + 1) * columns - 1) + shape[2:], np.nan)
    for r, images in enumerate(rows):
        for c, image in enumerate(images.detach().cpu().numpy()):
            picture = image.reshape(shape) if len(shape) == 2 else np.moveaxis(image.reshape((3, height, width)), 0, -1)
            mosaic[r * (height + 1):r * (height + 1) + height, c * (width + 1):c * (width + 1) + width] = picture
    fig, ax = plt.subplots(figsize=(0.5 + columns * 0.75, len(rows) * 0.8))
    if len(shape) == 2:
        ax.imshow(mosaic, cmap="gray_r", vmin=0.0 if top is not None else None, vmax=top, interpolation="nearest")
    else:  # RGB
        ax.imshow(np.clip(np.nan_to_num(mosaic, nan=1.0), 0, 1), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([(height + 1) * r + height / 2 - 0.5 for r in range(len(rows))], titles, fontsize=8)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    fig.tight_layout()
    return fig


def _data(vae: Any, X: torch.Tensor, context: Any) -> Any:
    return X if context is None else (X, context)


def plot_reconstructions(vae: Any, X: Any, context: Any = None) -> Figure:
    """Data points (first row) and their reconstructions (second row), up to ``ROW`` of them.

    Shapes:
        X: ``(n, *input_shape)``; context: ``(n, context_dim)`` or ``(n,)`` labels (conditional VAEs).
    """
    X = vae.as_tensor(X)[:ROW]
    context = None if context is None else context[:ROW]
    return _grid([X, vae.reconstruct(_data(vae, X, context))], ["data", "reconstructions"], vae)


def plot_samples(vae: Any, seed: int = 0, context: Any = None) -> Figure:
    """``ROW`` new points from the prior: the decoder's means (first row) and draws (second row)."""
    rows = [vae.sample(ROW, mean=True, seed=seed, context=context),
            vae.sample(ROW, seed=seed, context=context)]
    return _grid(rows, ["samples: means of p(x | z)", "samples: draws of p(x | z)"], vae)


def plot_latent_traversals(vae: Any, context: Any = None) -> Figure:
    """One row per latent dimension: the decoder's mean as that dimension goes from -2.5 to 2.5 prior
    standard deviations, the others at 0 (Higgins et al. 2017). ``context``: one context vector or label."""
    ref = next(vae.parameters())
    grid = torch.linspace(-SPAN, SPAN, ROW - 1, dtype=ref.dtype, device=ref.device)
    c = None if context is None else vae.as_context(
        np.broadcast_to(np.asarray(context), (ROW - 1,) + np.shape(context)), ROW - 1)
    rows = []
    for dim in range(vae.latent_dim):
        z = torch.zeros(ROW - 1, vae.latent_dim, dtype=ref.dtype, device=ref.device)
        z[:, dim] = grid
        rows.append(vae.decode_mean(z, c))
    return _grid(rows, [f"z[{d}] from -{SPAN} to {SPAN}" for d in range(vae.latent_dim)], vae)


def plot_epoch_metrics(result: Result) -> Figure:
    """Training curves per epoch: the mean training ELBO, the validation ELBO with its best epoch, and
    the posterior-collapse monitors (KL per latent dimension, active units), those that were recorded."""
    metrics = result.epoch_metrics
    panels = [name for name in ("elbo", "validation_elbo", "kl_per_dim", "active_units") if name in metrics]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.0), squeeze=False)
    titles = {"elbo": "training ELBO (mean over the epoch's steps)",
              "validation_elbo": "validation ELBO (held-out data)",
              "kl_per_dim": "KL(q(z_l | x) || p(z_l)) per dimension", "active_units": "active units"}
    for ax, name in zip(axes[0], panels, strict=True):
        values = metrics[name]
        epochs = np.arange(1, len(values) + 1)
        ax.plot(epochs, values, lw=1)
        if name == "validation_elbo":
            best = int(np.nanargmax(values))
            ax.axvline(best + 1, color="C1", lw=1, ls="--", label=f"best: epoch {best + 1}")
            ax.legend(loc="lower right", fontsize=8)
        ax.set_title(titles[name], fontsize=9)
        ax.set_xlabel("epoch")
    fig.tight_layout()
    return fig


def vae_plots(result: Result) -> list[tuple[str, Callable[[], Figure]]]:
    """``(file stem, make figure)`` for the VAE plots that apply to ``result`` (a VAE fit): image plots
    for image-shaped data, ``epochs`` when per-epoch metrics were recorded."""
    makers: list[tuple[str, Callable[[], Figure]]] = []
    if result.epoch_metrics:
        makers.append(("epochs", lambda: plot_epoch_metrics(result)))
    vae = result.fitted_model()
    if image_shape(vae) is None or "obs" not in result.observed_data:
        return makers
    X = result.observed_data["obs"][:ROW]
    context = None
    if vae.context_dim and "C" in result.constant_data:
        context = result.constant_data["C"][:ROW]
    elif vae.context_dim:  # a semi-supervised VAE: its classifier's labels
        context = vae.classify(X).cpu().numpy()
    first = None if context is None else context[0]
    return makers + [("reconstructions", lambda: plot_reconstructions(vae, X, context)),
                     ("samples", lambda: plot_samples(vae, int(result.config.get("seed", 0) or 0), first)),
                     ("latent_traversals", lambda: plot_latent_traversals(vae, first))]
