"""Warm-up adaptation of the step size and the mass matrix, per chain and batched over chains.

Stan's scheme (Stan Reference Manual, "HMC algorithm parameters"), as NumPyro implements it:
dual averaging of the log step size towards a target acceptance statistic throughout warm-up;
Welford estimates of the posterior (co)variance in a series of doubling windows between an
initial and a terminal buffer, each ending with a new inverse mass matrix, a new step-size guess
and a restart of dual averaging.
"""

import math
from typing import NamedTuple

import torch
from torch import Tensor

from latentkit.inference.kernels.integrators import IntegratorState, leapfrog
from latentkit.inference.kernels.metrics import Metric, kinetic_energy, sample_momentum, velocity
from latentkit.inference.kernels.state import HMCState, PotentialAndGrad

__all__ = [
    "AdaptationWindow",
    "DualAveragingState",
    "WelfordState",
    "build_adaptation_schedule",
    "dual_averaging_init",
    "dual_averaging_update",
    "find_reasonable_step_size",
    "welford_covariance",
    "welford_init",
    "welford_update",
]

# Dual averaging constants of Hoffman & Gelman (2014), section 3.2.1, also Stan's defaults.
DUAL_AVERAGING_GAMMA = 0.05
DUAL_AVERAGING_T0 = 10
DUAL_AVERAGING_KAPPA = 0.75
# Stan's warm-up windows: initial fast buffer, first slow window, terminal fast buffer.
INITIAL_BUFFER = 75
BASE_WINDOW = 25
TERMINAL_BUFFER = 50
# Stan shrinks the windows to these fractions of num_warmup when the defaults do not fit, and
# adapts no metric below this many warm-up iterations.
INITIAL_BUFFER_FRACTION = 0.15
TERMINAL_BUFFER_FRACTION = 0.1
MIN_WARMUP_FOR_METRIC = 20
# Acceptance probability that find_reasonable_step_size aims to cross (Stan and NumPyro use 0.8).
REASONABLE_ACCEPTANCE = 0.8
# Bound on the halvings or doublings of find_reasonable_step_size (a factor of 2**100 ~ 1e30
# either way); Stan and NumPyro stop only at the floating-point limits.
MAX_STEP_SIZE_SEARCH = 100


class DualAveragingState(NamedTuple):
    """Dual averaging of the log step size, one scheme per chain.

    Attributes:
        log_step_size: the current iterate ``x_t``, the log step size to use next.
        log_step_size_avg: the weighted average of the iterates, the final log step size.
        gradient_avg: the running average of ``target_accept - acceptance_rate``.
        iteration: ``t``, the number of updates since the last (re)start.
        prox_center: ``mu``, the point the iterates shrink towards, ``log(10 * step_size0)``.

    Shapes:
        tensors ``(C,)``.
    """

    log_step_size: Tensor
    log_step_size_avg: Tensor
    gradient_avg: Tensor
    iteration: Tensor
    prox_center: Tensor


def dual_averaging_init(step_size: Tensor) -> DualAveragingState:
    """Start dual averaging from an initial step size, with ``mu = log(10 * step_size)``.

    Shapes:
        ``step_size``: ``(C,)``.

    Example:
        >>> state = dual_averaging_init(torch.tensor([0.1]))
        >>> round(float(state.prox_center.exp()), 6)
        1.0
    """
    # log(10) + log(eps) rather than log(10 * eps), which overflows for huge eps (NumPyro).
    prox_center = math.log(10.0) + step_size.log()
    zeros = torch.zeros_like(step_size)
    return DualAveragingState(step_size.log(), zeros, zeros, zeros, prox_center)


def dual_averaging_update(
    state: DualAveragingState, acceptance_rate: Tensor, target_accept: float
) -> DualAveragingState:
    """One dual averaging update from the acceptance statistic of the last transition.

    Implements equation (6) of Hoffman & Gelman (2014): with ``g_t = target - accept``,
    ``gbar_t = (1 - 1/(t + t0)) gbar_{t-1} + g_t / (t + t0)``,
    ``x_t = mu - sqrt(t) / gamma * gbar_t`` and
    ``xbar_t = t^-kappa x_t + (1 - t^-kappa) xbar_{t-1}``.

    Args:
        state: the current dual averaging state.
        acceptance_rate: the acceptance statistic of each chain's last transition.
        target_accept: the acceptance statistic to reach.

    Shapes:
        ``acceptance_rate``: ``(C,)``.

    Example:
        >>> state = dual_averaging_init(torch.tensor([1.0, 1.0]))
        >>> state = dual_averaging_update(state, torch.tensor([0.2, 1.0]), 0.8)
        >>> bool(state.log_step_size[0] < state.log_step_size[1])
        True
    """
    iteration = state.iteration + 1
    weight = 1.0 / (iteration + DUAL_AVERAGING_T0)
    gradient_avg = (1.0 - weight) * state.gradient_avg + weight * (target_accept - acceptance_rate)
    log_step_size = state.prox_center - iteration.sqrt() / DUAL_AVERAGING_GAMMA * gradient_avg
    avg_weight = iteration**-DUAL_AVERAGING_KAPPA
    log_step_size_avg = (1.0 - avg_weight) * state.log_step_size_avg + avg_weight * log_step_size
    return DualAveragingState(
        log_step_size, log_step_size_avg, gradient_avg, iteration, state.prox_center
    )


