"""NUTS's tree bookkeeping compiled by Numba: :func:`nuts.advance <.nuts.advance>` on CPU, fused.

:func:`~latentkit.inference.kernels.nuts.advance` is about 190 tensor operations besides the
model's potential; on CPU each costs about 0.6 us of ATen overhead even in TorchScript's Static
Runtime, however small the tensors, so on small models the bookkeeping costs more than the model
(eight schools: 120 of 190 us per leapfrog step). No PyTorch backend fuses them without a
compile of seconds per model (inductor: 10-20 s), and Pyro and NumPyro have no such kernel to
reuse, so it is written here a second time, as plain loops over chains that Numba compiles once
per machine (cached on disk; about 1 us per call). The model's potential and gradient stay in
PyTorch (compiled by :func:`~latentkit.inference.kernels.compile.compile_function`); one
leapfrog step of every chain is: :func:`_begin_and_move` (new transitions, new subtrees, the
first half of the leapfrog step), the potential, :func:`_finish_leaf` (the rest).

The algorithm, its random numbers and its conventions are exactly those of
:func:`~latentkit.inference.kernels.nuts.advance`, which stays the reference (and the path on
GPUs and without Numba): the same seed gives the same draws up to floating-point rounding, as
tests/inference/kernels/test_nuts_numba.py checks step by step.
"""

import math

import numba
import numpy as np
import torch
from torch import Tensor

from latentkit.inference.kernels import nuts
from latentkit.inference.kernels.metrics import Metric
from latentkit.inference.kernels.nuts import MAX_DELTA_ENERGY
from latentkit.inference.kernels.state import HMCState, Info, PotentialAndGrad

__all__ = ["FusedNuts"]

# Slots of the per-chain vectors, ``vectors[slot]`` is ``(C, D)``: the chain's state, the
# trajectory's ends, summed momenta and proposal, the subtree's frontier, summed momenta and
# proposal, and the leaf in progress (momentum after the first half step, new position, the
# position handed to the potential: non-finite coordinates zeroed).
(STATE_POS, STATE_GRAD, LEFT_POS, LEFT_MOM, LEFT_GRAD, RIGHT_POS, RIGHT_MOM, RIGHT_GRAD, MOM_SUM,
 PROP_POS, PROP_GRAD, FRONT_POS, FRONT_MOM, FRONT_GRAD, SUB_MOM_SUM, SUB_PROP_POS, SUB_PROP_GRAD,
 HALF_MOM, NEW_POS, QUERY) = range(20)
# Per-chain floats, ``scalars[slot]`` is ``(C,)``.
(STATE_PE, LOG_WEIGHT, PROP_PE, PROP_ENERGY, REFERENCE_ENERGY, SUM_ACCEPT, SUB_LOG_WEIGHT,
 SUB_PROP_PE, SUB_PROP_ENERGY) = range(9)
# Per-chain integers (flags as 0/1), ``counts[slot]`` is ``(C,)``.
BEGIN, DEPTH, N_STEPS, DIVERGING, GOING_RIGHT, LEAF, POS_FINITE = range(7)
# Info's fields, ``info[slot]`` (floats) and ``info_counts[slot]`` (integers), ``(C,)``.
ACCEPTANCE_RATE, ENERGY = range(2)
TREE_DEPTH, INFO_N_STEPS = range(2)

_jit = numba.njit(cache=True, nogil=True, fastmath=False)


@_jit
def _velocity(inverse_mass, c, momentum, out):
    """``out = M^{-1} momentum`` for chain ``c`` (diagonal ``(C, D)`` or dense ``(C, D, D)``)."""
    dim = momentum.shape[0]
    if inverse_mass.ndim == 2:
        for d in range(dim):
            out[d] = inverse_mass[c, d] * momentum[d]
    else:
        for d in range(dim):
            total = 0.0
            for e in range(dim):
                total += inverse_mass[c, d, e] * momentum[e]
            out[d] = total


