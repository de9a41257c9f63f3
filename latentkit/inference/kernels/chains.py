"""Run vectorised HMC or NUTS chains: Stan-style warm-up, then sampling, each chain at its own pace."""

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor
from torch.utils import _pytree as pytree
from tqdm.auto import tqdm

from latentkit.errors import ConfigError
from latentkit.inference.kernels import hmc, nuts
from latentkit.inference.kernels.adaptation import (
    DualAveragingState,
    WelfordState,
    build_adaptation_schedule,
    dual_averaging_init,
    dual_averaging_update,
    find_reasonable_step_size,
    welford_covariance,
    welford_init,
    welford_update,
)
from latentkit.inference.kernels.compile import Backend, TensorPacking, compile_function, points_around
from latentkit.inference.kernels.metrics import Metric, identity_metric, metric_from_inverse_mass
from latentkit.inference.kernels.state import HMCState, Info, PotentialAndGrad, init, select_where

__all__ = ["Chains", "run_chains"]

STAT_NAMES = ("lp", "acceptance_rate", "step_size", "n_steps", "tree_depth", "diverging", "energy")
# Static HMC's integration time when neither num_steps nor trajectory_length is given (Stan's
# int_time and NumPyro's trajectory_length defaults).
DEFAULT_TRAJECTORY_LENGTH = 2 * math.pi
# Statistics that are not in the dtype of the positions.
STAT_DTYPES = {"n_steps": torch.int64, "tree_depth": torch.int64, "diverging": torch.bool}
# Eager NUTS steps from the last of those points at which the compiled step is checked too.
COMPILE_CHECK_STEPS = 8