class WelfordState(NamedTuple):
    """Welford's running mean and sum of squared deviations, per chain.

    Attributes:
        mean: the running mean.
        m2: the running sum of squared deviations (diagonal) or of outer products (dense).
        count: the number of samples seen by each chain.

    Shapes:
        ``mean``: ``(C, D)``; ``m2``: ``(C, D)`` or ``(C, D, D)``.
    """

    mean: Tensor
    m2: Tensor
    count: Tensor


def welford_init(position: Tensor, *, dense: bool) -> WelfordState:
    """An empty estimator shaped for ``position``'s chains.

    Shapes:
        ``position``: ``(C, D)``.

    Example:
        >>> welford_init(torch.zeros(4, 3), dense=True).m2.shape
        torch.Size([4, 3, 3])
    """
    mean = torch.zeros_like(position)
    m2 = torch.diag_embed(mean) if dense else torch.zeros_like(position)
    return WelfordState(mean, m2, torch.zeros_like(position[:, 0]))


def welford_update(state: WelfordState, sample: Tensor) -> WelfordState:
    """Add one sample per chain (Knuth, TAOCP vol. 2, section 4.2.2).

    Shapes:
        ``sample``: ``(C, D)``.

    Example:
        >>> state = welford_init(torch.zeros(1, 1), dense=False)
        >>> for x in (1.0, 2.0, 4.0):
        ...     state = welford_update(state, torch.tensor([[x]]))
        >>> welford_covariance(state, regularize=False)
        tensor([[2.3333]])
    """
    count = state.count + 1
    delta_before = sample - state.mean
    mean = state.mean + delta_before / count.unsqueeze(-1)
    delta_after = sample - mean
    if state.m2.dim() == 2:
        m2 = state.m2 + delta_before * delta_after
    else:
        m2 = state.m2 + delta_before.unsqueeze(-1) * delta_after.unsqueeze(-2)
    return WelfordState(mean, m2, count)


def welford_covariance(state: WelfordState, *, regularize: bool = True) -> Tensor:
    """The sample (co)variance, optionally shrunk towards ``1e-3`` times the identity as in Stan.

    Stan's regularisation (``stan/mcmc/windowed_adaptation``, ``diag_e_adaptation``):
    ``n / (n + 5) * cov + 1e-3 * 5 / (n + 5) * I``.

    Args:
        state: an estimator that has seen at least two samples.
        regularize: whether to apply Stan's shrinkage.

    Shapes:
        returns ``(C, D)`` (diagonal) or ``(C, D, D)`` (dense, symmetrised).

    Example:
        >>> state = welford_init(torch.zeros(1, 1), dense=False)
        >>> for x in (1.0, 3.0):
        ...     state = welford_update(state, torch.tensor([[x]]))
        >>> welford_covariance(state)  # (2 / 7) * 2 + 1e-3 * 5 / 7
        tensor([[0.5721]])
    """
    count = state.count.reshape(state.count.shape + (1,) * (state.m2.dim() - 1))
    covariance = state.m2 / (count - 1)
    if covariance.dim() == 3:
        covariance = 0.5 * (covariance + covariance.mT)
    if not regularize:
        return covariance
    # Stan's shrinkage: 5 pseudo-samples of variance 1e-3.
    covariance = (count / (count + 5.0)) * covariance
    shrinkage = 1e-3 * 5.0 / (count + 5.0)
    if covariance.dim() == 2:
        return covariance + shrinkage
    return covariance + shrinkage * torch.eye(
        covariance.shape[-1], dtype=covariance.dtype, device=covariance.device
    )


class AdaptationWindow(NamedTuple):
    """Warm-up iterations ``start`` to ``end``, both included."""

    start: int
    end: int