@_jit
def _dot(a, b):
    total = 0.0
    for d in range(a.shape[0]):
        total += a[d] * b[d]
    return total


@_jit
def _logaddexp(a, b):
    """``log(exp(a) + exp(b))`` as ``torch.logaddexp`` computes it, infinities included."""
    if a == b:
        return a + math.log(2.0)
    if a == -np.inf:
        return b
    if b == -np.inf:
        return a
    return max(a, b) + math.log1p(math.exp(-abs(a - b)))


@_jit
def _is_turning(velocity_left, velocity_right, momentum_left, momentum_right, momentum_sum):
    """:func:`nuts.is_turning <latentkit.inference.kernels.nuts.is_turning>` for one chain."""
    left = 0.0
    right = 0.0
    for d in range(momentum_sum.shape[0]):
        rho = momentum_sum[d] - 0.5 * (momentum_left[d] + momentum_right[d])
        left += velocity_left[d] * rho
        right += velocity_right[d] * rho
    return left <= 0.0 or right <= 0.0


@_jit
def _begin_and_move(vectors, scalars, counts, inverse_mass, momentum_scale, step_size, noise, uniforms):
    """Start the transitions and subtrees that begin at this leaf, and move every chain's position.

    Writes ``vectors[HALF_MOM]``, ``vectors[NEW_POS]`` and ``vectors[QUERY]`` (the point whose
    potential and gradient :func:`_finish_leaf` needs).
    """
    num_chains, dim = noise.shape
    velocity = np.empty(dim, dtype=noise.dtype)
    for c in range(num_chains):
        if counts[BEGIN, c]:
            momentum = vectors[LEFT_MOM, c]  # the new momentum is written straight to its places
            if momentum_scale.ndim == 2:
                for d in range(dim):
                    momentum[d] = momentum_scale[c, d] * noise[c, d]
            else:
                for d in range(dim):
                    total = 0.0
                    for e in range(dim):
                        total += momentum_scale[c, d, e] * noise[c, e]
                    momentum[d] = total
            _velocity(inverse_mass, c, momentum, velocity)
            initial_energy = scalars[STATE_PE, c] + 0.5 * _dot(momentum, velocity)
            for d in range(dim):
                for slot in (LEFT_POS, RIGHT_POS, PROP_POS):
                    vectors[slot, c, d] = vectors[STATE_POS, c, d]
                for slot in (LEFT_GRAD, RIGHT_GRAD, PROP_GRAD):
                    vectors[slot, c, d] = vectors[STATE_GRAD, c, d]
                vectors[RIGHT_MOM, c, d] = momentum[d]
                vectors[MOM_SUM, c, d] = momentum[d]
            scalars[LOG_WEIGHT, c] = 0.0
            scalars[PROP_PE, c] = scalars[STATE_PE, c]
            scalars[PROP_ENERGY, c] = initial_energy
            scalars[REFERENCE_ENERGY, c] = initial_energy if math.isfinite(initial_energy) else -np.inf
            scalars[SUM_ACCEPT, c] = 0.0
            counts[DEPTH, c] = 0
            counts[N_STEPS, c] = 0
            counts[DIVERGING, c] = 0
        if counts[LEAF, c] == 0:
            counts[GOING_RIGHT, c] = uniforms[c, 0] < 0.5
            end = RIGHT_POS if counts[GOING_RIGHT, c] else LEFT_POS  # POS, MOM, GRAD are consecutive
            for d in range(dim):
                vectors[FRONT_POS, c, d] = vectors[end, c, d]
                vectors[FRONT_MOM, c, d] = vectors[end + 1, c, d]
                vectors[FRONT_GRAD, c, d] = vectors[end + 2, c, d]
        step = step_size[c] if counts[GOING_RIGHT, c] else -step_size[c]
        half_step = 0.5 * step
        half = vectors[HALF_MOM, c]
        for d in range(dim):
            half[d] = vectors[FRONT_MOM, c, d] - half_step * vectors[FRONT_GRAD, c, d]
        _velocity(inverse_mass, c, half, velocity)
        finite = True
        for d in range(dim):
            position = vectors[FRONT_POS, c, d] + step * velocity[d]
            vectors[NEW_POS, c, d] = position
            finite = finite and math.isfinite(position)
            vectors[QUERY, c, d] = position if math.isfinite(position) else 0.0
        counts[POS_FINITE, c] = finite


