"""Run vectorised HMC or NUTS chains: Stan-style warm-up, then sampling."""

import math
from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from latentkit.errors import ConfigError
from latentkit.inference.kernels import hmc, nuts
from latentkit.inference.kernels.adaptation import (
    build_adaptation_schedule,
    dual_averaging_init,
    dual_averaging_update,
    find_reasonable_step_size,
    welford_covariance,
    welford_init,
    welford_update,
)
from latentkit.inference.kernels.metrics import Metric, identity_metric, metric_from_inverse_mass
from latentkit.inference.kernels.state import HMCState, Info, PotentialAndGrad, init

__all__ = ["Chains", "run_chains"]

STAT_NAMES = ("lp", "acceptance_rate", "step_size", "n_steps", "tree_depth", "diverging", "energy")
# Static HMC's integration time when neither num_steps nor trajectory_length is given (Stan's
# int_time and NumPyro's trajectory_length defaults).
DEFAULT_TRAJECTORY_LENGTH = 2 * math.pi
# Statistics that are not in the dtype of the positions.
STAT_DTYPES = {"n_steps": torch.int64, "tree_depth": torch.int64, "diverging": torch.bool}


class Chains(NamedTuple):
    """Draws and per-draw statistics of ``C`` chains after warm-up.

    Attributes:
        samples: unconstrained positions.
        stats: per-draw statistics under ArviZ's ``sample_stats`` names: ``lp`` (minus the
            potential), ``acceptance_rate``, ``step_size``, ``n_steps``, ``tree_depth``,
            ``diverging`` and ``energy``; see :class:`~latentkit.inference.kernels.state.Info`.
        step_size: the adapted step size of each chain.
        inverse_mass_matrix: the adapted inverse mass matrix of each chain.

    Shapes:
        ``samples``: ``(chain, draw, D)``; each stat ``(chain, draw)``; ``step_size``:
        ``(chain,)``; ``inverse_mass_matrix``: ``(chain, D)`` or ``(chain, D, D)``.
    """

    samples: Tensor
    stats: dict[str, Tensor]
    step_size: Tensor
    inverse_mass_matrix: Tensor


