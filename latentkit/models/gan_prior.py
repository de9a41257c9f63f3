"""A trained generator as a prior: infer its latent from partial or noisy observations."""

import copy
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from torch import nn

from latentkit.data import masked_observations
from latentkit.errors import ConfigError, DataError
from latentkit.models.base import LatentModel

__all__ = ["GANPrior"]

NOISES = ("gaussian",)


def _positive_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1


def latent_dim_of(generator: nn.Module, latent_dim: Any = None) -> int:
    """``latent_dim`` if given, else ``generator.latent_dim``, else the ``in_features`` of its first
    linear layer; a ConfigError unless that is an integer >= 1."""
    if latent_dim is None:
        latent_dim = getattr(generator, "latent_dim", None)
    if latent_dim is None:
        first = next((m for m in generator.modules() if isinstance(m, nn.Linear)), None)
        if first is None:
            raise ConfigError("latent_dim: cannot be inferred (no latent_dim attribute, no nn.Linear); pass it.")
        latent_dim = first.in_features
    if not _positive_int(latent_dim):
        raise ConfigError(f"latent_dim: must be an integer >= 1, got {latent_dim!r}.")
    return int(latent_dim)


class GANPrior(LatentModel):
    r"""A generator G as a prior over data: ``z`` ~ Normal(0, I), ``obs`` ~ Normal(G(z), noise_scale).

    For each observed point (an image to restore, say) the posterior over ``z`` given its observed
    entries is what ``lk.fit(GANPrior(G), data, engine="nuts" | "svi")`` returns, and
    :meth:`generate` maps it to a posterior over the clean point G(z) (Bora et al. 2017,
    "Compressed sensing using generative models", sample it instead of optimising). The generator is
    a frozen copy (``requires_grad=False``, eval mode, held outside the module tree): no engine
    changes it, and the model has no parameters.

    Sites (stable names): ``z`` (N, latent_dim), observed ``obs`` (N, \*output_shape).

    Data: ``y`` of shape ``(N, *output_shape)`` (or one point ``output_shape``), or a dict
    ``{"y": y, "mask": mask}`` with ``mask`` of the same shape (or ``output_shape``, shared by all
    points), true where an entry is observed. Unobserved entries do not enter the likelihood and may
    be NaN.

    Args:
        generator: a torch module mapping ``(batch, latent_dim)`` to ``(batch, *output_shape)``, e.g. a
            trained GAN generator or a VAE decoder's mean network.
        latent_dim: size of ``z``; default: ``generator.latent_dim``, else the input size of its first
            ``nn.Linear``.
        noise: observation noise model; only ``"gaussian"`` for now.
        noise_scale: the noise's standard deviation σ (> 0), in the data's units.

    Shapes:
        ``generator``: ``(batch, latent_dim) -> (batch, *output_shape)``; :meth:`generate`: ``(..., latent_dim)
        -> (..., *output_shape)``, so ``generate(result.posterior["z"])`` is ``(chain, draw, N, *output_shape)``.

    Raises:
        ConfigError: ``generator`` is not a torch module (also when a run folder is loaded without
            ``model=``: the folder does not hold the generator's weights), ``latent_dim`` cannot be
            inferred or is not a positive integer, an unknown ``noise``, ``noise_scale`` <= 0.

    Example:
        >>> prior = GANPrior(nn.Linear(2, 3), noise_scale=0.5)
        >>> kwargs = prior.prepare({"y": [[1.0, float("nan"), 0.0]], "mask": [True, False, True]})
        >>> prior.latent_dim, prior.output_shape, kwargs["y"].shape, len(list(prior.parameters()))
        (2, (3,), torch.Size([1, 3]), 0)
    """

    def __init__(self, generator: nn.Module, latent_dim: int | None = None, *, noise: str = "gaussian",
                 noise_scale: float = 0.1) -> None:
        super().__init__()
        if not isinstance(generator, nn.Module):
            raise ConfigError(f"generator: must be a torch.nn.Module, got {type(generator).__name__} (a run folder "
                              "does not store the generator: pass model=GANPrior(generator, ...) to lk.load).")
        if noise not in NOISES:
            raise ConfigError(f"noise: unknown noise model {noise!r}; choose one of {list(NOISES)}.")
        if isinstance(noise_scale, bool) or not isinstance(noise_scale, (int, float, np.number)) or not (
                math.isfinite(noise_scale) and noise_scale > 0):
            raise ConfigError(f"noise_scale: must be a positive number, got {noise_scale!r}.")
        latent_dim = latent_dim_of(generator, latent_dim)
        self.latent_dim, self.noise, self.noise_scale = int(latent_dim), noise, float(noise_scale)
        # A frozen copy held as a plain attribute (not a submodule), as LatentPosterior does with a VAE:
        # no engine changes the weights, and constant weights let the MCMC engine trace the potential.
        object.__setattr__(self, "generator", copy.deepcopy(generator).requires_grad_(False).eval())
        reference = next(self.generator.parameters(), None)
        self._dtype = torch.get_default_dtype() if reference is None else reference.dtype
        try:
            with torch.no_grad():
                out = self.generator(torch.zeros(2, self.latent_dim, dtype=self._dtype))
        except Exception as error:  # noqa: BLE001 - any failure means the generator does not take (batch, latent_dim)
            raise DataError(f"generator: cannot take inputs of shape (batch, {self.latent_dim}) ({error}); "
                            "pass the right latent_dim.") from error
        if not isinstance(out, torch.Tensor) or out.dim() < 2 or out.shape[0] != 2:
            raise DataError("generator: must return a tensor (batch, *output_shape).")
        self.output_shape: tuple[int, ...] = tuple(out.shape[1:])
        self.init_args = {"generator": f"custom {type(generator).__name__}", "latent_dim": self.latent_dim,
                          "noise": noise, "noise_scale": self.noise_scale}

    # -- data -----------------------------------------------------------------------------------
    def prepare(self, data: Any) -> dict[str, Any]:
        """``{"y": (N, *output_shape), "mask": (N, *output_shape) bool}``; unobserved entries of y set to 0."""
        return masked_observations(data, self.output_shape, self._dtype, "the generator outputs")

    def dims(self, kwargs: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
        features = ("feature",) if len(self.output_shape) == 1 else tuple(
            f"obs_dim_{i}" for i in range(len(self.output_shape)))
        return {"z": ("obs_id", "latent"), "obs": ("obs_id",) + features}

    # -- model ----------------------------------------------------------------------------------
    def generate(self, z: Any) -> torch.Tensor:
        """G(z) for ``z`` of shape ``(..., latent_dim)`` (tensor or array), ``(..., *output_shape)``."""
        z = torch.as_tensor(z, dtype=self._dtype)
        if z.dim() == 0 or z.shape[-1] != self.latent_dim:
            raise DataError(f"z: expected shape (..., {self.latent_dim}), got {tuple(z.shape)}.")
        out = self.generator(z.reshape(-1, self.latent_dim))
        return out.reshape(z.shape[:-1] + out.shape[1:])

    def model(self, y: torch.Tensor, mask: torch.Tensor) -> None:
        zero = torch.zeros(self.latent_dim, dtype=y.dtype)
        with pyro.plate("data", y.shape[0]):
            z = pyro.sample("z", dist.Normal(zero, 1.0).to_event(1))
            likelihood = dist.Normal(self.generate(z), self.noise_scale).mask(mask)
            pyro.sample("obs", likelihood.to_event(len(self.output_shape)), obs=y)
