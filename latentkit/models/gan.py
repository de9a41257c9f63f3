"""A generative adversarial network: a generator and a discriminator, fitted by the adversarial engine."""

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from latentkit.errors import ConfigError, DataError
from latentkit.models.base import LatentModel
from latentkit.models.gan_prior import _positive_int, latent_dim_of

__all__ = ["GAN", "averaged_generator"]


def averaged_generator(generator: nn.Module, decay: float) -> AveragedModel:
    """A moving average of ``generator``'s weights, updated by ``update_parameters(generator)``.

    The decay is warmed up as ``min(decay, (1 + t) / (10 + t))`` at update t (the ``num_updates`` rule of
    TensorFlow's ``ExponentialMovingAverage``), so that the random initial weights are forgotten in short
    runs; buffers (e.g. batch-norm statistics, spectral-norm vectors) follow the generator's.
    """

    @torch.no_grad()
    def update(averages: list[torch.Tensor], current: list[torch.Tensor], count: torch.Tensor | int) -> None:
        # torch.optim.swa_utils.get_ema_multi_avg_fn has a fixed decay; this adds the warm-up.
        weight = 1.0 - min(decay, (1.0 + int(count)) / (10.0 + int(count)))
        for average, value in zip(averages, current, strict=True):
            average.lerp_(value, weight)

    average = AveragedModel(generator, multi_avg_fn=update)
    return average.requires_grad_(False)