@_jit
def _finish_leaf(vectors, scalars, counts, checkpoints, inverse_mass, step_size, uniforms, reads, stores,
                 max_tree_depth, potential_energy, potential_grad, ends, info, info_counts, info_diverging):
    """Finish the leapfrog step from the potential at ``vectors[QUERY]`` and do the bookkeeping it
    ends: the leaf joins its subtree, U-turn checks, a subtree merges, a transition ends."""
    num_chains, dim = potential_grad.shape
    momentum = np.empty(dim, dtype=potential_grad.dtype)
    velocity = np.empty(dim, dtype=potential_grad.dtype)
    other_velocity = np.empty(dim, dtype=potential_grad.dtype)
    rho = np.empty(dim, dtype=potential_grad.dtype)
    for c in range(num_chains):
        pe = potential_energy[c]
        if not counts[POS_FINITE, c] or math.isnan(pe) or pe == -np.inf:
            pe = np.inf
        grad = potential_grad[c]
        step = step_size[c] if counts[GOING_RIGHT, c] else -step_size[c]
        half_step = 0.5 * step
        for d in range(dim):
            momentum[d] = vectors[HALF_MOM, c, d] - half_step * grad[d]
        _velocity(inverse_mass, c, momentum, velocity)
        energy = pe + 0.5 * _dot(momentum, velocity)
        delta = energy - scalars[REFERENCE_ENERGY, c]
        if math.isnan(delta):
            delta = np.inf
        leaf = counts[LEAF, c]
        first = leaf == 0

        # Uniform progressive sampling within the subtree.
        x = -delta - scalars[SUB_LOG_WEIGHT, c]
        if first or uniforms[c, 2] < 1.0 / (1.0 + math.exp(-x)):
            for d in range(dim):
                vectors[SUB_PROP_POS, c, d] = vectors[NEW_POS, c, d]
                vectors[SUB_PROP_GRAD, c, d] = grad[d]
            scalars[SUB_PROP_PE, c] = pe
            scalars[SUB_PROP_ENERGY, c] = energy
        scalars[SUB_LOG_WEIGHT, c] = -delta if first else _logaddexp(scalars[SUB_LOG_WEIGHT, c], -delta)
        sub_sum = vectors[SUB_MOM_SUM, c]
        for d in range(dim):
            sub_sum[d] = momentum[d] if first else sub_sum[d] + momentum[d]
        scalars[SUM_ACCEPT, c] += min(math.exp(-delta), 1.0)
        counts[N_STEPS, c] += 1
        leaf_diverging = delta > MAX_DELTA_ENERGY
        if leaf_diverging:
            counts[DIVERGING, c] = 1

        # U-turn checks of the sub-subtrees this leaf closes (odd leaves); a checkpoint (even).
        leaf_turning = False
        for k in range(reads.shape[0]):
            if reads[k, leaf]:
                for d in range(dim):
                    rho[d] = sub_sum[d] - checkpoints[2, k, c, d] + checkpoints[0, k, c, d]
                if _is_turning(checkpoints[1, k, c], velocity, checkpoints[0, k, c], momentum, rho):
                    leaf_turning = True
            if stores[k, leaf]:
                for d in range(dim):
                    checkpoints[0, k, c, d] = momentum[d]
                    checkpoints[1, k, c, d] = velocity[d]
                    checkpoints[2, k, c, d] = sub_sum[d]

        # A subtree that ends merges into the trajectory (biased progressive sampling).
        stopped = leaf_diverging or leaf_turning
        subtree_ends = stopped or leaf + 1 == 2 ** counts[DEPTH, c]
        valid = subtree_ends and not stopped
        going_right = counts[GOING_RIGHT, c]
        if valid:
            if uniforms[c, 1] < math.exp(scalars[SUB_LOG_WEIGHT, c] - scalars[LOG_WEIGHT, c]):
                for d in range(dim):
                    vectors[PROP_POS, c, d] = vectors[SUB_PROP_POS, c, d]
                    vectors[PROP_GRAD, c, d] = vectors[SUB_PROP_GRAD, c, d]
                scalars[PROP_PE, c] = scalars[SUB_PROP_PE, c]
                scalars[PROP_ENERGY, c] = scalars[SUB_PROP_ENERGY, c]
            scalars[LOG_WEIGHT, c] = _logaddexp(scalars[LOG_WEIGHT, c], scalars[SUB_LOG_WEIGHT, c])
            end = RIGHT_POS if going_right else LEFT_POS
            for d in range(dim):
                vectors[end, c, d] = vectors[NEW_POS, c, d]
                vectors[end + 1, c, d] = momentum[d]
                vectors[end + 2, c, d] = grad[d]
                vectors[MOM_SUM, c, d] += sub_sum[d]
        ended = False
        if subtree_ends:
            counts[DEPTH, c] += 1
            _velocity(inverse_mass, c, vectors[LEFT_MOM, c], velocity)
            _velocity(inverse_mass, c, vectors[RIGHT_MOM, c], other_velocity)
            turning = _is_turning(velocity, other_velocity, vectors[LEFT_MOM, c], vectors[RIGHT_MOM, c],
                                  vectors[MOM_SUM, c])
            ended = stopped or turning or counts[DEPTH, c] >= max_tree_depth
        if ended:
            for d in range(dim):
                vectors[STATE_POS, c, d] = vectors[PROP_POS, c, d]
                vectors[STATE_GRAD, c, d] = vectors[PROP_GRAD, c, d]
            scalars[STATE_PE, c] = scalars[PROP_PE, c]
        for d in range(dim):
            vectors[FRONT_POS, c, d] = vectors[NEW_POS, c, d]
            vectors[FRONT_MOM, c, d] = momentum[d]
            vectors[FRONT_GRAD, c, d] = grad[d]
        counts[LEAF, c] = 0 if subtree_ends else leaf + 1
        counts[BEGIN, c] = ended
        ends[c] = ended
        info[ACCEPTANCE_RATE, c] = scalars[SUM_ACCEPT, c] / counts[N_STEPS, c]
        info[ENERGY, c] = scalars[PROP_ENERGY, c]
        info_counts[TREE_DEPTH, c] = counts[DEPTH, c]
        info_counts[INFO_N_STEPS, c] = counts[N_STEPS, c]
        info_diverging[c] = counts[DIVERGING, c] != 0


