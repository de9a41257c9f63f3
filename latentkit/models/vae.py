"""Variational autoencoder: a Pyro model/guide pair whose networks come from :mod:`latentkit.nn`."""

import contextlib
import copy
import functools
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import arviz as az
import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.transforms import ConditionalAffineAutoregressive
from pyro.nn import ConditionalAutoRegressiveNN
from torch import nn

from latentkit.errors import ConfigError, DataError
from latentkit.models.base import LatentModel
from latentkit.nn import MADE, MLP, PixelCNN

__all__ = ["VAE", "ConditionalVAE", "LatentPosterior"]

LIKELIHOODS = ("bernoulli", "gaussian", "categorical")
GUIDES = ("gaussian", "iaf")

#: Elements (particles x points x decoder outputs) per decoder call in ``log_likelihood``:
#: 2**22 doubles are 32 MiB per tensor.
CHUNK_ELEMENTS = 2 ** 22
#: Active-unit threshold on Var_x(E_q[z_l | x]) (Burda et al. 2016).
ACTIVE_THRESHOLD = 0.01
#: The per-epoch monitors look at this many points at most, so that they cost little next to an epoch;
#: the variances behind active units are then within about sqrt(2 / 500) = 6% relative error.
MONITOR_POINTS = 500


def _positive_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1


@functools.cache
def monitored_rows(size: int) -> torch.Tensor:
    """Indices of at most ``MONITOR_POINTS`` evenly spaced points of ``size`` (cached: the monitors
    ask for the same rows after every epoch; do not modify the returned tensor)."""
    return torch.linspace(0, size - 1, min(size, MONITOR_POINTS)).round().long().unique()


