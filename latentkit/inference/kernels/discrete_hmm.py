"""The forward algorithm of a discrete HMM and its gradient, compiled by Numba, for CPUs.

Pyro's :class:`~pyro.distributions.DiscreteHMM` sums out its hidden states by adding the
transition and observation logits into a (..., T, K, K) tensor and reducing it with
``pyro.distributions.hmm._sequential_logmatmulexp``, a parallel scan in log space: log2(T) levels
of batched log-matrix-products. That is the right algorithm on a GPU. On a CPU, recorded as a graph,
it is about 400 small operations per potential and gradient at T = 1,000, K = 2 (1.2 ms for 4
chains, almost all of an HMM's NUTS step): each operation costs about half a microsecond of dispatch
however small its tensors, and PyTorch's elementwise kernels crawl over tensors whose last
dimensions are as small as K (the broadcast addition alone: 90 us; the sum that is its gradient:
150 us). Neither Pyro nor PyTorch has a fused kernel for it, so :func:`forward_log_likelihood` is
written here: the forward algorithm in one sequential pass over time (O(T K^2), where the scan
multiplies K x K matrices), in probability space with exact power-of-two rescaling, and its gradient
by the matching backward pass; each one custom operator that a recorded graph calls once (the
benchmark HMM's potential and gradient: 1.2 -> 0.36 ms). :func:`fused_kernels` routes
``DiscreteHMM.log_prob`` through it while
:func:`~latentkit.inference.kernels.compile.compile_function` records a potential (and checks the
recording against the eager model run the same way) and while
:func:`~latentkit.inference.posterior.complete_result` computes each draw's log-likelihood
(benchmark HMM, 4,000 draws: 0.53 -> 0.15 s); latentkit's own HMMs use it on CPU always
(:func:`~latentkit.models.hmm_ops.log_likelihood`).

Accuracy: equal to Pyro's scan up to rounding (relative 1e-13 at T = 1,000; where the logits are
huge, as at NUTS's first steps, closer to an 80-bit reference than the scan), except where one
step multiplies the probability of every path so far by less than 2^-1000 relative to the step's
largest factor, i.e. transition probabilities below e^-690 are all that is left: the likelihood
then underflows to 0 (log ``-inf``) where the scan keeps it finite.
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

__all__ = ["forward_log_likelihood", "kernels_work", "fused_kernels"]

_jit = numba.njit(cache=True, nogil=True, fastmath=False)

# The forward variables are rescaled only once their largest magnitude leaves [2^-64, 2^64]: a
# step multiplies them by at most K, so this never overflows, and it underflows only where one
# step shrinks them by more than 2^-1000.
_LOW, _HIGH = 2.0**-64, 2.0**64
_LOG_2 = math.log(2.0)


@_jit
def _exponent(largest):
    """e such that dividing by 2^e brings ``largest`` near 1, where it is outside [2^-64, 2^64];
    else 0 (also for 0, infinities and NaN)."""
    if _LOW <= largest <= _HIGH or largest == 0.0 or not math.isfinite(largest):
        return 0
    return math.frexp(largest)[1]


@_jit
def _exp_shifted(logits, out):
    """``out = exp(logits - max(logits))`` (1-D); returns the max (0 where all are -inf). A NaN
    is ignored by the max and stays in ``out``."""
    shift = -np.inf
    for k in range(logits.shape[0]):
        shift = max(shift, logits[k])
    shift = 0.0 if shift == -np.inf else shift
    for k in range(logits.shape[0]):
        out[k] = math.exp(logits[k] - shift)
    return shift


@_jit
def _forward(initial, transition, observation, factors, alphas, exponents, log_p):
    """Forward variables of ``p(x) = sum_z exp(initial[z_0] + sum_t transition[t][z_t, z_{t+1}] +
    observation[t, z_{t+1}])``, the ``DiscreteHMM`` convention (the initial state precedes the first
    observation), for each of B sequences.

    ``initial`` (B, K), ``transition`` (B, T or 1, K, K), ``observation`` (B, T, K). Writes
    ``factors`` (B, 1 + (T or 1) * K + T, K): the exponentials of ``initial``, of each transition
    matrix (by rows) and of each observation step, each divided by its largest entry;
    ``alphas[b, t]`` (B, T + 1, K), the forward variable after ``t`` steps divided by
    ``2^exponents[b, t]`` (B, T + 1), the divisors' logs summing to ``shift``; and ``log_p`` (B,).
    """
    batch, time, k = observation.shape
    steps = transition.shape[1]
    obs_start = 1 + steps * k
    for b in range(batch):
        total_shift = _exp_shifted(initial[b], factors[b, 0])
        for s in range(steps):
            shift = -np.inf
            for i in range(k):
                for j in range(k):
                    shift = max(shift, transition[b, s, i, j])
            shift = 0.0 if shift == -np.inf else shift
            for i in range(k):
                for j in range(k):
                    factors[b, 1 + s * k + i, j] = math.exp(transition[b, s, i, j] - shift)
            total_shift += shift * (time // steps)
        for a in range(k):
            alphas[b, 0, a] = factors[b, 0, a]
        exponents[b, 0] = 0
        for t in range(time):
            row = 1 + (t if steps > 1 else 0) * k
            # _exp_shifted written out: its slices (array views) would cost a third of this loop.
            shift = -np.inf
            for j in range(k):
                shift = max(shift, observation[b, t, j])
            shift = 0.0 if shift == -np.inf else shift
            for j in range(k):
                factors[b, obs_start + t, j] = math.exp(observation[b, t, j] - shift)
            total_shift += shift
            largest = 0.0
            for j in range(k):
                total = 0.0
                for i in range(k):
                    total += alphas[b, t, i] * factors[b, row + i, j]
                total *= factors[b, obs_start + t, j]
                alphas[b, t + 1, j] = total
                largest = max(largest, abs(total))
            exponent = _exponent(largest)
            if exponent != 0:
                scale = math.ldexp(1.0, -exponent)
                for j in range(k):
                    alphas[b, t + 1, j] *= scale
            exponents[b, t + 1] = exponents[b, t] + exponent
        total = 0.0
        for j in range(k):
            total += alphas[b, time, j]
        log_p[b] = -np.inf if total == 0.0 else math.log(total) + total_shift + exponents[b, time] * _LOG_2


@_jit
def _backward(grad_out, factors, alphas, exponents, grad_initial, grad_transition, grad_observation):
    """Gradients of ``sum(grad_out * log p(x))`` by ``initial``, ``transition`` and
    ``observation`` (their shapes), from :func:`_forward`'s outputs.

    With ``F_t[i, j] = exp(transition[t][i, j] + observation[t, j])``, ``alpha_{t+1} = alpha_t
    F_t`` and ``beta_t = F_t beta_{t+1}`` (``beta_T = 1``), the gradient by the logit of ``F_t[i,
    j]`` is ``alpha_t[i] F_t[i, j] beta_{t+1}[j] / p`` and by ``initial[a]`` ``alpha_0[a]
    beta_0[a] / p``. ``beta`` is kept divided by ``2^scale``; every factor's shift cancels
    between numerator and ``p`` exactly, so only powers of two remain (nothing large is
    subtracted, whatever the logits' magnitude).
    """
    batch, time, k = grad_observation.shape
    steps = grad_transition.shape[1]
    obs_start = 1 + steps * k
    beta = np.empty(k)
    previous = np.empty(k)
    for b in range(batch):
        total = 0.0
        for j in range(k):
            total += alphas[b, time, j]
        grad_transition[b] = 0.0
        # grad_out / p, with p's power of two kept apart.
        weight = grad_out[b] / total if total != 0.0 else 0.0
        scale = 0
        for j in range(k):
            beta[j] = 1.0
        for t in range(time - 1, -1, -1):
            s = t if steps > 1 else 0
            row = 1 + s * k
            common = weight * math.ldexp(1.0, exponents[b, t] + scale - exponents[b, time])
            largest = 0.0
            for j in range(k):
                beta[j] *= factors[b, obs_start + t, j]  # now F_t's column factor times beta_{t+1}
                grad_observation[b, t, j] = 0.0
            for i in range(k):
                total = 0.0
                for j in range(k):
                    term = factors[b, row + i, j] * beta[j]
                    grad = alphas[b, t, i] * term * common
                    grad_transition[b, s, i, j] += grad
                    grad_observation[b, t, j] += grad
                    total += term
                previous[i] = total
                largest = max(largest, abs(total))
            exponent = _exponent(largest)
            factor = math.ldexp(1.0, -exponent)
            for i in range(k):
                beta[i] = previous[i] * factor
            scale += exponent
        common = weight * math.ldexp(1.0, scale - exponents[b, time])
        for a in range(k):
            grad_initial[b, a] = alphas[b, 0, a] * beta[a] * common


@torch.library.custom_op("latentkit::hmm_forward", mutates_args=(), device_types="cpu")
def _hmm_forward(initial: Tensor, transition: Tensor, observation: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """log p(x) (B,) and, for the backward pass, :func:`_forward`'s factors, forward variables and
    exponents. Takes (B, K), (B, T or 1, K, K) and (B, T, K)."""
    batch, time, k = observation.shape
    dtype = observation.dtype
    initial, transition, observation = (tensor.detach().to(torch.float64).contiguous()
                                        for tensor in (initial, transition, observation))
    factors = initial.new_empty((batch, 1 + transition.shape[1] * k + time, k))
    alphas = initial.new_empty((batch, time + 1, k))
    exponents = torch.empty((batch, time + 1), dtype=torch.int64)
    log_p = initial.new_empty(batch)
    _forward(*(tensor.numpy() for tensor in (initial, transition, observation, factors, alphas, exponents, log_p)))
    return log_p.to(dtype), factors, alphas, exponents


@_hmm_forward.register_fake
def _(initial: Tensor, transition: Tensor, observation: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    batch, time, k = observation.shape
    new, f64 = observation.new_empty, torch.float64
    return (new(batch), new((batch, 1 + transition.shape[1] * k + time, k), dtype=f64),
            new((batch, time + 1, k), dtype=f64), new((batch, time + 1), dtype=torch.int64))


@torch.library.custom_op("latentkit::hmm_forward_backward", mutates_args=(), device_types="cpu")
def _hmm_backward(grad_out: Tensor, factors: Tensor, alphas: Tensor, exponents: Tensor,
                  steps: int) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients by the initial (B, K), transition (B, steps, K, K) and observation (B, T, K)
    logits, from that by log p(x) (B,)."""
    batch, time, k = alphas.shape[0], alphas.shape[1] - 1, alphas.shape[2]
    new = factors.new_empty
    grads = (new((batch, k)), new((batch, steps, k, k)), new((batch, time, k)))
    grad = grad_out.detach().to(torch.float64).contiguous()
    _backward(*(tensor.numpy() for tensor in (grad, factors, alphas, exponents, *grads)))
    return tuple(tensor.to(grad_out.dtype) for tensor in grads)


@_hmm_backward.register_fake
def _(grad_out: Tensor, factors: Tensor, alphas: Tensor, exponents: Tensor,
      steps: int) -> tuple[Tensor, Tensor, Tensor]:
    batch, time, k = alphas.shape[0], alphas.shape[1] - 1, alphas.shape[2]
    new = grad_out.new_empty
    return new((batch, k)), new((batch, steps, k, k)), new((batch, time, k))


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001 - torch.library's signature
    ctx.steps = inputs[1].shape[1]
    ctx.save_for_backward(*output[1:])


def _hmm_grad(ctx, grad_out: Tensor, *unused: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # noqa: ANN001
    return torch.ops.latentkit.hmm_forward_backward(grad_out, *ctx.saved_tensors, ctx.steps)


_hmm_forward.register_autograd(_hmm_grad, setup_context=_setup_context)


@_hmm_forward.register_vmap
def _(info, in_dims: tuple[int | None, ...], *args: Tensor) -> tuple[tuple[Tensor, ...], tuple[int, ...]]:  # noqa: ANN001
    """Under ``torch.func.vmap`` the mapped dimension joins the batch: one call of the kernel."""
    size = info.batch_size
    flat = [(arg.movedim(dim, 0) if dim is not None else arg.expand((size,) + arg.shape)).flatten(0, 1)
            for arg, dim in zip(args, in_dims, strict=True)]
    outputs = torch.ops.latentkit.hmm_forward(*flat)
    return tuple(output.unflatten(0, (size, -1)) for output in outputs), (0, 0, 0, 0)


def forward_log_likelihood(initial_logits: Tensor, transition_logits: Tensor, observation_logits: Tensor) -> Tensor:
    """log p(x) of a discrete HMM with its states summed out, as ``DiscreteHMM.log_prob``: ``log
    sum_z exp(initial[z_0] + sum_t transition[t][z_t, z_{t+1}] + observation[t, z_{t+1}])`` (the
    initial state precedes the first observation). Differentiable once; computed in float64.

    Args:
        initial_logits: (..., K).
        transition_logits: (..., T or 1, K, K) or (K, K).
        observation_logits: (..., T, K), log p(x_t | z_t = k); all on CPU, batch shapes broadcast.

    Returns:
        (...), in ``observation_logits``' dtype.

    Example:
        >>> initial = torch.tensor([0.5, 0.5]).log()
        >>> transition = torch.tensor([[0.9, 0.1], [0.2, 0.8]]).log()
        >>> observation = torch.tensor([[0.5, 0.1], [0.3, 0.6]]).log()
        >>> steps = transition.exp() * observation.exp().unsqueeze(-2)  # (T, K, K)
        >>> expected = (initial.exp() @ steps[0] @ steps[1]).sum().log()
        >>> torch.allclose(forward_log_likelihood(initial, transition, observation), expected)
        True
    """
    time, k = observation_logits.shape[-2:]
    if transition_logits.dim() == 2:
        transition_logits = transition_logits.unsqueeze(-3)
    step_shape = transition_logits.shape[-3:]
    if step_shape[0] not in (1, time) or step_shape[1:] != (k, k) or initial_logits.shape[-1] != k:
        raise ValueError(f"forward_log_likelihood: transition_logits {tuple(transition_logits.shape)} must end in "
                         f"(1 or T, K, K) and initial_logits {tuple(initial_logits.shape)} in (K,) for "
                         f"observation_logits {tuple(observation_logits.shape)} ending in (T, K).")
    batch = torch.broadcast_shapes(initial_logits.shape[:-1], transition_logits.shape[:-3],
                                   observation_logits.shape[:-2])
    log_p = torch.ops.latentkit.hmm_forward(initial_logits.expand(batch + (k,)).reshape(-1, k),
                                            transition_logits.expand(batch + step_shape).reshape((-1,) + step_shape),
                                            observation_logits.expand(batch + (time, k)).reshape(-1, time, k))[0]
    return log_p.reshape(batch)


def _discrete_hmm_log_prob(hmm: DiscreteHMM, value: Tensor) -> Tensor:
    """``DiscreteHMM.log_prob`` (Pyro 1.9) by :func:`forward_log_likelihood` instead of adding the
    logits and scanning."""
    if hmm._validate_args:
        hmm._validate_sample(value)
    observation_logits = hmm.observation_dist.log_prob(value.unsqueeze(-1 - hmm.observation_dist.event_dim))
    return forward_log_likelihood(hmm.initial_logits, hmm.transition_logits, observation_logits)


def _fits(hmm: DiscreteHMM, value: Tensor) -> bool:
    """Whether :func:`_discrete_hmm_log_prob` takes these: on CPU, one transition matrix or one
    per time step."""
    steps = hmm.transition_logits.shape[-3] if hmm.transition_logits.dim() > 2 else 1
    time_dim = value.dim() - 1 - hmm.observation_dist.event_dim
    time = value.shape[time_dim] if time_dim >= 0 else 0
    return value.device.type == "cpu" and hmm.transition_logits.device.type == "cpu" and steps in (1, time)


@functools.cache
def kernels_work() -> bool:
    """Whether Numba compiles (or loads from its cache) and runs the kernels here; once.

    The kernels are called on NumPy arrays, so the check is the same under ``no_grad``, vmap or
    a graph recording, wherever it happens to run first.
    """
    try:
        batch, time, k = 1, 3, 2
        factors, alphas = np.empty((batch, 1 + k + time, k)), np.empty((batch, time + 1, k))
        exponents, log_p = np.empty((batch, time + 1), dtype=np.int64), np.empty(batch)
        _forward(np.zeros((batch, k)), np.zeros((batch, 1, k, k)), np.zeros((batch, time, k)), factors, alphas,
                 exponents, log_p)
        _backward(np.ones(batch), factors, alphas, exponents, np.empty((batch, k)), np.empty((batch, 1, k, k)),
                  np.empty((batch, time, k)))
    except Exception as error:  # noqa: BLE001 - a Numba that cannot compile: keep the tensor operations
        warnings.warn(f"jit: the fused HMM kernel is unavailable ({type(error).__name__}: {error}); HMM "
                      "likelihoods keep their tensor operations (slower on CPU).", stacklevel=3)
        return False
    return bool(np.isclose(log_p[0], (time + 1) * math.log(k)))  # 2 initial states, 2 choices per step


@contextlib.contextmanager
def fused_kernels() -> Iterator[None]:
    """Within the block, ``DiscreteHMM.log_prob`` sums out the hidden states with
    :func:`forward_log_likelihood` where it can (CPU tensors; Pyro's scan elsewhere)."""
    if not kernels_work():
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