class FusedNuts:
    """Every chain's NUTS transition in progress, advanced one leapfrog step per call on CPU.

    Holds the tree of :class:`~latentkit.inference.kernels.nuts.Tree` in NumPy buffers; a call
    is the same as :func:`~latentkit.inference.kernels.nuts.advance` with the random numbers of
    :func:`~latentkit.inference.kernels.nuts.draw_randomness`.

    Args:
        potential_and_grad: the batched potential, on CPU tensors (usually compiled).
        state: where the chains start.
        max_tree_depth: the most doublings per transition.

    Example:
        >>> from latentkit.inference.kernels.metrics import identity_metric
        >>> from latentkit.inference.kernels.state import init
        >>> potential = lambda z: (0.5 * (z**2).sum(-1), z)
        >>> state = init(torch.zeros(2, 3, dtype=torch.float64), potential)
        >>> fused = FusedNuts(potential, state, max_tree_depth=10)
        >>> generator = torch.Generator().manual_seed(0)
        >>> metric = identity_metric(state.position, dense=False)
        >>> state, ends, info = fused.advance(generator, metric, torch.full((2,), 0.5, dtype=torch.float64))
        >>> tuple(state.position.shape), info.n_steps.tolist()
        ((2, 3), [1, 1])
    """

    def __init__(self, potential_and_grad: PotentialAndGrad, state: HMCState, *, max_tree_depth: int) -> None:
        tree = nuts.start_tree(state, max_tree_depth)
        num_chains, dim = state.position.shape
        dtype = state.position.numpy().dtype
        self.potential_and_grad = potential_and_grad
        self.max_tree_depth = max_tree_depth
        self.vectors = np.zeros((20, num_chains, dim), dtype=dtype)
        self.vectors[STATE_POS] = state.position.numpy()
        self.vectors[STATE_GRAD] = state.potential_grad.numpy()
        self.scalars = np.zeros((9, num_chains), dtype=dtype)
        self.scalars[STATE_PE] = state.potential_energy.numpy()
        self.counts = np.zeros((7, num_chains), dtype=np.int64)
        self.counts[BEGIN] = 1
        self.checkpoints = tree.checkpoints.numpy().copy()
        reads, stores, _ = nuts._leaf_tables(max_tree_depth, torch.device("cpu"))
        self.reads, self.stores = reads.numpy(), stores.numpy()
        self.ends = np.zeros(num_chains, dtype=np.bool_)
        self.info = np.zeros((2, num_chains), dtype=dtype)
        self.info_counts = np.zeros((2, num_chains), dtype=np.int64)
        self.info_diverging = np.zeros(num_chains, dtype=np.bool_)
        # Tensors sharing the buffers' memory, handed out by every call.
        self.query = torch.from_numpy(self.vectors[QUERY])
        self.state = HMCState(torch.from_numpy(self.vectors[STATE_POS]), torch.from_numpy(self.scalars[STATE_PE]),
                              torch.from_numpy(self.vectors[STATE_GRAD]))
        info = torch.from_numpy(self.info)
        counts = torch.from_numpy(self.info_counts)
        self.info_tensors = Info(info[ACCEPTANCE_RATE], counts[TREE_DEPTH], counts[INFO_N_STEPS],
                                 torch.from_numpy(self.info_diverging), info[ENERGY])
        self.ends_tensor = torch.from_numpy(self.ends)
        self._metric: Metric | None = None
        self._metric_arrays: tuple[np.ndarray, np.ndarray] = ()

    def advance(self, generator: torch.Generator, metric: Metric, step_size: Tensor) -> tuple[HMCState, Tensor, Info]:
        """One leapfrog step of every chain; see :func:`~latentkit.inference.kernels.nuts.advance`.

        Returns:
            Every chain's current state, which chains ended a transition with this step, and
            those transitions' statistics. The tensors share memory with the buffers and change
            at the next call: copy what is kept.
        """
        noise, uniforms = nuts.draw_randomness(generator, self.state.position)
        uniforms = uniforms.numpy()
        if metric is not self._metric:  # warm-up changes it now and then: convert it then only
            # Contiguous arrays: one compiled version of the kernels (a dense metric's scale is a transpose).
            self._metric = metric
            self._metric_arrays = (np.ascontiguousarray(metric.inverse_mass_matrix.numpy()),
                                   np.ascontiguousarray(metric.momentum_scale.numpy()))
        inverse_mass, momentum_scale = self._metric_arrays
        step = step_size.numpy()
        _begin_and_move(self.vectors, self.scalars, self.counts, inverse_mass, momentum_scale, step, noise.numpy(),
                        uniforms)
        potential_energy, potential_grad = self.potential_and_grad(self.query)
        _finish_leaf(self.vectors, self.scalars, self.counts, self.checkpoints, inverse_mass, step, uniforms,
                     self.reads, self.stores, self.max_tree_depth, potential_energy.detach().numpy(),
                     potential_grad.detach().numpy(), self.ends, self.info, self.info_counts, self.info_diverging)
        return self.state, self.ends_tensor, self.info_tensors