def build_adaptation_schedule(num_warmup: int) -> list[AdaptationWindow]:
    """Stan's warm-up windows: an initial buffer, doubling slow windows, a terminal buffer.

    The mass matrix is estimated in the slow windows (all but the first and last returned
    windows) and updated at the end of each. With the defaults (75 + 25 + 50 iterations) too
    large for ``num_warmup``, the buffers shrink to 15 % and 10 % of ``num_warmup``, the rest
    going to one slow window; below 20 iterations there is a single window and no mass-matrix
    adaptation. A slow window that would leave less than twice its size before the terminal
    buffer is stretched to reach it.

    Args:
        num_warmup: the number of warm-up iterations.

    Returns:
        Contiguous windows covering ``0 .. num_warmup - 1``.

    Example:
        >>> [tuple(w) for w in build_adaptation_schedule(1000)]
        [(0, 74), (75, 99), (100, 149), (150, 249), (250, 449), (450, 949), (950, 999)]
    """
    if num_warmup == 0:
        return []
    if num_warmup < MIN_WARMUP_FOR_METRIC:
        return [AdaptationWindow(0, num_warmup - 1)]
    initial_buffer, base_window, terminal_buffer = INITIAL_BUFFER, BASE_WINDOW, TERMINAL_BUFFER
    if initial_buffer + base_window + terminal_buffer > num_warmup:
        initial_buffer = int(INITIAL_BUFFER_FRACTION * num_warmup)
        terminal_buffer = int(TERMINAL_BUFFER_FRACTION * num_warmup)
        base_window = num_warmup - initial_buffer - terminal_buffer
    schedule = [AdaptationWindow(0, initial_buffer - 1)]
    terminal_start = num_warmup - terminal_buffer
    start, size = initial_buffer, base_window
    while start < terminal_start:
        if 3 * size <= terminal_start - start:
            next_size = 2 * size
        else:
            size = next_size = terminal_start - start
        schedule.append(AdaptationWindow(start, start + size - 1))
        start, size = start + size, next_size
    schedule.append(AdaptationWindow(terminal_start, num_warmup - 1))
    return schedule


def find_reasonable_step_size(
    generator: torch.Generator,
    state: HMCState,
    *,
    potential_and_grad: PotentialAndGrad,
    metric: Metric,
    step_size: Tensor,
) -> Tensor:
    """Double or halve each chain's step size until one leapfrog step crosses 80 % acceptance.

    The heuristic of Hoffman & Gelman (2014), algorithm 4, with Stan's threshold of 0.8: the
    direction is fixed by the first trial (up if ``exp(-dH) > 0.8``, down otherwise) and the
    search stops at the first step size on the other side. Each trial draws a new momentum.
    A chain whose energy error is never acceptable (e.g. a non-finite potential) stops after
    ``MAX_STEP_SIZE_SEARCH`` halvings.

    Args:
        generator: the source of the momenta.
        state: the chains' current state.
        potential_and_grad: the batched potential.
        metric: the per-chain metric.
        step_size: the per-chain starting step size.

    Shapes:
        ``step_size``: ``(C,)``; returns ``(C,)``.

    Example:
        >>> from latentkit.inference.kernels.metrics import identity_metric
        >>> from latentkit.inference.kernels.state import init
        >>> def potential(z):
        ...     return 0.5 * (z / 0.01).square().sum(-1), z / 0.01**2
        >>> state = init(torch.zeros(2, 1), potential)
        >>> step_size = find_reasonable_step_size(
        ...     torch.Generator().manual_seed(0), state, potential_and_grad=potential,
        ...     metric=identity_metric(state.position, dense=False), step_size=torch.ones(2))
        >>> bool(((step_size > 1e-3) & (step_size < 1e-1)).all())
        True
    """
    num_chains, dim = state.position.shape
    dtype, device = state.position.dtype, state.position.device
    finfo = torch.finfo(dtype)
    log_threshold = math.log(REASONABLE_ACCEPTANCE)
    direction = torch.zeros(num_chains, dtype=dtype, device=device)
    searching = torch.ones(num_chains, dtype=torch.bool, device=device)
    for _ in range(MAX_STEP_SIZE_SEARCH):
        noise = torch.randn(num_chains, dim, generator=generator, dtype=dtype, device=device)
        momentum = sample_momentum(metric, noise)
        start = IntegratorState(
            state.position,
            momentum,
            state.potential_energy,
            state.potential_grad,
            velocity(metric, momentum),
        )
        end = leapfrog(potential_and_grad, metric, start, step_size)
        delta = (
            end.potential_energy
            + kinetic_energy(end.momentum, end.velocity)
            - state.potential_energy
            - kinetic_energy(momentum, start.velocity)
        ).nan_to_num(math.inf, posinf=math.inf)
        trial_direction = 2.0 * (-delta > log_threshold).to(dtype) - 1.0
        direction = torch.where(direction == 0, trial_direction, direction)
        proposed = step_size * torch.exp2(direction)
        searching = (
            searching
            & (trial_direction == direction)
            & (proposed > finfo.tiny)
            & (proposed < finfo.max)
        )
        step_size = torch.where(searching, proposed, step_size)
        if not bool(searching.any()):
            break
    return step_size