class GAN(LatentModel):
    """A generator G and a discriminator (critic) D (Goodfellow et al. 2014), for ``engine="adversarial"``.

    ``lk.fit(GAN(G, D), X, engine="adversarial", loss=...)`` trains both networks in place against
    each other (see :class:`~latentkit.inference.AdversarialOptions` for the losses and defaults) and
    keeps an exponential moving average of the generator's weights in :attr:`ema_generator` (a
    :class:`torch.optim.swa_utils.AveragedModel`), which :meth:`sample` uses. A GAN has no likelihood,
    so the other engines refuse it. A run folder holds every weight: ``lk.load(dir)`` returns the result
    (without a model), and ``GAN(G, D).load_params(result)`` puts the weights back into new networks.

    Args:
        generator: a module mapping ``(batch, latent_dim)`` to ``(batch, *data_shape)``, e.g.
            :class:`latentkit.nn.Generator` or :class:`latentkit.nn.ConvGenerator`.
        discriminator: a module mapping ``(batch, *data_shape)`` to one real score per point, ``(batch,)``
            (or ``(batch, 1)``), e.g. :class:`latentkit.nn.Discriminator`; no sigmoid: the losses take logits.
        latent_dim: size of z; default ``generator.latent_dim``, else the input size of its first ``nn.Linear``.

    Shapes:
        data ``(N, *data_shape)``; ``z`` ~ Normal(0, I) of shape ``(n, latent_dim)``; :meth:`sample`
        returns ``(n, *data_shape)``. ``data_shape`` is read off the generator's output.

    Raises:
        ConfigError: a network is not a torch module, ``latent_dim`` cannot be inferred, the generator
            cannot take ``(batch, latent_dim)`` or the discriminator cannot score the generator's output.

    Example:
        >>> from latentkit.nn import Discriminator, Generator
        >>> gan = GAN(Generator(2, 3, hidden=(8,)), Discriminator(3, hidden=(8,)))
        >>> gan.latent_dim, gan.data_shape, tuple(gan.sample(5, seed=0).shape)
        (2, (3,), (5, 3))
        >>> import latentkit as lk
        >>> gan = lk.models.GAN(Generator(2, 3, hidden=(8,)), Discriminator(3, hidden=(8,)))
        >>> X = np.random.default_rng(0).normal(size=(100, 3))
        >>> res = lk.fit(gan, X, engine="adversarial", loss="hinge", steps=5, num_samples=4, progress=False)
        >>> res.posterior_predictive["x"].shape, res.losses.shape, res.params["losses.generator"].shape
        ((1, 4, 3), (5,), torch.Size([5]))
    """

    ema_generator: nn.Module | None

    def __init__(self, generator: nn.Module, discriminator: nn.Module, latent_dim: int | None = None) -> None:
        super().__init__()
        for name, net in (("generator", generator), ("discriminator", discriminator)):
            if not isinstance(net, nn.Module):
                raise ConfigError(f"{name}: must be a torch.nn.Module, got {type(net).__name__}.")
        latent_dim = latent_dim_of(generator, latent_dim)
        self.generator, self.discriminator, self.latent_dim = generator, discriminator, int(latent_dim)
        self.ema_generator = None
        reference = next(generator.parameters(), None)
        self.dtype = torch.get_default_dtype() if reference is None else reference.dtype
        self.data_shape = self._probe()
        self.init_args = {"generator": f"custom {type(generator).__name__}",
                          "discriminator": f"custom {type(discriminator).__name__}", "latent_dim": self.latent_dim}

    def _probe(self) -> tuple[int, ...]:
        """The generator's output shape, checked against the discriminator; both networks' modes are kept."""
        modes = [(m, m.training) for m in self.modules()]
        self.eval()
        try:
            with torch.no_grad():
                try:
                    fake = self.generator(torch.zeros(2, self.latent_dim, dtype=self.dtype))
                except Exception as error:  # noqa: BLE001 - any failure means it does not take (batch, latent_dim)
                    raise ConfigError(f"generator: cannot take inputs of shape (batch, {self.latent_dim}) ({error}); "
                                      "pass the right latent_dim.") from error
                if not isinstance(fake, torch.Tensor) or fake.dim() < 2 or fake.shape[0] != 2:
                    raise ConfigError("generator: must return a tensor (batch, *data_shape).")
                try:
                    score = self.discriminator(fake)
                except Exception as error:  # noqa: BLE001 - any failure means the two networks do not fit together
                    raise ConfigError(f"discriminator: cannot score the generator's output of shape "
                                      f"{tuple(fake.shape)} ({error}); make its input shape the generator's "
                                      "output shape.") from error
                if not isinstance(score, torch.Tensor) or score.shape not in ((2,), (2, 1)):
                    shape = tuple(score.shape) if isinstance(score, torch.Tensor) else type(score).__name__
                    raise ConfigError(f"discriminator: must return one score per point, (batch,) or (batch, 1); "
                                      f"got {shape} for a batch of 2.")
        finally:
            for module, training in modes:
                module.train(training)
        return tuple(fake.shape[1:])

    def prepare(self, data: Any) -> dict[str, torch.Tensor]:
        """``{"X": data}``, the data as a tensor ``(N, *data_shape)`` of the generator's dtype.

        Raises:
            DataError: not numeric, NaN or infinite values, empty, or points of another shape than the
                generator's output.
        """
        if isinstance(data, Mapping):
            raise DataError(f"data: the GAN takes one array (N, *{self.data_shape}), got a dict with keys "
                            f"{sorted(data)}.")
        if isinstance(data, torch.Tensor):
            array = data.detach().cpu().numpy()
        else:
            array = np.asarray(data.to_numpy() if isinstance(data, pd.DataFrame) else data)
        if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
            raise DataError(f"data: must be numeric, got dtype {array.dtype}.")
        if array.ndim != len(self.data_shape) + 1 or array.shape[1:] != self.data_shape:
            raise DataError(f"data: the generator outputs points of shape {self.data_shape}, so the data must have "
                            f"shape (N, *{self.data_shape}); got {array.shape}. Reshape the data or change the "
                            "generator's output shape.")
        if array.shape[0] < 2:
            raise DataError(f"data: needs at least 2 points, got {array.shape[0]}.")
        if not np.isfinite(array).all():
            raise DataError("data: contains NaN or infinite values; drop or impute those points.")
        return {"X": torch.as_tensor(array.astype(float), dtype=self.dtype)}

    def model(self, X: torch.Tensor) -> None:
        """Refuses: a GAN defines no likelihood, so engines that need a Pyro model (SVI, MCMC) cannot fit it."""
        raise ConfigError("engine: a GAN has no likelihood for SVI or MCMC; fit it with engine='adversarial' "
                          "(or place a trained generator in lk.models.GANPrior to infer its latent).")

    def generate(self, z: torch.Tensor, *, ema: bool = True) -> torch.Tensor:
        """G(z) without gradients, in evaluation mode, from the averaged generator (``ema=False``: the last
        weights; before any fit, the generator as it is).

        Shapes:
            ``z`` ``(n, latent_dim)`` → ``(n, *data_shape)``.
        """
        net = self.ema_generator if ema and self.ema_generator is not None else self.generator
        modes = [(m, m.training) for m in net.modules()]
        net.eval()
        try:
            with torch.no_grad():
                return net(z)
        finally:
            for module, mode in modes:
                module.train(mode)

    def sample(self, n: int, *, seed: int | None = None, ema: bool = True) -> torch.Tensor:
        """``n`` new points G(z), z ~ Normal(0, I), as :meth:`generate`; ``seed`` leaves the caller's random
        state untouched.

        Shapes:
            returns ``(n, *data_shape)``.
        """
        if not _positive_int(n):
            raise ConfigError(f"n: must be a positive integer, got {n!r}.")
        with torch.random.fork_rng():
            if seed is not None:
                torch.manual_seed(seed)
            z = torch.randn(int(n), self.latent_dim, dtype=self.dtype, device=self._device())
        return self.generate(z, ema=ema)

    def _device(self) -> torch.device:
        reference = next(self.generator.parameters(), None)
        return torch.device("cpu") if reference is None else reference.device

    def load_params(self, result: Any) -> "GAN":
        """Set the networks' weights (and the averaged generator) from a fitted result's ``params``, e.g.
        a result read back with ``lk.load``; returns the model.

        Raises:
            ConfigError: the result holds no GAN weights, or weights of other networks.
        """
        params = getattr(result, "params", None) or {}
        state = {k: v for k, v in params.items() if k.split(".", 1)[0] in ("generator", "discriminator",
                                                                           "ema_generator")}
        if not state:
            raise ConfigError("result: holds no GAN weights; pass the result of "
                              "lk.fit(GAN(...), engine='adversarial').")
        self.ema_generator = averaged_generator(self.generator, 0.0) if any(
            k.startswith("ema_generator.") for k in state) else None
        try:
            self.load_state_dict(state)
        except RuntimeError as error:
            raise ConfigError(f"result: its weights do not fit this GAN's networks ({error}); build the GAN with "
                              "the networks that were fitted.") from error
        return self
