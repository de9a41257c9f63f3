"""The forward algorithm of a discrete HMM, compiled by Numba, for recorded potentials on CPU.

Pyro's :class:`~pyro.distributions.DiscreteHMM` sums out its hidden states by adding the
transition and observation logits into a (..., T, K, K) tensor and reducing it with
``pyro.distributions.hmm._sequential_logmatmulexp``, a parallel scan in log space: log2(T) levels
of batched log-matrix-products. That is the right algorithm on a GPU. On a CPU, recorded as a graph,
it is about 400 small operations per potential and gradient at T = 1,000, K = 2 (1.2 ms for 4
chains, almost all of an HMM's NUTS step): each operation costs about half a microsecond of dispatch
however small its tensors, and PyTorch's elementwise kernels crawl over tensors whose last
dimensions are as small as K (the broadcast addition alone: 90 us; the sum that is its gradient:
150 us). Neither Pyro nor PyTorch has a fused kernel for it, so :func:`log_transition_product` is
written here: one sequential pass over time in probability space, with exact power-of-two
rescaling (no logarithm or exponential per step besides K for the observations), and its gradient
by the matching backward pass, each one custom operator that a recorded graph calls once.
:func:`recording_kernels` routes ``DiscreteHMM.log_prob`` through it while
:func:`~latentkit.inference.kernels.compile.compile_function` records a potential; the recorded
graph is then checked against the eager model (Pyro's own scan) as always.

Accuracy: equal to Pyro's scan up to rounding (relative 1e-13 at T = 1,000), except where one step
multiplies every path from an initial state by less than 2^-1000 relative to the step's largest
factor: that state's row of the product becomes 0 (log ``-inf``) where the scan keeps it finite.
For a ``DiscreteHMM`` that changes nothing unless it happens to every initial state at once (its
log-likelihood is the log-sum-exp over the rows), which takes transition probabilities below
e^-690.
"""

import contextlib
import functools
import math
import warnings
from collections.abc import Iterator

import numba
import numpy as np
import torch
from pyro.distributions import DiscreteHMM
from torch import Tensor

__all__ = ["log_transition_product", "recording_kernels"]

_jit = numba.njit(cache=True, nogil=True, fastmath=False)

# Rows are rescaled only once their largest magnitude leaves [2^-64, 2^64]: a step multiplies
# them by at most K, so this never overflows, and it underflows only where one step shrinks a row
# by more than 2^-1000.
_LOW, _HIGH = 2.0**-64, 2.0**64


@_jit
def _exponent(largest):
    """e such that dividing by 2^e brings ``largest`` (a row's largest magnitude) near 1, where
    it is outside [2^-64, 2^64]; else 0 (also for 0, infinities and NaN)."""
    if _LOW <= largest <= _HIGH or largest == 0.0 or not math.isfinite(largest):
        return 0
    return math.frexp(largest)[1]