def _kl_per_dim(loc: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """KL(N(loc, exp(log_scale)) || N(0, 1)) per dimension, averaged over the points (the first dimension)."""
    return (0.5 * ((2 * log_scale).exp() + loc.square() - 1) - log_scale).mean(0)


def _active_units(loc: torch.Tensor, threshold: float) -> torch.Tensor:
    """How many dimensions have Var_x(E_q[z_l | x]) > threshold (a 0-d tensor)."""
    return (loc.var(0) > threshold).sum()


def collapse_monitors(loc: torch.Tensor, log_scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """The per-epoch monitors ``kl_per_dim`` and ``active_units`` of the Gaussian q(z | x) with these
    parameters, ``(points, latent_dim)`` each (the distribution objects are skipped: this runs every epoch)."""
    return {"kl_per_dim": _kl_per_dim(loc, log_scale), "active_units": _active_units(loc, ACTIVE_THRESHOLD)}


def _batched(net: nn.Module, x: torch.Tensor, event_rank: int) -> torch.Tensor:
    """Apply ``net`` (which takes one batch dimension) to x with any number of batch dimensions."""
    if x.dim() == event_rank + 1:  # one batch dimension already: no reshapes (nor their autograd nodes)
        return net(x)
    batch = x.shape[:x.dim() - event_rank]
    out = net(x.reshape((-1,) + tuple(x.shape[len(batch):])))
    return out.reshape(batch + out.shape[1:])


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    if seed is None:
        yield
        return
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        yield


class VAE(LatentModel):
    r"""Variational autoencoder (Kingma & Welling 2014) with an amortised Gaussian guide.

    Model: ``z`` ~ Normal(0, I) and ``obs`` ~ p(x | decoder(z)) for each data point; guide:
    ``z`` ~ Normal(loc(x), scale(x)) with ``[loc, log scale] = encoder(x)``, optionally followed by
    ``flow_depth`` inverse autoregressive flows conditioned on x (``guide="iaf"``, Kingma et al.
    2016: Pyro's ``ConditionalAffineAutoregressive`` in its stable, gated form, orderings
    alternating natural and reversed). ``lk.fit(vae, X, engine="svi")`` trains the encoder and
    decoder together on the ELBO, using this guide (the SVI engine's default ``guide="auto"``
    takes a model's own guide); ``batch_size=`` gives minibatches. Keep ``num_samples`` small
    (e.g. 10): each posterior draw holds a ``z`` for every data point.

    Sites (stable names): ``z`` (N, latent_dim), observed ``obs`` (N, \*input_shape).

    Likelihoods:
        ``"bernoulli"``: data in [0, 1], decoder outputs logits. For values strictly between 0
        and 1 (e.g. grey levels) this is the usual cross-entropy, not a normalised density:
        binarise the data for log-likelihoods in nats.
        ``"gaussian"``: real data, decoder outputs means; one learned scale per data coordinate
        (parameter ``log_scale``).
        ``"categorical"``: integer data in ``0 .. n_categories - 1``; the encoder sees one-hot
        vectors and the decoder outputs logits per category.

    Args:
        input_dim: D for vector data (or give ``input_shape``).
        latent_dim: size of ``z`` (>= 1).
        input_shape: the shape of one data point, e.g. ``(1, 8, 8)`` for a
            :class:`~latentkit.nn.ConvEncoder`; data may also come flattened, ``(N, prod(shape))``.
        encoder: a module mapping ``(B, *input_shape)`` (categorical: ``(B, *input_shape,
            n_categories)`` one-hot) to ``(B, 2 * latent_dim)``; default an :class:`~latentkit.nn.MLP`
            on the flattened input with layers ``hidden``.
        decoder: a module mapping ``(B, latent_dim)`` to ``(B, *input_shape)`` (categorical:
            ``(B, *input_shape, n_categories)``), or an autoregressive network with
            ``context_dim=latent_dim`` for a likelihood that is not pixel-independent (Bernoulli or
            Gaussian): a :class:`~latentkit.nn.MADE` (vector data) or a
            :class:`~latentkit.nn.PixelCNN` (images); default an MLP with layers ``reversed(hidden)``.
        likelihood: ``"bernoulli"`` (default), ``"gaussian"`` or ``"categorical"``.
        hidden: hidden layer sizes of the default MLPs.
        n_categories: number of categories (categorical likelihood only).
        activation: activation of the default MLPs (a name, see :class:`~latentkit.nn.MLP`).
        guide: ``"gaussian"`` (default) or ``"iaf"`` (needs ``latent_dim`` >= 2).
        flow_depth: number of IAF steps (``guide="iaf"``).
        flow_hidden: hidden layer sizes of each IAF step's autoregressive network; default
            ``(3 * latent_dim + 1,)``, Pyro's default width.
        context_dim: size of a conditioning vector (0: none); see :class:`ConditionalVAE`.

    Shapes:
        data: ``(N, *input_shape)`` or ``(N, prod(input_shape))``.
        ``encode(x)``: a distribution with batch ``(N,)``, event ``(latent_dim,)``.
        ``decode(z)``: z ``(..., latent_dim)`` → a distribution with batch ``z.shape[:-1]``,
        event ``input_shape``.

    Raises:
        DataError: ``latent_dim`` < 1, a decoder whose output shape does not match the data, an
            encoder that cannot take ``input_shape``; in :meth:`prepare`: wrong data shape, NaN or
            infinite values, values outside [0, 1] (Bernoulli) or outside the categories.

    Example:
        >>> vae = VAE(input_dim=4, latent_dim=2, hidden=(8,))
        >>> sorted(vae.prepare(np.zeros((3, 4))))
        ['X', 'subsample_size']
        >>> vae.encode(torch.zeros(3, 4)).batch_shape, vae.sample(5).shape
        (torch.Size([3]), torch.Size([5, 4]))
    """

    def __init__(self, input_dim: int | None = None, latent_dim: int = 8, *,
                 input_shape: Sequence[int] | None = None, encoder: nn.Module | None = None,
                 decoder: nn.Module | None = None,
                 likelihood: Literal["bernoulli", "gaussian", "categorical"] = "bernoulli",
                 hidden: Sequence[int] = (256,), n_categories: int | None = None, activation: str = "relu",
                 guide: Literal["gaussian", "iaf"] = "gaussian", flow_depth: int = 2,
                 flow_hidden: Sequence[int] | None = None, context_dim: int = 0) -> None:
        super().__init__()
        if not isinstance(context_dim, (int, np.integer)) or isinstance(context_dim, bool) or context_dim < 0:
            raise ConfigError(f"context_dim: must be an integer >= 0, got {context_dim!r}.")
        self.context_dim = int(context_dim)
        if (input_dim is None) == (input_shape is None):
            raise ConfigError("input_dim: give exactly one of input_dim (vector data) and input_shape.")
        shape = (input_dim,) if input_shape is None else tuple(input_shape)
        if not shape or not all(_positive_int(s) for s in shape):
            given = input_dim if input_shape is None else input_shape
            raise ConfigError(f"input_shape: must be positive integers, got {given!r}.")
        if not _positive_int(latent_dim):
            raise DataError(f"latent_dim: must be an integer >= 1, got {latent_dim!r}.")
        if likelihood not in LIKELIHOODS:
            raise ConfigError(f"likelihood: must be one of {list(LIKELIHOODS)}, got {likelihood!r}.")
        if likelihood == "categorical" and not (_positive_int(n_categories) and n_categories >= 2):
            raise ConfigError(f"n_categories: the categorical likelihood needs n_categories >= 2, "
                              f"got {n_categories!r}.")
        if likelihood != "categorical" and n_categories is not None:
            raise ConfigError("n_categories: only for likelihood='categorical'.")
        if guide not in GUIDES:
            raise ConfigError(f"guide: must be one of {list(GUIDES)}, got {guide!r}.")
        if guide == "iaf" and (latent_dim < 2 or not _positive_int(flow_depth)):
            raise ConfigError(f"guide: 'iaf' needs latent_dim >= 2 and flow_depth >= 1, got latent_dim={latent_dim}, "
                              f"flow_depth={flow_depth!r}; use guide='gaussian'.")
        if not isinstance(activation, str):
            raise ConfigError("activation: give a name; for other activations pass your own encoder and decoder.")
        for name, part in (("encoder", encoder), ("decoder", decoder)):
            if isinstance(part, str):
                raise ConfigError(f"{name}: this VAE was saved with a custom {name} ({part}), which a run folder "
                                  "cannot rebuild; construct the VAE yourself and pass it: lk.load(path, model=vae).")
            if part is not None and not isinstance(part, nn.Module):
                raise ConfigError(f"{name}: must be a torch.nn.Module, got {type(part).__name__}.")
        self.input_shape = tuple(int(s) for s in shape)
        self.latent_dim = int(latent_dim)
        self.likelihood = likelihood
        self.n_categories = int(n_categories) if n_categories is not None else None
        categories = (self.n_categories,) if self.n_categories else ()
        self.encoder_input_shape = self.input_shape + categories
        self.decoder_output_shape = self.input_shape + categories
        # With a context, encoder and decoder take it concatenated to the flattened x and to z.
        size_in = math.prod(self.encoder_input_shape) + self.context_dim
        size_out = math.prod(self.decoder_output_shape)
        hidden = [int(h) for h in hidden]
        self.encoder = encoder if encoder is not None else nn.Sequential(
            nn.Flatten(), MLP([size_in, *hidden, 2 * self.latent_dim], activation))
        self.decoder = decoder if decoder is not None else nn.Sequential(
            MLP([self.latent_dim + self.context_dim, *reversed(hidden), size_out], activation),
            nn.Unflatten(1, self.decoder_output_shape))
        self.autoregressive = isinstance(self.decoder, (MADE, PixelCNN))
        if likelihood == "gaussian":
            self.log_scale = nn.Parameter(torch.zeros(self.input_shape))
        self.guide_kind = guide
        flow_hidden = [int(h) for h in (flow_hidden or (3 * self.latent_dim + 1,))] if guide == "iaf" else None
        self.flows = nn.ModuleList()
        for step in range(flow_depth if guide == "iaf" else 0):
            order = torch.arange(self.latent_dim)
            network = ConditionalAutoRegressiveNN(self.latent_dim, size_in, flow_hidden,
                                                  permutation=order.flip(0) if step % 2 else order)
            self.flows.append(ConditionalAffineAutoregressive(network, stable=True))
        self._check_networks()
        describe = lambda part: None if part is None else f"custom {type(part).__name__}"  # noqa: E731
        self.init_args = {"input_dim": input_dim if input_shape is None else None,
                          "latent_dim": self.latent_dim,
                          "input_shape": None if input_shape is None else list(self.input_shape),
                          "encoder": describe(encoder), "decoder": describe(decoder), "likelihood": likelihood,
                          "hidden": hidden, "n_categories": self.n_categories, "activation": activation,
                          "guide": guide, "flow_depth": int(flow_depth), "flow_hidden": flow_hidden}
        if self.context_dim:
            self.init_args["context_dim"] = self.context_dim

    def _reference(self) -> torch.Tensor:
        return next(self.parameters())

    def _encoder_event(self) -> tuple[int, ...]:
        """Shape of one encoder input: x (one-hot for categorical), flattened and followed by the context."""
        if self.context_dim:
            return (math.prod(self.encoder_input_shape) + self.context_dim,)
        return self.encoder_input_shape

    def _check_networks(self) -> None:
        ref = self._reference()
        with torch.no_grad():
            try:
                out = self.encoder(torch.zeros((2,) + self._encoder_event(), dtype=ref.dtype, device=ref.device))
            except Exception as error:  # noqa: BLE001 - any failure of the user's module is reported as such
                raise DataError(f"encoder: cannot take inputs of shape (batch, *{self._encoder_event()}) "
                                f"({type(error).__name__}: {error}); match input_shape to the encoder.") from error
            if tuple(out.shape) != (2, 2 * self.latent_dim):
                raise DataError(f"encoder: outputs shape {tuple(out.shape[1:])} per point, expected "
                                f"({2 * self.latent_dim},) = [loc, log scale] of latent_dim={self.latent_dim}.")
            if self.autoregressive:
                net, kind = self.decoder, type(self.decoder).__name__
                width = self.latent_dim + self.context_dim
                if tuple(net.event_shape) != self.input_shape or net.context_dim != width:
                    raise DataError(f"decoder: a {kind} over shape {tuple(net.event_shape)} with context_dim="
                                    f"{net.context_dim} does not match input_shape={self.input_shape} and "
                                    f"latent_dim + context_dim = {width}; build it for that shape with "
                                    f"context_dim={width}.")
                if net.likelihood != self.likelihood:
                    raise ConfigError(f"decoder: a {net.likelihood} {kind} with likelihood={self.likelihood!r}; "
                                      "make them agree.")
                return
            try:
                out = self.decoder(torch.zeros(2, self.latent_dim + self.context_dim, dtype=ref.dtype,
                                               device=ref.device))
            except Exception as error:  # noqa: BLE001
                raise DataError(f"decoder: cannot take inputs of shape (batch, {self.latent_dim + self.context_dim}) "
                                f"({type(error).__name__}: {error}); its input size must be latent_dim "
                                "(+ context_dim).") from error
            if tuple(out.shape) != (2,) + self.decoder_output_shape:
                raise DataError(f"decoder: outputs shape {tuple(out.shape[1:])} per point but the data have shape "
                                f"{self.decoder_output_shape}; make the decoder's output match input_shape.")

    # -- data ---------------------------------------------------------------------------------
    def as_tensor(self, data: Any, name: str = "data") -> torch.Tensor:
        """Validate data and return it as a tensor ``(N, *input_shape)`` in the model's dtype."""
        ref = self._reference()
        if isinstance(data, pd.DataFrame):
            data = data.to_numpy()
        if isinstance(data, torch.Tensor):
            X = data.detach().to(device=ref.device, dtype=ref.dtype)
        else:
            array = np.asarray(data)
            if array.dtype.kind not in "biuf":
                raise DataError(f"{name}: must be numeric, got dtype {array.dtype}.")
            X = torch.tensor(array, dtype=ref.dtype, device=ref.device)  # a copy: read-only arrays are fine
        shape, size = self.input_shape, math.prod(self.input_shape)
        if X.dim() == 2 and X.shape[1] == size and len(shape) > 1:
            X = X.reshape((X.shape[0],) + shape)
        if tuple(X.shape[1:]) != shape or X.dim() != len(shape) + 1:
            raise DataError(f"{name}: expected shape (N, *{shape}) or (N, {size}), got {tuple(X.shape)}; "
                            "reshape the data or set input_dim / input_shape to match it.")
        if X.shape[0] == 0:
            raise DataError(f"{name}: is empty; pass at least one data point.")
        if not torch.isfinite(X).all():
            raise DataError(f"{name}: contains NaN or infinite values; remove or impute them.")
        if self.likelihood == "bernoulli" and (X.min() < 0 or X.max() > 1):
            raise DataError(f"{name}: values must lie in [0, 1] for likelihood='bernoulli', got range "
                            f"[{float(X.min()):.4g}, {float(X.max()):.4g}]; scale the data (e.g. X / X.max()) "
                            "or use likelihood='gaussian'.")
        if self.likelihood == "categorical" and (
                (X != X.round()).any() or X.min() < 0 or X.max() > self.n_categories - 1):
            raise DataError(f"{name}: values must be integers in 0..{self.n_categories - 1} for "
                            "likelihood='categorical'; recode the data or raise n_categories.")
        return X

    def as_context(self, context: Any, n: int, name: str = "context") -> torch.Tensor | None:
        """Validate a context: ``(n, context_dim)`` vectors, or ``(n,)`` integer labels (one-hot encoded)."""
        if not self.context_dim:
            if context is not None:
                raise DataError(f"{name}: this VAE takes no context; use ConditionalVAE.")
            return None
        if context is None:
            raise DataError(f"{name}: a ConditionalVAE needs a context for each point: pass (X, context).")
        ref = self._reference()
        # torch.tensor copies: read-only arrays (e.g. from np.broadcast_to) are fine
        c = torch.tensor(np.asarray(context.detach().cpu() if isinstance(context, torch.Tensor) else context,
                                    dtype=float), dtype=ref.dtype, device=ref.device)
        if c.dim() == 1 and self.context_dim > 1:
            if ((c != c.round()) | (c < 0) | (c > self.context_dim - 1)).any():
                raise DataError(f"{name}: 1-D contexts are labels, integers in 0..{self.context_dim - 1}.")
            c = nn.functional.one_hot(c.long(), self.context_dim).to(ref.dtype)
        if c.dim() == 1:
            c = c[:, None]
        if tuple(c.shape) != (n, self.context_dim):
            raise DataError(f"{name}: expected shape ({n}, {self.context_dim}) (or ({n},) labels), "
                            f"got {tuple(c.shape)}.")
        if not torch.isfinite(c).all():
            raise DataError(f"{name}: contains NaN or infinite values.")
        return c

    def _split(self, data: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Data as ``(X, context)``: x alone, or a pair / a dict with keys "x" and "context"."""
        context = None
        if isinstance(data, Mapping):
            data, context = data.get("x"), data.get("context")
        elif isinstance(data, tuple) and len(data) == 2:
            data, context = data
        X = self.as_tensor(data)
        return X, self.as_context(context, X.shape[0])

    def prepare(self, data: Any) -> dict[str, Any]:
        X, context = self._split(data)
        # The model's argument is C, not "context": Pyro's messengers take a "context" argument.
        return {"X": X, "subsample_size": None} if context is None else {"X": X, "C": context, "subsample_size": None}

    def dims(self, kwargs: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
        features = ("feature",) if len(self.input_shape) == 1 else tuple(
            f"obs_dim_{i}" for i in range(len(self.input_shape)))
        return {"z": ("obs_id", "latent"), "obs": ("obs_id",) + features}

    # -- networks -----------------------------------------------------------------------------
    def _encoded(self, x: torch.Tensor, context: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The loc and log scale of the Gaussian part of q(z | x), each ``x batch + (latent_dim,)``, and
        the encoder's input (one-hot for categorical data, flattened and concatenated with the context
        for a conditional VAE)."""
        if self.likelihood == "categorical":
            x = nn.functional.one_hot(x.long(), self.n_categories).to(self._reference().dtype)
        if self.context_dim:
            if context is None:
                raise DataError("context: a ConditionalVAE encodes x together with its context.")
            batch = x.shape[:x.dim() - len(self.encoder_input_shape)]
            x = torch.cat([x.reshape(batch + (-1,)), context.expand(batch + context.shape[-1:])], -1)
        params = _batched(self.encoder, x, len(self._encoder_event()))
        return params[..., :self.latent_dim], params[..., self.latent_dim:], x

    def _gaussian(self, x: torch.Tensor, context: torch.Tensor | None = None
                  ) -> tuple[dist.Distribution, torch.Tensor]:
        """The Gaussian part of q(z | x) and the encoder's input (see :meth:`_encoded`)."""
        loc, log_scale, x = self._encoded(x, context)
        # Valid by construction (a positive scale); a NaN from the networks shows in the loss.
        return dist.Normal(loc, log_scale.exp(), validate_args=False).to_event(1), x

    def encode(self, x: torch.Tensor, context: torch.Tensor | None = None) -> dist.Distribution:
        """q(z | x[, context]): batch ``x.shape[:-len(input_shape)]``, event ``(latent_dim,)``; a
        Normal, or with ``guide="iaf"`` the Normal pushed through the flows conditioned on x."""
        base, x = self._gaussian(x, context)
        if not self.flows:
            return base
        flat = x.reshape(x.shape[:x.dim() - len(self._encoder_event())] + (-1,))
        return dist.TransformedDistribution(base, [flow.condition(flat) for flow in self.flows])

    def _posterior_point(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """A central z per point: q's mean (Gaussian guide), or its base mean through the flows."""
        q = self.encode(x, context)
        if not self.flows:
            return q.mean
        z = q.base_dist.mean
        for transform in q.transforms:
            z = transform(z)
        return z

    def _decoder_input(self, z: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        """z, concatenated with the context for a conditional VAE."""
        if not self.context_dim:
            return z
        if context is None:
            raise DataError("context: a ConditionalVAE decodes z together with its context.")
        batch = torch.broadcast_shapes(z.shape[:-1], context.shape[:-1])
        return torch.cat([z.expand(batch + z.shape[-1:]), context.expand(batch + context.shape[-1:])], -1)

    def decode(self, z: torch.Tensor, context: torch.Tensor | None = None) -> dist.Distribution:
        """p(x | z[, context]): batch ``z.shape[:-1]``, event ``input_shape``."""
        rank = len(self.input_shape)
        z = self._decoder_input(z, context)
        if self.autoregressive:
            # validate_args=False: Bernoulli data may be grey levels in [0, 1] (see the class docstring).
            return self.decoder.distribution(z, validate_args=False)
        out = _batched(self.decoder, z, 1)
        if self.likelihood == "bernoulli":
            return dist.Independent(dist.Bernoulli(logits=out, validate_args=False), rank, validate_args=False)
        if self.likelihood == "gaussian":
            return dist.Normal(out, self.log_scale.exp()).to_event(rank)
        return dist.Categorical(logits=out).to_event(rank)

    def prior(self) -> dist.Distribution:
        """p(z) = Normal(0, I), event ``(latent_dim,)``."""
        ref = self._reference()
        zero = torch.zeros(self.latent_dim, dtype=ref.dtype, device=ref.device)
        return dist.Normal(zero, torch.ones_like(zero)).to_event(1)

    # -- Pyro model and guide -----------------------------------------------------------------
    def model(self, X: torch.Tensor | None = None, C: torch.Tensor | None = None,
              subsample_size: int | None = None, num_points: int | None = None) -> None:
        """The Pyro model; ``C``: the contexts (conditional VAE). ``X`` may be None with
        ``num_points`` (or contexts) given, to simulate data."""
        N = X.shape[0] if X is not None else C.shape[0] if C is not None else int(num_points or 1)
        with pyro.plate("data", N, subsample_size=subsample_size) as index:
            z = pyro.sample("z", self.prior())
            pick = (lambda t: t if t is None or subsample_size is None else t[index])  # noqa: E731
            pyro.sample("obs", self.decode(z, pick(C)), obs=pick(X))

    def guide(self, X: torch.Tensor | None = None, C: torch.Tensor | None = None,
              subsample_size: int | None = None, num_points: int | None = None) -> None:
        """The amortised guide: ``z`` ~ q(z | x) for each (subsampled) data point."""
        if X is None:
            raise ConfigError("X: the guide encodes data; pass X.")
        with pyro.plate("data", X.shape[0], subsample_size=subsample_size) as index:
            pick = (lambda t: t if t is None or subsample_size is None else t[index])  # noqa: E731
            pyro.sample("z", self.encode(pick(X), pick(C)))

    # -- using a fitted VAE ---------------------------------------------------------------------
    def _mean(self, likelihood: dist.Distribution) -> torch.Tensor:
        if self.autoregressive:
            return likelihood.sample()
        base = likelihood.base_dist
        if self.likelihood == "bernoulli":
            return base.probs
        if self.likelihood == "gaussian":
            return base.loc
        return base.logits.argmax(-1).to(base.logits.dtype)

    def latent_posterior(self, data: Any) -> "LatentPosterior":
        """The exact posterior p(z | x) for the given data with the networks fixed, as a model that
        ``lk.fit(post, engine="nuts")`` samples (compare with :meth:`encode` for the amortisation gap)."""
        return LatentPosterior(self, data)

    @torch.no_grad()
    def reconstruct(self, data: Any) -> torch.Tensor:
        """The decoder's mean at the encoder's mean of z, ``(N, *input_shape)`` (categorical: the most
        probable category; autoregressive decoder: a draw)."""
        X, context = self._split(data)
        return self._mean(self.decode(self._posterior_point(X, context), context))

    @torch.no_grad()
    def decode_mean(self, z: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder's mean at z, ``z.shape[:-1] + input_shape`` (categorical: the most probable
        category; autoregressive decoder: a draw), as :meth:`reconstruct` shows it."""
        return self._mean(self.decode(z, context))

    def plots(self, result: Any) -> list[tuple[str, Any]]:
        """The run-folder plots of a fit of this VAE (see :mod:`latentkit.models.vae_plots`)."""
        from latentkit.models.vae_plots import vae_plots

        return vae_plots(result)

    @torch.no_grad()
    def sample(self, n: int, mean: bool = False, seed: int | None = None, context: Any = None) -> torch.Tensor:
        """``n`` new data points ``(n, *input_shape)`` from z ~ p(z): draws of p(x | z), or with
        ``mean=True`` its means (as :meth:`reconstruct`). A conditional VAE needs ``context``: one
        for all (a label or a ``(context_dim,)`` vector) or one per point."""
        if not _positive_int(n):
            raise ConfigError(f"n: must be a positive integer, got {n!r}.")
        if self.context_dim and context is not None:
            c = np.asarray(context.detach().cpu() if isinstance(context, torch.Tensor) else context, dtype=float)
            single = c.ndim == 0 or (c.ndim == 1 and self.context_dim > 1 and len(c) == self.context_dim)
            context = np.broadcast_to(c, (int(n),) + c.shape) if single else c
        context = self.as_context(context, int(n))
        with _seeded(seed):
            likelihood = self.decode(self.prior().sample((int(n),)), context)
            return self._mean(likelihood) if mean else likelihood.sample()

    def _log_weights(self, X: torch.Tensor, context: torch.Tensor | None, num_particles: int) -> Iterator[torch.Tensor]:
        """``log p(x, z_k) - log q(z_k | x)`` for z_k ~ q(z | x), in chunks ``(particles, N)`` of about
        ``CHUNK_ELEMENTS / (N * outputs per point)`` particles."""
        chunk = max(1, CHUNK_ELEMENTS // (X.shape[0] * math.prod(self.decoder_output_shape)))
        q = self.encode(X, context)
        prior = self.prior()
        for start in range(0, num_particles, chunk):
            z = q.sample((min(chunk, num_particles - start),))
            yield self.decode(z, context).log_prob(X) + prior.log_prob(z) - q.log_prob(z)

    @torch.no_grad()
    def log_likelihood(self, data: Any, num_particles: int = 1000, seed: int | None = None) -> torch.Tensor:
        """Importance-weighted estimate of log p(x) per data point, ``(N,)`` (Burda et al. 2016).

        ``log (1/K) sum_k p(x, z_k) / q(z_k | x)`` with z_k ~ q(z | x): a lower bound on log p(x)
        in expectation that tightens as ``num_particles`` K grows (K = 1 is the ELBO). Particles
        are drawn in chunks of about ``CHUNK_ELEMENTS / (N * outputs per point)``, so K may be
        thousands.
        """
        if not _positive_int(num_particles):
            raise ConfigError(f"num_particles: must be a positive integer, got {num_particles!r}.")
        X, context = self._split(data)
        total = None
        with _seeded(seed):
            for log_w in self._log_weights(X, context, num_particles):
                part = torch.logsumexp(log_w, 0)
                total = part if total is None else torch.logaddexp(total, part)
        return total - math.log(num_particles)

    @torch.no_grad()
    def pareto_k(self, data: Any, num_particles: int = 1000, seed: int | None = 0) -> np.ndarray:
        """Pareto k-hat per data point of the importance ratios p(x, z) / q(z | x), z ~ q(z | x),
        ``(N,)``: how well the amortised guide covers each point's posterior (Yao et al. 2018;
        ``az.psislw``). Below 0.5 the encoder fits p(z | x) well, up to 0.7 importance sampling
        corrects it (and :meth:`log_likelihood` is reliable), above 0.7 q misses posterior mass;
        -inf where the ratios are constant (q is the posterior)."""
        if not _positive_int(num_particles) or num_particles < 10:
            raise ConfigError(f"num_particles: k-hat needs at least 10 particles, got {num_particles!r}.")
        X, context = self._split(data)
        with _seeded(seed):
            log_w = torch.cat(list(self._log_weights(X, context, num_particles))).T.double().cpu().numpy()
        # Constant ratios (q equal to the posterior) leave nothing to fit: ArviZ returns inf or NaN there.
        constant = np.ptp(log_w, axis=1) < 1e-8 * np.maximum(1.0, np.abs(log_w).max(axis=1))
        with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # ArviZ's "k-hat too high" warning: we report k-hat
            _, khat = az.psislw(log_w, reff=1.0)
        return np.where(constant, -np.inf, np.asarray(khat, dtype=float))

    def elbo_loss(self, kwargs: Mapping[str, Any], index: torch.Tensor | None,
                  latent_scale: float = 1.0) -> torch.Tensor:
        """The one-particle ``Trace_ELBO`` loss of :meth:`model` and :meth:`guide` on the points
        ``index`` (None: all), scaled to the whole data, computed directly instead of through two
        Pyro traces (the SVI engine's fast path; equal to Pyro's value on the same random numbers).

        ``latent_scale`` multiplies the log-densities of ``z`` under the prior and the guide (KL
        warm-up). ``kwargs`` are :meth:`prepare`'s output.
        """
        X, C = kwargs["X"], kwargs.get("C")
        size = X.shape[0]
        if index is not None:
            X, C = X[index], (C[index] if C is not None else None)
        if self.flows:
            q = self.encode(X, C)
            z = q.rsample()
            latent = (self.prior().log_prob(z) - q.log_prob(z)).sum()
        else:
            # The Gaussian case written out, as a per-step hot path: z = loc + scale * eps with the draws
            # of Normal.rsample, and log N(z; 0, I) - log N(z; loc, scale) = sum 0.5 (eps^2 - z^2) + log scale.
            loc, log_scale, _ = self._encoded(X, C)
            eps = torch.randn_like(loc)
            z = loc + log_scale.exp() * eps
            latent = (0.5 * (eps.square() - z.square()) + log_scale).sum()
        if self.likelihood == "bernoulli" and not self.autoregressive:
            # Bernoulli(logits).log_prob is this same call with reduction="none"; summing inside it skips
            # the distribution objects and the (B, D) intermediate, the largest cost of this step.
            log_lik = -nn.functional.binary_cross_entropy_with_logits(
                _batched(self.decoder, self._decoder_input(z, C), 1), X, reduction="sum")
        else:
            log_lik = self.decode(z, C).log_prob(X).sum()
        if latent_scale != 1.0:
            latent = latent_scale * latent
        return -(size / X.shape[0]) * (log_lik + latent)

    def monitor(self, kwargs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Posterior-collapse monitors on ``kwargs`` (:meth:`prepare`'s output), which the SVI engine
        records after every epoch: ``kl_per_dim`` and ``active_units`` (Gaussian guide only; see
        :meth:`kl_per_dim`, :meth:`active_units`), on at most ``MONITOR_POINTS`` evenly spaced points."""
        if self.flows or kwargs["X"].shape[0] < 2:
            return {}
        rows = monitored_rows(kwargs["X"].shape[0])
        C = kwargs.get("C")
        loc, log_scale, _ = self._encoded(kwargs["X"][rows], None if C is None else C[rows])
        return collapse_monitors(loc, log_scale)

    def _gaussian_only(self, name: str, data: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The loc and log scale of q(z | x) on the data (Gaussian guide only)."""
        if self.flows:
            raise ConfigError(f"{name}: defined for the Gaussian guide; with guide='iaf' q(z | x) does not "
                              "factorise over latent dimensions.")
        return self._encoded(*self._split(data))[:2]

    @torch.no_grad()
    def kl_per_dim(self, data: Any) -> torch.Tensor:
        """KL(q(z_l | x) || N(0, 1)) per latent dimension l, averaged over data points,
        ``(latent_dim,)``; the sum is the ELBO's KL term per data point."""
        return _kl_per_dim(*self._gaussian_only("kl_per_dim", data))

    @torch.no_grad()
    def active_units(self, data: Any, threshold: float = ACTIVE_THRESHOLD) -> int:
        """Number of latent dimensions whose posterior mean varies with x: Var_x(E_q[z_l | x]) >
        ``threshold`` (Burda et al. 2016 use 0.01). Collapsed dimensions are inactive."""
        loc, _ = self._gaussian_only("active_units", data)
        if loc.shape[0] < 2:
            raise DataError("data: active units need at least two data points.")
        return int(_active_units(loc, threshold))


class ConditionalVAE(VAE):
    r"""A VAE of x given a context c (labels or any vector; Sohn et al. 2015): z ~ Normal(0, I),
    x ~ p(x | decoder([z, c])), with the guide q(z | encoder([flatten(x), c])).

    Data are pairs ``(X, context)`` (or a dict with keys ``"x"`` and ``"context"``); ``context``
    is ``(N, context_dim)``, or ``(N,)`` integer labels in ``0 .. context_dim - 1``, one-hot
    encoded. Every method that takes data takes such a pair; :meth:`sample` takes ``context=``.
    Custom networks take the concatenations: the encoder ``(B, prod(input_shape) + context_dim)``
    (categorical: one-hot x first), the decoder ``(B, latent_dim + context_dim)``, an autoregressive decoder
    ``context_dim = latent_dim + context_dim``.

    Sites (stable names): ``z`` (N, latent_dim), observed ``obs`` (N, \*input_shape).

    Args:
        input_dim, latent_dim, \*\*kwargs: as :class:`VAE`.
        context_dim: size of the context (>= 1; the number of classes for labels).

    Example:
        >>> cvae = ConditionalVAE(input_dim=4, latent_dim=2, context_dim=3, hidden=(8,))
        >>> sorted(cvae.prepare((np.zeros((5, 4)), np.arange(5) % 3)))
        ['C', 'X', 'subsample_size']
        >>> cvae.sample(2, context=1).shape
        torch.Size([2, 4])
    """

    def __init__(self, input_dim: int | None = None, latent_dim: int = 8, *, context_dim: int,
                 **kwargs: Any) -> None:
        if not _positive_int(context_dim):
            raise ConfigError(f"context_dim: must be an integer >= 1, got {context_dim!r}.")
        super().__init__(input_dim, latent_dim, context_dim=context_dim, **kwargs)


class LatentPosterior(LatentModel):
    """p(z | x) of a :class:`VAE` for fixed data, with its decoder fixed: a model for any engine.

    The VAE's model on the given data, with a frozen copy of the networks and no guide, so that
    no engine changes them: NUTS samples the exact posterior of ``z``, and SVI (guide ``"auto"``
    is then AutoNormal) fits a non-amortised Gaussian per data point. Samplers start at the
    encoder's means.

    Sites: ``z`` (N, latent_dim), observed ``obs`` (N, *input_shape), as in the VAE.

    Args:
        vae: a (fitted) VAE.
        data: the points x whose latent posterior is wanted, shape ``(N, *input_shape)``.

    Example:
        >>> vae = VAE(input_dim=4, latent_dim=2, hidden=(8,))
        >>> post = vae.latent_posterior(np.zeros((3, 4)))
        >>> post.prepare(None)["X"].shape, len(list(post.parameters()))
        (torch.Size([3, 4]), 0)
    """

    def __init__(self, vae: VAE, data: Any) -> None:
        super().__init__()
        if not isinstance(vae, VAE):
            raise ConfigError(f"vae: must be a latentkit VAE, got {type(vae).__name__}.")
        # A frozen copy, held as a plain attribute (not a submodule): no engine changes the networks,
        # and constant weights let the MCMC engine trace the potential with torch.jit.
        object.__setattr__(self, "vae", copy.deepcopy(vae).requires_grad_(False))
        self.X, self.context = vae._split(data)
        self.init_args = {"vae": dict(vae.init_args)}

    def prepare(self, data: Any = None) -> dict[str, Any]:
        """The bound data (``None``), or other data of the same form."""
        X, context = (self.X, self.context) if data is None else self.vae._split(data)
        return {"X": X} if context is None else {"X": X, "C": context}

    def model(self, X: torch.Tensor, C: torch.Tensor | None = None) -> None:
        self.vae.model(X, C)

    def dims(self, kwargs: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
        return self.vae.dims(kwargs)

    def initial_values(self, kwargs: Mapping[str, Any], seed: int) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {"z": self.vae._posterior_point(kwargs["X"], kwargs.get("C"))}