def run_chains(
    potential_and_grad: PotentialAndGrad,
    init_position: Tensor,
    *,
    algorithm: Literal["nuts", "hmc"] = "nuts",
    num_warmup: int,
    num_samples: int,
    target_accept: float = 0.8,
    max_tree_depth: int = 10,
    num_steps: int | None = None,
    trajectory_length: float | None = None,
    step_size: float | None = None,
    adapt_step_size: bool = True,
    adapt_mass_matrix: bool = True,
    dense_mass: bool = False,
    generator: torch.Generator,
    progress: bool = False,
    callback: Callable[[int, Info], None] | None = None,
    should_stop: Callable[[int], bool] | None = None,
) -> Chains:
    """Warm up and run ``C`` chains of NUTS or static HMC in lock-step.

    Warm-up follows Stan: dual averaging of each chain's step size towards ``target_accept``
    in every warm-up iteration, and a diagonal or dense inverse mass matrix per chain estimated
    in doubling windows (see
    :func:`~latentkit.inference.kernels.adaptation.build_adaptation_schedule`), each window
    followed by a new step-size guess. Warm-up draws are discarded.

    Args:
        potential_and_grad: the batched potential (negative log density) and its gradient.
        init_position: the initial unconstrained position of each chain; the chains run on its
            device and in its dtype.
        algorithm: ``"nuts"`` or ``"hmc"`` (static HMC).
        num_warmup: the number of warm-up iterations.
        num_samples: the number of draws kept per chain.
        target_accept: the acceptance statistic that step-size adaptation aims for.
        max_tree_depth: NUTS's most doublings; for static HMC, a trajectory set by
            ``trajectory_length`` is capped at ``2**max_tree_depth - 1`` steps, NUTS's longest,
            so that a tiny step size early in warm-up cannot stall the run.
        num_steps: static HMC only: the number of leapfrog steps per transition.
        trajectory_length: static HMC only, instead of ``num_steps``: the integration time,
            giving each chain ``max(1, floor(trajectory_length / step_size))`` steps (Stan);
            ``2 * pi`` (Stan's and NumPyro's default) when neither is given. Beware that for a
            near-Gaussian target with a well adapted metric, times near multiples of ``pi``
            bring trajectories back to about ``-z`` or ``z``.
        step_size: the initial step size (default 1), kept as is without step-size adaptation.
        adapt_step_size: whether to adapt the step size during warm-up.
        adapt_mass_matrix: whether to adapt the inverse mass matrix during warm-up.
        dense_mass: whether the inverse mass matrix is dense rather than diagonal.
        generator: the source of all randomness, on the device of ``init_position``; the same
            seed gives bit-identical results on the same device.
        progress: whether to show a progress bar.
        callback: called as ``callback(iteration, info)`` after each warm-up and sampling
            iteration, iterations counted from 0 across both.
        should_stop: asked as ``should_stop(iteration)`` after each iteration (counted as for
            ``callback``); when it returns True the run ends there and the draws completed so
            far are returned (none when it stops during warm-up).

    Returns:
        The draws, their statistics and the adapted step size and inverse mass matrix.

    Raises:
        ConfigError: for an option value out of range or a wrong combination of options.

    Shapes:
        ``init_position``: ``(C, D)``; see :class:`Chains` for the results.

    Example:
        >>> import torch
        >>> def potential(z):
        ...     return 0.5 * (z**2).sum(-1), z
        >>> chains = run_chains(potential, torch.zeros(2, 3), num_warmup=50, num_samples=20,
        ...                     generator=torch.Generator().manual_seed(0))
        >>> chains.samples.shape, chains.stats["diverging"].shape
        (torch.Size([2, 20, 3]), torch.Size([2, 20]))
    """
    _check_options(
        init_position,
        algorithm,
        num_warmup,
        num_samples,
        target_accept,
        max_tree_depth,
        num_steps,
        trajectory_length,
        step_size,
    )
    num_chains = init_position.shape[0]
    dtype, device = init_position.dtype, init_position.device
    init_position = init_position.detach()
    state = init(init_position, potential_and_grad)
    metric = identity_metric(init_position, dense=dense_mass)
    step_sizes = torch.full(
        (num_chains,), 1.0 if step_size is None else step_size, dtype=dtype, device=device
    )
    max_num_steps = 2**max_tree_depth - 1
    integration_time = DEFAULT_TRAJECTORY_LENGTH if trajectory_length is None else trajectory_length
    finfo = torch.finfo(dtype)

    def transition(state: HMCState, metric: Metric, step_sizes: Tensor) -> tuple[HMCState, Info]:
        if algorithm == "nuts":
            return nuts.step(
                generator,
                state,
                potential_and_grad=potential_and_grad,
                metric=metric,
                step_size=step_sizes,
                max_tree_depth=max_tree_depth,
            )
        if num_steps is not None:
            steps: int | Tensor = num_steps
        else:
            steps = (integration_time / step_sizes).floor().clamp(1, max_num_steps).long()
        return hmc.step(
            generator,
            state,
            potential_and_grad=potential_and_grad,
            metric=metric,
            step_size=step_sizes,
            num_steps=steps,
        )

    def reasonable_step_size(state: HMCState, metric: Metric, step_sizes: Tensor) -> Tensor:
        return find_reasonable_step_size(
            generator,
            state,
            potential_and_grad=potential_and_grad,
            metric=metric,
            step_size=step_sizes,
        )

    with tqdm(total=num_warmup + num_samples, disable=None if progress else True, desc="warmup") as bar:
        if adapt_step_size and num_warmup > 0:
            step_sizes = reasonable_step_size(state, metric, step_sizes)
        dual_averaging = dual_averaging_init(step_sizes)
        schedule = build_adaptation_schedule(num_warmup)
        slow_windows = schedule[1:-1] if adapt_mass_matrix else []
        welford = welford_init(init_position, dense=dense_mass)
        for iteration in range(num_warmup):
            state, info = transition(state, metric, step_sizes)
            if adapt_step_size:
                dual_averaging = dual_averaging_update(
                    dual_averaging, info.acceptance_rate, target_accept
                )
                log_step_size = (
                    dual_averaging.log_step_size_avg
                    if iteration == num_warmup - 1
                    else dual_averaging.log_step_size
                )
                step_sizes = log_step_size.exp().clamp(finfo.tiny, finfo.max)
            window = next((w for w in slow_windows if w.start <= iteration <= w.end), None)
            if window is not None:
                welford = welford_update(welford, state.position)
                if iteration == window.end:
                    metric = metric_from_inverse_mass(welford_covariance(welford))
                    welford = welford_init(init_position, dense=dense_mass)
                    if adapt_step_size:
                        step_sizes = reasonable_step_size(state, metric, step_sizes)
                        dual_averaging = dual_averaging_init(step_sizes)
            if callback is not None:
                callback(iteration, info)
            bar.update()
            if should_stop is not None and should_stop(iteration):
                num_samples = 0
                break

        bar.set_description("sample")
        samples = torch.empty(
            num_chains, num_samples, init_position.shape[1], dtype=dtype, device=device
        )
        stats = {
            name: torch.empty(
                num_chains, num_samples, dtype=STAT_DTYPES.get(name, dtype), device=device
            )
            for name in STAT_NAMES
        }
        for draw in range(num_samples):
            state, info = transition(state, metric, step_sizes)
            samples[:, draw] = state.position
            stats["lp"][:, draw] = -state.potential_energy
            stats["step_size"][:, draw] = step_sizes
            for name, value in info._asdict().items():
                stats[name][:, draw] = value
            if callback is not None:
                callback(num_warmup + draw, info)
            bar.update()
            if should_stop is not None and should_stop(num_warmup + draw) and draw + 1 < num_samples:
                samples = samples[:, : draw + 1]
                stats = {name: value[:, : draw + 1] for name, value in stats.items()}
                break
    return Chains(samples, stats, step_sizes, metric.inverse_mass_matrix)