class Chains(NamedTuple):
    """Draws and per-draw statistics of ``C`` chains after warm-up.

    Attributes:
        samples: unconstrained positions.
        stats: per-draw statistics under ArviZ's ``sample_stats`` names: ``lp`` (minus the
            potential), ``acceptance_rate``, ``step_size``, ``n_steps``, ``tree_depth``,
            ``diverging`` and ``energy``; see :class:`~latentkit.inference.kernels.state.Info`.
        step_size: the adapted step size of each chain.
        inverse_mass_matrix: the adapted inverse mass matrix of each chain.
        compiled: the backend that compiled the potential (with the whole NUTS step where Numba
            does not run the tree), False if it ran eagerly.

    Shapes:
        ``samples``: ``(chain, draw, D)``; each stat ``(chain, draw)``; ``step_size``:
        ``(chain,)``; ``inverse_mass_matrix``: ``(chain, D)`` or ``(chain, D, D)``.
    """

    samples: Tensor
    stats: dict[str, Tensor]
    step_size: Tensor
    inverse_mass_matrix: Tensor
    compiled: Backend | Literal[False] = False


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
    should_stop: Callable[[int], bool] | None = None,
    jit: Backend | Literal[False] = False,
) -> Chains:
    """Warm up and run ``C`` chains of NUTS or static HMC, each at its own pace.

    Warm-up follows Stan: dual averaging of each chain's step size towards ``target_accept``
    in every warm-up iteration, and a diagonal or dense inverse mass matrix per chain estimated
    in doubling windows (see
    :func:`~latentkit.inference.kernels.adaptation.build_adaptation_schedule`), each window
    followed by a new step-size guess. Warm-up draws are discarded.

    Chains do not wait for each other: NUTS advances every chain by one leapfrog step per call
    (:func:`~latentkit.inference.kernels.nuts.advance`), and each chain adapts, records its draw
    and starts its next transition when its own transition ends; the run stops when the slowest
    chain has made ``num_warmup + num_samples`` transitions. Static HMC makes one transition of
    every chain per call.

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
        should_stop: asked as ``should_stop(iteration)`` whenever every chain has completed
            iteration ``iteration`` (counted from 0 across warm-up and sampling); when it returns
            True the run ends there and the draws every chain completed are returned (none when
            it stops during warm-up).
        jit: compile with this backend (see
            :func:`~latentkit.inference.kernels.compile.compile_function`; the potential must
            then be traceable Python, not itself compiled): on CPU the potential alone, beside
            NUTS's tree bookkeeping compiled by Numba
            (:class:`~latentkit.inference.kernels.nuts_numba.FusedNuts`), elsewhere (or without
            Numba) the whole NUTS step, potential included, as one graph; and the warm-up
            adaptation updates (TorchScript). False runs everything eagerly.

    Returns:
        The draws, their statistics, the adapted step size and inverse mass matrix, and the
        backend that compiled the potential.

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
    num_chains, dim = init_position.shape
    dtype, device = init_position.dtype, init_position.device
    init_position = init_position.detach()
    state = init(init_position, potential_and_grad)
    metric = identity_metric(init_position, dense=dense_mass)
    step_sizes = torch.full(
        (num_chains,), 1.0 if step_size is None else step_size, dtype=dtype, device=device
    )
    finfo = torch.finfo(dtype)
    total = num_warmup + num_samples
    advance, compiled, potential_and_grad = _transition_function(
        potential_and_grad, state, metric, step_sizes, generator, algorithm=algorithm,
        max_tree_depth=max_tree_depth, num_steps=num_steps, trajectory_length=trajectory_length, jit=jit,
    )

    def reasonable_step_size(state: HMCState, metric: Metric, step_sizes: Tensor) -> Tensor:
        return find_reasonable_step_size(
            generator,
            state,
            potential_and_grad=potential_and_grad,
            metric=metric,
            step_size=step_sizes,
        )

    def adaptation_update(
        warm: Tensor, iteration: Tensor, acceptance_rate: Tensor, position: Tensor, step_sizes: Tensor,
        dual_averaging: DualAveragingState, welford: WelfordState,
    ) -> tuple[Tensor, DualAveragingState, WelfordState, Tensor]:
        """Dual averaging and Welford updates of the chains ``warm`` that just ended warm-up transition
        ``iteration``; also returns which of them close a mass-matrix window."""
        if adapt_step_size:
            updated = dual_averaging_update(dual_averaging, acceptance_rate, target_accept)
            dual_averaging = select_where(warm, updated, dual_averaging)
            log_step_size = torch.where(
                iteration == num_warmup - 1, updated.log_step_size_avg, updated.log_step_size
            )
            step_sizes = torch.where(warm, log_step_size.exp().clamp(finfo.tiny, finfo.max), step_sizes)
        closing = torch.zeros_like(warm)
        if adapt_mass_matrix:
            at = iteration.clamp(max=num_warmup - 1)
            windowed = warm & in_window[at]
            welford = select_where(windowed, welford_update(welford, position), welford)
            closing = windowed & window_end[at]
        return step_sizes, dual_averaging, welford, closing

    def adapt(
        warm: Tensor, iteration: Tensor, state: HMCState, info: Info, step_sizes: Tensor,
        dual_averaging: DualAveragingState, welford: WelfordState, metric: Metric,
    ) -> tuple[Tensor, DualAveragingState, WelfordState, Metric]:
        """Warm-up adaptation of the chains ``warm`` that just ended warm-up transition ``iteration``."""
        step_sizes, dual_averaging, welford, closing = update(
            warm, iteration, info.acceptance_rate, state.position, step_sizes, dual_averaging, welford
        )
        if bool(closing.any()):
            metric = select_where(closing, metric_from_inverse_mass(welford_covariance(welford)), metric)
            welford = select_where(closing, welford_init(init_position, dense=dense_mass), welford)
            if adapt_step_size:
                step_sizes = torch.where(closing, reasonable_step_size(state, metric, step_sizes), step_sizes)
                dual_averaging = select_where(closing, dual_averaging_init(step_sizes), dual_averaging)
        return step_sizes, dual_averaging, welford, metric

    if adapt_step_size and num_warmup > 0:
        step_sizes = reasonable_step_size(state, metric, step_sizes)
    dual_averaging = dual_averaging_init(step_sizes)
    # Per warm-up iteration: whether it lies in a slow window (mass-matrix estimation), whether
    # it ends one. Each chain looks up its own iteration.
    in_window = torch.zeros(max(num_warmup, 1), dtype=torch.bool, device=device)
    window_end = torch.zeros_like(in_window)
    if adapt_mass_matrix:
        for window in build_adaptation_schedule(num_warmup)[1:-1]:
            in_window[window.start : window.end + 1] = True
            window_end[window.end] = True
    welford = welford_init(init_position, dense=dense_mass)
    # Called whenever a warming chain ends a transition (thousands of times): compiled with the step.
    update = adaptation_update
    if jit and num_warmup > 0:
        warm = torch.arange(num_chains, device=device) % 2 == 0
        examples = [(warm ^ flip, torch.full((num_chains,), at, device=device), state.potential_energy.exp().clamp(
            max=1.0), state.position + at, step_sizes, dual_averaging, welford)
            for flip, at in ((False, 0), (True, num_warmup - 1), (False, num_warmup // 2))]
        # TorchScript even with jit="inductor": seconds of C++ compilation would not pay for this small graph.
        update = _compile_tree_function(adaptation_update, examples, backend="torchscript") or adaptation_update
    samples = torch.empty(num_chains, num_samples, dim, dtype=dtype, device=device)
    stats = {
        name: torch.empty(num_chains, num_samples, dtype=STAT_DTYPES.get(name, dtype), device=device)
        for name in STAT_NAMES
    }
    # Transitions each chain has completed; chains run on until the slowest has done ``total``.
    # ``completed`` and ``furthest`` (slowest and fastest chain) let the loop skip adaptation
    # once every chain samples and recording while every chain warms up.
    iteration = torch.zeros(num_chains, dtype=torch.int64, device=device)
    completed = furthest = 0
    with tqdm(total=total, disable=None if progress else True, desc="warmup") as bar:
        while completed < total:
            state, ends, info = advance(state, metric, step_sizes)
            # On CPU this check costs no device synchronisation; it skips the bookkeeping below
            # for the steps (most of them, with NUTS) that end no chain's transition.
            if not bool(ends.any()):
                continue
            done = ends & (iteration < total)
            if completed < num_warmup:
                step_sizes, dual_averaging, welford, metric = adapt(
                    done & (iteration < num_warmup), iteration, state, info, step_sizes, dual_averaging, welford,
                    metric,
                )
            if furthest >= num_warmup:
                kept = done & (iteration >= num_warmup)
                chains = kept.nonzero().squeeze(-1)
                draws = iteration[chains] - num_warmup
                samples[chains, draws] = state.position[chains]
                stats["lp"][chains, draws] = -state.potential_energy[chains]
                stats["step_size"][chains, draws] = step_sizes[chains]
                for name, value in info._asdict().items():
                    stats[name][chains, draws] = value[chains]
            iteration = iteration + done
            now, furthest = (int(value) for value in iteration.aminmax())
            if now > completed:
                bar.update(now - completed)
                if completed < num_warmup <= now:
                    bar.set_description("sample")
                stopping = should_stop is not None and should_stop(now - 1)
                completed = now
                if stopping and completed < total:
                    break
    kept_draws = max(completed - num_warmup, 0)
    if kept_draws < num_samples:
        samples = samples[:, :kept_draws]
        stats = {name: value[:, :kept_draws] for name, value in stats.items()}
    return Chains(samples, stats, step_sizes, metric.inverse_mass_matrix, compiled)


Advance = Callable[[HMCState, Metric, Tensor], tuple[HMCState, Tensor, Info]]


def _transition_function(
    potential_and_grad: PotentialAndGrad,
    state: HMCState,
    metric: Metric,
    step_sizes: Tensor,
    generator: torch.Generator,
    *,
    algorithm: Literal["nuts", "hmc"],
    max_tree_depth: int,
    num_steps: int | None,
    trajectory_length: float | None,
    jit: Backend | Literal[False],
) -> tuple[Advance, Backend | Literal[False], PotentialAndGrad]:
    """``advance(state, metric, step_sizes) -> (state, ends, info)``: the unit of work of the run,
    after which ``ends`` says which chains ended a transition (``info`` holds its statistics).

    For NUTS one leapfrog step of every chain (:func:`~latentkit.inference.kernels.nuts.advance`):
    with ``jit`` on CPU the tree bookkeeping in Numba's loops and the potential compiled alone
    (:func:`_fused_nuts`), else compiled with ``jit`` into one graph, potential included; for
    static HMC one transition of every chain. Also returns the backend that compiled the
    potential (False: eager) and the potential for the rest of the run (compiled where it was
    compiled on its own).
    """
    if algorithm == "hmc":
        max_num_steps = 2**max_tree_depth - 1
        integration_time = DEFAULT_TRAJECTORY_LENGTH if trajectory_length is None else trajectory_length

        def hmc_transition(state: HMCState, metric: Metric, step_sizes: Tensor) -> tuple[HMCState, Tensor, Info]:
            steps = num_steps if num_steps is not None else (
                (integration_time / step_sizes).floor().clamp(1, max_num_steps).long())
            state, info = hmc.step(generator, state, potential_and_grad=potential_and_grad, metric=metric,
                                   step_size=step_sizes, num_steps=steps)
            return state, torch.ones_like(info.diverging), info

        return hmc_transition, False, potential_and_grad

    if jit and state.position.device.type == "cpu":
        fused = _fused_nuts(potential_and_grad, state, metric, generator, max_tree_depth, jit)
        if fused is not None:
            return fused
    # The leaf takes and returns the tree as a few stacked tensors (TensorPacking), so that the
    # run loop does no per-field work and a compiled leaf has few inputs and outputs; the
    # unpacking and packing inside are recorded into the graph.
    tree, metric_spec = nuts.start_tree(state, max_tree_depth), pytree.tree_flatten(metric)[1]
    flat_tree, tree_spec = pytree.tree_flatten(tree)
    packing = TensorPacking(flat_tree)
    size = len(packing.groups)

    def leaf(*inputs: Tensor) -> tuple[Tensor, ...]:
        tree = pytree.tree_unflatten(packing.unpack(inputs[:size]), tree_spec)
        metric = pytree.tree_unflatten(list(inputs[size:-3]), metric_spec)
        step_sizes, noise, uniforms = inputs[-3:]
        tree, ends, info = nuts.advance(tree, potential_and_grad=potential_and_grad, metric=metric,
                                        step_size=step_sizes, noise=noise, uniforms=uniforms,
                                        max_tree_depth=max_tree_depth)
        return (*packing.pack(pytree.tree_flatten(tree)[0]), ends, *tree.state, *info)

    if jit:
        # Check the compiled leaf where the chains start, at points around them, and along a few
        # eager steps from the start (mid-transition: subtrees, U-turn checks, merges).
        probe_generator = torch.Generator(device=state.position.device).manual_seed(0)
        probes = []
        for moved in points_around(state.position):
            probe_tree = nuts.start_tree(init(moved, potential_and_grad), max_tree_depth)
            probes.append((*packing.pack(pytree.tree_flatten(probe_tree)[0]), *metric, step_sizes,
                           *nuts.draw_randomness(probe_generator, moved)))
        for _ in range(COMPILE_CHECK_STEPS):
            packed = leaf(*probes[-1])[:size]
            probes.append((*packed, *metric, step_sizes, *nuts.draw_randomness(probe_generator, state.position)))
        compiled = compile_function(leaf, probes[0], probes=probes[1:], backend=jit, name="the NUTS step")
        leaf, jit = (compiled, jit) if compiled is not None else (leaf, False)

    packed_tree = packing.pack(flat_tree)

    def nuts_leaf(state: HMCState, metric: Metric, step_sizes: Tensor) -> tuple[HMCState, Tensor, Info]:
        nonlocal packed_tree
        out = leaf(*packed_tree, *metric, step_sizes, *nuts.draw_randomness(generator, state.position))
        packed_tree = out[:size]
        return HMCState(*out[size + 1 : size + 4]), out[size], Info(*out[size + 4 :])

    return nuts_leaf, jit, potential_and_grad


def _compile_tree_function(fn: Callable[..., tuple[Any, ...]], examples: list[tuple[Any, ...]], backend: Backend
                           ) -> Callable[..., tuple[Any, ...]] | None:
    """``fn`` of tensors and named tuples of tensors, returning such a tuple, compiled by
    :func:`~latentkit.inference.kernels.compile.compile_function` (checked on every example).

    Arguments and results are flattened by hand: ``torch.utils._pytree`` costs tens of
    microseconds per call, as much as the compiled graph."""
    def flatten(values: tuple[Any, ...]) -> list[Tensor]:
        return [tensor for value in values for tensor in (value if isinstance(value, tuple) else (value,))]

    def unflatten(tensors: Sequence[Tensor], like: tuple[Any, ...]) -> tuple[Any, ...]:
        values, at = [], 0
        for value in like:
            if isinstance(value, tuple):
                values.append(type(value)(*tensors[at : at + len(value)]))
                at += len(value)
            else:
                values.append(tensors[at])
                at += 1
        return tuple(values)

    example = examples[0]
    result = fn(*example)

    def flat_fn(*tensors: Tensor) -> tuple[Tensor, ...]:
        return tuple(flatten(fn(*unflatten(tensors, example))))

    compiled = compile_function(flat_fn, tuple(flatten(example)),
                                probes=[tuple(flatten(probe)) for probe in examples[1:]], backend=backend,
                                name=f"the {fn.__name__.replace('_', ' ')}")
    if compiled is None:
        return None
    return lambda *args: unflatten(compiled(*flatten(args)), result)


def _fused_nuts(
    potential_and_grad: PotentialAndGrad, state: HMCState, metric: Metric, generator: torch.Generator,
    max_tree_depth: int, backend: Backend,
) -> tuple[Advance, Backend | Literal[False], PotentialAndGrad] | None:
    """NUTS on CPU with its tree bookkeeping compiled by Numba and the potential by ``backend``
    (:class:`~latentkit.inference.kernels.nuts_numba.FusedNuts`); None where Numba is missing or
    fails, and the whole step is then compiled by ``backend`` instead."""
    try:
        from latentkit.inference.kernels.nuts_numba import FusedNuts

        # A throwaway step compiles the kernels for this metric's kind (or loads them from Numba's
        # cache) and proves them.
        FusedNuts(potential_and_grad, state, max_tree_depth=max_tree_depth).advance(
            torch.Generator().manual_seed(0), metric, torch.ones_like(state.potential_energy))
    except Exception as error:  # noqa: BLE001 - no Numba, or a Numba that cannot compile: stay in PyTorch
        warnings.warn(f"jit: NUTS's Numba kernels are unavailable ({type(error).__name__}: {error}); compiling the "
                      f"whole step with {backend} instead (slower on small models).", stacklevel=3)
        return None
    compiled = compile_function(potential_and_grad, (state.position,),
                                probes=[(point,) for point in points_around(state.position)], backend=backend,
                                name="the potential")
    potential = compiled if compiled is not None else potential_and_grad
    fused = FusedNuts(potential, state, max_tree_depth=max_tree_depth)

    def fused_advance(state: HMCState, metric: Metric, step_sizes: Tensor) -> tuple[HMCState, Tensor, Info]:
        return fused.advance(generator, metric, step_sizes)

    return fused_advance, backend if compiled is not None else False, potential


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