@_jit
def _forward(transition, observation, trans_factors, obs_factors, prefixes, exponents, shifts):
    """The product over t of the matrices ``exp(transition[b, t] + observation[b, t, None, :])``.

    ``transition`` (B, T or 1, K, K), ``observation`` (B, T, K). Writes the factors
    ``trans_factors`` (B, T or 1, K, K) and ``obs_factors`` (B, T, K), each divided by its
    largest entry (per matrix, per time step); ``prefixes[b, t]`` (B, T + 1, K, K), the product of
    the first ``t`` matrices of factors with its row ``a`` divided by ``2^exponents[b, t, a]``
    (``exponents`` (B, T + 1, K)); ``shifts`` (B,), the sum of the logs of the factors' divisors.
    """
    batch, time, k = observation.shape
    steps = transition.shape[1]
    for b in range(batch):
        total_shift = 0.0
        for s in range(steps):
            shift = -np.inf
            for i in range(k):
                for j in range(k):
                    shift = max(shift, transition[b, s, i, j])  # NaN ignored: it stays in the factors
            shift = 0.0 if shift == -np.inf else shift  # a matrix of zeros stays zeros
            for i in range(k):
                for j in range(k):
                    trans_factors[b, s, i, j] = math.exp(transition[b, s, i, j] - shift)
            total_shift += shift * (time // steps)
        for a in range(k):
            for i in range(k):
                prefixes[b, 0, a, i] = 1.0 if a == i else 0.0
            exponents[b, 0, a] = 0
        for t in range(time):
            s = t if steps > 1 else 0
            shift = -np.inf
            for j in range(k):
                shift = max(shift, observation[b, t, j])
            shift = 0.0 if shift == -np.inf else shift
            for j in range(k):
                obs_factors[b, t, j] = math.exp(observation[b, t, j] - shift)
            total_shift += shift
            for a in range(k):
                largest = 0.0
                for j in range(k):
                    total = 0.0
                    for i in range(k):
                        total += prefixes[b, t, a, i] * trans_factors[b, s, i, j]
                    total *= obs_factors[b, t, j]
                    prefixes[b, t + 1, a, j] = total
                    largest = max(largest, abs(total))
                exponent = _exponent(largest)
                if exponent != 0:
                    factor = math.ldexp(1.0, -exponent)
                    for j in range(k):
                        prefixes[b, t + 1, a, j] *= factor
                exponents[b, t + 1, a] = exponents[b, t, a] + exponent
        shifts[b] = total_shift


@_jit
def _backward(grad_out, trans_factors, obs_factors, prefixes, exponents, grad_transition, grad_observation):
    """The gradients of ``sum(grad_out * log(product))`` by ``transition`` and ``observation``
    (their shapes), from :func:`_forward`'s outputs.

    With ``P`` the product, ``F_t`` matrix t, ``A_t`` the product of those before it, ``Z_t`` of
    those after it and ``W_t[j, a] = sum_b Z_t[j, b] grad_out[a, b] / P[a, b]``, the gradient by
    the logits of matrix ``t`` is ``F_t * (W_t A_t)^T``, and ``W_{t-1} = F_t W_t``. Each ``W``'s
    column ``a`` is kept divided by ``2^(scales[a] - exponents[T, a])`` and ``A_t``'s row by
    ``2^exponents[t, a]``: the factors' shifts cancel exactly, so nothing large is subtracted.
    """
    batch, time, k = obs_factors.shape
    steps = trans_factors.shape[1]
    weights = np.empty((k, k))
    previous = np.empty((k, k))
    scales = np.empty(k, dtype=np.int64)
    column = np.empty(k)
    for b in range(batch):
        for a in range(k):
            scales[a] = 0
            for j in range(k):
                # Entries of the product that are 0 (log -inf) carry no gradient.
                product = prefixes[b, time, a, j]
                weights[j, a] = grad_out[b, a, j] / product if product != 0.0 else 0.0
        for s in range(steps):
            for i in range(k):
                for j in range(k):
                    grad_transition[b, s, i, j] = 0.0
        for t in range(time - 1, -1, -1):
            s = t if steps > 1 else 0
            for a in range(k):
                column[a] = math.ldexp(1.0, exponents[b, t, a] + scales[a] - exponents[b, time, a])
            for j in range(k):
                total_j = 0.0
                for i in range(k):
                    total = 0.0
                    for a in range(k):
                        total += weights[j, a] * prefixes[b, t, a, i] * column[a]
                    grad = trans_factors[b, s, i, j] * obs_factors[b, t, j] * total
                    grad_transition[b, s, i, j] += grad
                    total_j += grad
                grad_observation[b, t, j] = total_j
            if t == 0:
                break
            for i in range(k):
                for a in range(k):
                    total = 0.0
                    for j in range(k):
                        total += trans_factors[b, s, i, j] * obs_factors[b, t, j] * weights[j, a]
                    previous[i, a] = total
            for a in range(k):
                largest = 0.0
                for i in range(k):
                    largest = max(largest, abs(previous[i, a]))
                exponent = _exponent(largest)
                factor = math.ldexp(1.0, -exponent)
                for i in range(k):
                    weights[i, a] = previous[i, a] * factor
                scales[a] += exponent


@torch.library.custom_op("latentkit::log_transition_product", mutates_args=(), device_types="cpu")
def _product(transition: Tensor, observation: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The log-product (B, K, K) and, for the backward pass, :func:`_forward`'s factors,
    prefixes and exponents. Takes (B, T or 1, K, K) and (B, T, K)."""
    batch, time, k = observation.shape
    dtype = observation.dtype
    transition = transition.detach().to(torch.float64).contiguous()
    observation = observation.detach().to(torch.float64).contiguous()
    trans_factors, obs_factors = torch.empty_like(transition), torch.empty_like(observation)
    prefixes = transition.new_empty((batch, time + 1, k, k))
    exponents = torch.empty((batch, time + 1, k), dtype=torch.int64)
    shifts = transition.new_empty(batch)
    _forward(*(tensor.numpy() for tensor in (transition, observation, trans_factors, obs_factors, prefixes,
                                             exponents, shifts)))
    scale = shifts.unsqueeze(-1) + exponents[:, -1].to(torch.float64) * math.log(2.0)
    out = prefixes[:, -1].log() + scale.unsqueeze(-1)
    return out.to(dtype), trans_factors, obs_factors, prefixes, exponents


@_product.register_fake
def _(transition: Tensor, observation: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    batch, time, k = observation.shape
    new, f64 = observation.new_empty, torch.float64
    return (new((batch, k, k)), new(transition.shape, dtype=f64), new(observation.shape, dtype=f64),
            new((batch, time + 1, k, k), dtype=f64), new((batch, time + 1, k), dtype=torch.int64))


@torch.library.custom_op("latentkit::log_transition_product_backward", mutates_args=(), device_types="cpu")
def _product_backward(grad_out: Tensor, trans_factors: Tensor, obs_factors: Tensor, prefixes: Tensor,
                      exponents: Tensor) -> tuple[Tensor, Tensor]:
    """The gradients by the transition and observation logits, from that by the log-product."""
    grad_transition, grad_observation = torch.empty_like(trans_factors), torch.empty_like(obs_factors)
    grad = grad_out.detach().to(torch.float64).contiguous()
    _backward(*(tensor.numpy() for tensor in (grad, trans_factors, obs_factors, prefixes, exponents,
                                              grad_transition, grad_observation)))
    return grad_transition.to(grad_out.dtype), grad_observation.to(grad_out.dtype)


@_product_backward.register_fake
def _(grad_out: Tensor, trans_factors: Tensor, obs_factors: Tensor, prefixes: Tensor,
      exponents: Tensor) -> tuple[Tensor, Tensor]:
    return (grad_out.new_empty(trans_factors.shape), grad_out.new_empty(obs_factors.shape))


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001 - torch.library's signature
    ctx.save_for_backward(*output[1:])


def _product_grad(ctx, grad_out: Tensor, *unused: Tensor) -> tuple[Tensor, Tensor]:  # noqa: ANN001
    return torch.ops.latentkit.log_transition_product_backward(grad_out, *ctx.saved_tensors)


_product.register_autograd(_product_grad, setup_context=_setup_context)


def log_transition_product(transition_logits: Tensor, observation_logits: Tensor) -> Tensor:
    """``log(M_0 @ M_1 @ ... @ M_{T-1})`` for ``M_t = exp(transition_logits[..., t, :, :] +
    observation_logits[..., t, None, :])``: what ``DiscreteHMM.log_prob`` computes with Pyro's
    ``_sequential_logmatmulexp``, differentiable once, computed in float64.

    Args:
        transition_logits: (..., T or 1, K, K) or (K, K), on CPU.
        observation_logits: (..., T, K), on CPU; the batch shapes broadcast.

    Returns:
        (..., K, K), in ``observation_logits``' dtype.

    Example:
        >>> transition = torch.tensor([[0.9, 0.1], [0.2, 0.8]]).log()
        >>> observation = torch.tensor([[0.5, 0.1], [0.3, 0.6]]).log()
        >>> steps = transition.exp() * observation.exp().unsqueeze(-2)  # (T, K, K)
        >>> torch.allclose(log_transition_product(transition, observation).exp(), steps[0] @ steps[1])
        True
    """
    time, k = observation_logits.shape[-2:]
    if transition_logits.dim() == 2:
        transition_logits = transition_logits.unsqueeze(-3)
    batch = torch.broadcast_shapes(transition_logits.shape[:-3], observation_logits.shape[:-2])
    step_shape = transition_logits.shape[-3:]
    transition = transition_logits.expand(batch + step_shape).reshape((-1,) + step_shape)
    observation = observation_logits.expand(batch + (time, k)).reshape(-1, time, k)
    return torch.ops.latentkit.log_transition_product(transition, observation)[0].reshape(batch + (k, k))


def _discrete_hmm_log_prob(hmm: DiscreteHMM, value: Tensor) -> Tensor:
    """``DiscreteHMM.log_prob`` (Pyro 1.9) with the time dimension eliminated by
    :func:`log_transition_product` instead of adding the logits and scanning."""
    if hmm._validate_args:
        hmm._validate_sample(value)
    observation_logits = hmm.observation_dist.log_prob(value.unsqueeze(-1 - hmm.observation_dist.event_dim))
    result = log_transition_product(hmm.transition_logits, observation_logits)
    return (hmm.initial_logits + result.logsumexp(-1)).logsumexp(-1)


def _fits(hmm: DiscreteHMM, value: Tensor) -> bool:
    """Whether :func:`_discrete_hmm_log_prob` takes these: on CPU, one transition matrix or one
    per time step."""
    steps = hmm.transition_logits.shape[-3] if hmm.transition_logits.dim() > 2 else 1
    time_dim = value.dim() - 1 - hmm.observation_dist.event_dim
    time = value.shape[time_dim] if time_dim >= 0 else 0
    return value.device.type == "cpu" and hmm.transition_logits.device.type == "cpu" and steps in (1, time)


@functools.cache
def _kernels_work() -> bool:
    """Whether Numba compiles (or loads from its cache) and runs the kernels here; once."""
    try:
        transition = torch.zeros(2, 2, dtype=torch.float64, requires_grad=True)
        log_transition_product(transition, torch.zeros(3, 2, dtype=torch.float64)).sum().backward()
    except Exception as error:  # noqa: BLE001 - a Numba that cannot compile: keep Pyro's scan
        warnings.warn(f"jit: the fused DiscreteHMM kernel is unavailable ({type(error).__name__}: {error}); HMMs "
                      "keep Pyro's parallel scan (slower on CPU).", stacklevel=4)
        return False
    return True


@contextlib.contextmanager
def recording_kernels() -> Iterator[None]:
    """Within the block, ``DiscreteHMM.log_prob`` sums out the hidden states with
    :func:`log_transition_product` where it can (CPU tensors; Pyro's scan elsewhere)."""
    if not _kernels_work():
        yield
        return
    pyro_log_prob = DiscreteHMM.log_prob

    def log_prob(hmm: DiscreteHMM, value: Tensor) -> Tensor:
        return _discrete_hmm_log_prob(hmm, value) if _fits(hmm, value) else pyro_log_prob(hmm, value)

    DiscreteHMM.log_prob = log_prob
    try:
        yield
    finally:
        DiscreteHMM.log_prob = pyro_log_prob