def _check_options(
    init_position: Tensor,
    algorithm: str,
    num_warmup: int,
    num_samples: int,
    target_accept: float,
    max_tree_depth: int,
    num_steps: int | None,
    trajectory_length: float | None,
    step_size: float | None,
) -> None:
    """Raise a :class:`ConfigError` naming the first bad option."""
    if init_position.dim() != 2 or not init_position.is_floating_point():
        raise ConfigError(
            "init_position: expected a floating-point tensor of shape (num_chains, dim), got "
            f"{init_position.dtype} of shape {tuple(init_position.shape)}."
        )
    if algorithm not in ("nuts", "hmc"):
        raise ConfigError(f"algorithm: expected 'nuts' or 'hmc', got {algorithm!r}.")
    if num_warmup < 0 or num_samples < 0:
        raise ConfigError(
            f"num_warmup, num_samples: expected non-negative counts, got {num_warmup} and "
            f"{num_samples}."
        )
    if not 0.0 < target_accept < 1.0:
        raise ConfigError(f"target_accept: expected a value in (0, 1), got {target_accept}.")
    if max_tree_depth < 1:
        raise ConfigError(f"max_tree_depth: expected at least 1, got {max_tree_depth}.")
    if step_size is not None and not step_size > 0.0:
        raise ConfigError(f"step_size: expected a positive value, got {step_size}.")
    if algorithm == "nuts":
        if num_steps is not None or trajectory_length is not None:
            raise ConfigError(
                "num_steps, trajectory_length: these set static HMC's trajectories; NUTS "
                "chooses its own. Pass algorithm='hmc' or leave them out."
            )
        return
    if num_steps is not None and trajectory_length is not None:
        raise ConfigError(
            "num_steps, trajectory_length: static HMC takes one of them, got "
            f"num_steps={num_steps} and trajectory_length={trajectory_length}."
        )
    if num_steps is not None and num_steps < 1:
        raise ConfigError(f"num_steps: expected at least 1, got {num_steps}.")
    if trajectory_length is not None and not trajectory_length > 0.0:
        raise ConfigError(f"trajectory_length: expected a positive value, got {trajectory_length}.")
