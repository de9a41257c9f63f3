"""Exact inference in discrete-state hidden Markov models, vectorised over time and batches.

Conventions shared by every function here (K states, T time steps, leading ``...`` dimensions
broadcast, e.g. posterior draws and sequences):

* ``log_init`` (..., K): log-probabilities of the first state;
* ``log_trans`` (..., K, K): log-probabilities of moving from state i (row) to state j (column);
* ``obs_logp`` (..., T, K): log-density of each observation under each state;
* ``mask`` (..., T) bool or None: False marks padded steps at the end of a shorter sequence.

Sequential recursions (forward filtering, Viterbi, backward sampling) run as two-level blocked
scans: time is cut into about sqrt(T) blocks of about sqrt(T) steps, the blocks are processed in
parallel, and only about 3 sqrt(T) small tensor operations run one after another, instead of T
(a Python loop) or the log2(T) full-size levels of a parallel prefix scan (Särkkä &
García-Fernández, "Temporal parallelization of Bayesian smoothers", IEEE TAC 2021), which on a
CPU cost more memory traffic. Paths are assembled from per-step back-pointers by composing them
with a Hillis-Steele prefix scan (log2(T) gathers).

:func:`log_likelihood` (used for fitting, differentiable) works in scaled probability space; on
CPU as one compiled sequential loop, elsewhere as tensor operations:
step matrices are multiplied pairwise (log2(T) rounds, as Pyro's ``DiscreteHMM`` does in log
space), long sequences after first multiplying blocks of a few tens of steps with one shared
matrix product per step. The other functions work in log space and need no gradient.
"""

import math
from typing import Any

import torch
from pyro.distributions import TorchDistribution, constraints
from pyro.distributions.util import broadcast_shape

from latentkit.inference.kernels import discrete_hmm

#: On CPU, :func:`log_likelihood` runs the forward algorithm as one compiled loop
#: (:func:`~latentkit.inference.kernels.discrete_hmm.forward_log_likelihood`, O(T K^2)); the
#: tensor-operation version below (for GPUs) otherwise.
FUSED_ON_CPU = True
#: Stage-1 rows of :func:`log_likelihood` are rescaled every this many steps in float64.
RESCALE_EVERY = 4
#: Up to this many steps the likelihood multiplies the step matrices pairwise; longer sequences
#: first multiply blocks of steps with one shared matrix product per step (less memory traffic).
TREE_MAX_STEPS = 4096

__all__ = ["HMMSequence", "log_likelihood", "filter_log_marginals", "smooth_log_marginals",
           "viterbi", "sample_states", "sample_chain"]


def _mask_obs(obs_logp: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return obs_logp
    return torch.where(mask.unsqueeze(-1), obs_logp, obs_logp.new_zeros(()))


def log_likelihood(log_init: torch.Tensor, log_trans: torch.Tensor, obs_logp: torch.Tensor,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """log p(x_0, ..., x_{T-1}) with the states summed out exactly (the forward algorithm).

    Differentiable. Padded steps (``mask`` False) contribute no observation term, which is exact
    for padding at the end of a sequence (and for missing observations anywhere) when the rows
    of ``log_trans`` are normalised.

    Shapes:
        log_init (..., K), log_trans (..., K, K), obs_logp (..., T, K), mask (..., T);
        returns the broadcast batch shape ``...``.
    """
    obs_logp = _mask_obs(obs_logp, mask)
    T, K = obs_logp.shape[-2:]
    if FUSED_ON_CPU and T > 1 and all(x.device.type == "cpu" for x in (log_init, log_trans, obs_logp)) \
            and discrete_hmm.kernels_work():
        # The first step's observation belongs to the first state; the kernel's initial state
        # precedes its first step.
        return discrete_hmm.forward_log_likelihood(log_init + obs_logp[..., 0, :], log_trans.unsqueeze(-3),
                                                   obs_logp[..., 1:, :])
    batch = torch.Size(broadcast_shape(log_init.shape[:-1], log_trans.shape[:-2], obs_logp.shape[:-2]))
    tiny = torch.finfo(obs_logp.dtype).tiny
    # Per-step shift: emission factors in (0, 1] with their maximum 1.
    shift = obs_logp.detach().amax(-1, keepdim=True).clamp(min=torch.finfo(obs_logp.dtype).min)
    factors = (obs_logp - shift).exp()
    log_scale = shift[..., 1:, 0].sum(-1)
    first = log_init + obs_logp[..., 0, :]
    if T == 1:
        return first.logsumexp(-1)
    trans = log_trans.exp()
    n = T - 1
    rest = factors[..., 1:, :]
    scales: torch.Tensor | None = None
    if n <= TREE_MAX_STEPS:
        matrices, tail = trans.unsqueeze(-3) * rest.unsqueeze(-2), ()
    else:
        length = _block_length(n)
        blocks = n // length
        steps = rest.expand(batch + (n, K))[..., : blocks * length, :].reshape(batch + (blocks, length, K))
        matrices, scales = _block_products(trans, steps.unbind(-2))
        tail = rest[..., blocks * length:, :].unbind(-2)  # fewer than `length` steps, done one by one
    matrix, scales = _pairwise_product(matrices.expand(batch + matrices.shape[-3:]), scales)
    # alpha after the last block: first @ diag(e^scales) @ matrix, kept at maximum 1.
    weight = first + (0.0 if scales is None else scales)
    top = weight.detach().amax(-1, keepdim=True).clamp(min=torch.finfo(first.dtype).min)
    alpha = ((weight - top).exp().unsqueeze(-2) @ matrix).squeeze(-2)
    norms = []
    log_scale = log_scale + top.squeeze(-1)
    for factor in tail:
        norm = alpha.detach().amax(-1, keepdim=True).clamp(min=tiny)
        alpha = ((alpha / norm).unsqueeze(-2) @ trans).squeeze(-2) * factor
        norms.append(norm)
    if norms:
        log_scale = log_scale + torch.cat(norms, -1).log().sum(-1)
    return log_scale + alpha.sum(-1).log()


def _block_length(n: int) -> int:
    """Steps per block for the blocked pass over n steps: the fewest Python-level tensor
    operations, counting ~4 per stage-1 step, ~16 per pairwise round and ~5 per tail step."""
    costs = {L: 4 * L + 16 * math.log2(max(n // L, 1)) + 5 * (n % L) for L in range(8, min(n, 256) + 1)}
    return min(costs, key=costs.__getitem__) if costs else n


def _block_products(trans: torch.Tensor, steps: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Products trans diag(f_1) trans diag(f_2) ... of each block, all blocks at once.

    Rows are rescaled to maximum 1 and their log scales returned. A row's maximum shrinks by
    at most the smallest transition probability per step, so in float64 rescaling every
    RESCALE_EVERY steps cannot underflow unless transition probabilities fall below 1e-75.

    Shapes: trans (..., K, K); steps: ``length`` tensors (..., blocks, K); returns
    (..., blocks, K, K) and (..., blocks, K).
    """
    K = trans.shape[-1]
    tiny = torch.finfo(trans.dtype).tiny
    every = RESCALE_EVERY if trans.dtype == torch.float64 else 1
    product = trans.unsqueeze(-3) * steps[0].unsqueeze(-2)
    shape = product.shape
    row_scale = product.new_zeros(shape[:-1])
    for i, step in enumerate(steps[1:], start=2):
        product = (product.reshape(shape[:-3] + (shape[-3] * K, K)) @ trans).reshape(shape) * step.unsqueeze(-2)
        if i % every == 0 or i == len(steps):
            top = product.detach().amax(-1, keepdim=True).clamp(min=tiny)
            product = product / top
            row_scale = row_scale + top.squeeze(-1).log()
    return product, row_scale


def _pairwise_product(matrices: torch.Tensor, scales: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The product diag(e^s_1) M_1 diag(e^s_2) M_2 ... as (matrix, row log scales), multiplying
    neighbours pairwise (log2(m) rounds, as Pyro's DiscreteHMM) in probability space, rows
    rescaled to maximum 1 each round.

    Shapes: matrices (..., m, K, K), scales (..., m, K) or None (all zero); returns
    (..., K, K) and (..., K) or None.
    """
    batch, K = matrices.shape[:-3], matrices.shape[-1]
    tiny = torch.finfo(matrices.dtype).tiny
    while matrices.shape[-3] > 1:
        m = matrices.shape[-3]
        even = m // 2 * 2
        left, right = matrices[..., :even, :, :].reshape(batch + (even // 2, 2, K, K)).unbind(-3)
        if scales is None:
            product, base = left @ right, 0.0
        else:
            left_scale, right_scale = scales[..., :even, :].reshape(batch + (even // 2, 2, K)).unbind(-2)
            top = right_scale.amax(-1, keepdim=True)
            # diag(e^a) L diag(e^b) R = diag(e^(a + max b)) (L diag(e^(b - max b))) R
            product = (left * (right_scale - top).exp().unsqueeze(-2)) @ right
            base = left_scale + top
        norm = product.detach().amax(-1, keepdim=True).clamp(min=tiny)
        product = product / norm
        new_scales = base + norm.squeeze(-1).log()
        if m > even:
            odd = matrices.new_zeros(batch + (1, K)) if scales is None else scales[..., -1:, :]
            product = torch.cat([product, matrices[..., -1:, :, :]], -3)
            new_scales = torch.cat([new_scales.expand(batch + (even // 2, K)), odd], -2)
        matrices, scales = product, new_scales
    return matrices.squeeze(-3), None if scales is None else scales.squeeze(-2)


# -- log-space scans for posterior quantities (no gradients needed) ------------------------------
def _reduce(x: torch.Tensor, dim: int, semiring: str) -> torch.Tensor:
    return x.logsumexp(dim) if semiring == "sum" else x.amax(dim)


def _scan(first: torch.Tensor, steps: torch.Tensor, semiring: str) -> torch.Tensor:
    """v_0 = first, v_{t+1} = v_t (x) steps_t in the (logsumexp, +) or (max, +) semiring.

    Shapes: first (..., K), steps (..., n, K, K); returns (..., n + 1, K).
    """
    n, K = steps.shape[-3], steps.shape[-1]
    batch = torch.Size(broadcast_shape(first.shape[:-1], steps.shape[:-3]))
    first = first.expand(batch + (K,))
    if n == 0:
        return first.unsqueeze(-2)
    steps = steps.expand(batch + (n, K, K))
    length = math.isqrt(n - 1) + 1 if n > 1 else 1
    blocks = -(-n // length)
    if blocks * length > n:  # identity steps after the end
        eye = torch.full((K, K), -math.inf, dtype=steps.dtype, device=steps.device).fill_diagonal_(0.0)
        steps = torch.cat([steps, eye.expand(batch + (blocks * length - n, K, K))], -3)
    per_step = steps.reshape(batch + (blocks, length, K, K)).unbind(-3)
    total = per_step[0]
    for step in per_step[1:]:
        total = _reduce(total.unsqueeze(-1) + step.unsqueeze(-3), -2, semiring)
    vector, starts = first, [first]
    for block in total.unbind(-3)[:-1]:
        vector = _reduce(vector.unsqueeze(-1) + block, -2, semiring)
        starts.append(vector)
    vector, out = torch.stack(starts, -2), []
    for step in per_step:
        vector = _reduce(vector.unsqueeze(-1) + step, -2, semiring)
        out.append(vector)
    out = torch.stack(out, -2).reshape(batch + (blocks * length, K))[..., :n, :]
    return torch.cat([first.unsqueeze(-2), out], -2)


def _step_matrices(log_trans: torch.Tensor, obs_logp: torch.Tensor, mask: torch.Tensor | None,
                   ) -> torch.Tensor:
    """log_trans + obs_logp[t + 1] per step (..., T - 1, K, K); the identity at padded steps, so
    that a padded tail leaves the last real step's state unchanged."""
    steps = log_trans.unsqueeze(-3) + obs_logp[..., 1:, :].unsqueeze(-2)
    if mask is not None:
        K = obs_logp.shape[-1]
        eye = torch.full((K, K), -math.inf, dtype=steps.dtype, device=steps.device).fill_diagonal_(0.0)
        steps = torch.where(mask[..., 1:, None, None], steps, eye)
    return steps


def _forward(log_init: torch.Tensor, log_trans: torch.Tensor, obs_logp: torch.Tensor,
             mask: torch.Tensor | None, semiring: str) -> tuple[torch.Tensor, torch.Tensor]:
    steps = _step_matrices(log_trans, obs_logp, mask)
    return _scan(log_init + obs_logp[..., 0, :], steps, semiring), steps


def filter_log_marginals(log_init: torch.Tensor, log_trans: torch.Tensor, obs_logp: torch.Tensor,
                         mask: torch.Tensor | None = None) -> torch.Tensor:
    """log p(z_t = k | x_0..x_t), normalised per step (padded steps repeat the last real one).

    Shapes: as :func:`log_likelihood`; returns (..., T, K).
    """
    alpha, _ = _forward(log_init, log_trans, obs_logp, mask, "sum")
    return alpha - alpha.logsumexp(-1, keepdim=True)


def smooth_log_marginals(log_init: torch.Tensor, log_trans: torch.Tensor, obs_logp: torch.Tensor,
                         mask: torch.Tensor | None = None) -> torch.Tensor:
    """log p(z_t = k | x_0..x_{T-1}) by forward-backward (padded steps repeat the last real one).

    Shapes: as :func:`log_likelihood`; returns (..., T, K).
    """
    alpha, steps = _forward(log_init, log_trans, obs_logp, mask, "sum")
    # beta'_t = obs_logp_t + beta_t runs forward in reversed time with transposed steps
    # (the step matrices already carry obs_logp_{t+1}).
    K = obs_logp.shape[-1]
    reversed_steps = steps.flip(-3).transpose(-1, -2)
    beta = _scan(obs_logp.new_zeros(K), reversed_steps, "sum").flip(-2)
    gamma = alpha + beta
    return gamma - gamma.logsumexp(-1, keepdim=True)


def _compose(pointers: torch.Tensor) -> torch.Tensor:
    """Prefix compositions H_s = f_s o f_{s-1} o ... o f_0 of maps f_s on {0..K-1} given as
    integer tensors (..., n, K): H_s[k] = f_s[H_{s-1}[k]]. Hillis-Steele scan, log2(n) gathers."""
    n, offset = pointers.shape[-2], 1
    while offset < n:
        pointers = torch.cat([pointers[..., :offset, :],
                              torch.gather(pointers[..., offset:, :], -1, pointers[..., :-offset, :])], -2)
        offset *= 2
    return pointers


def _backtrack(pointers: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Paths z with z_{T-1} = last and z_t = pointers[t][z_{t+1}].

    Shapes: pointers (..., T - 1, K) integer, last (...); returns (..., T).
    """
    if pointers.shape[-2] == 0:
        return last.unsqueeze(-1)
    composed = _compose(pointers.flip(-2))
    index = last[..., None, None].expand(composed.shape[:-1] + (1,))
    earlier = torch.gather(composed, -1, index).squeeze(-1).flip(-1)
    return torch.cat([earlier, last.unsqueeze(-1)], -1)


def _gumbel(shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
    u = torch.rand(shape, dtype=like.dtype, device=like.device).clamp(min=torch.finfo(like.dtype).tiny)
    return -(-u.log()).log()


def viterbi(log_init: torch.Tensor, log_trans: torch.Tensor, obs_logp: torch.Tensor,
            mask: torch.Tensor | None = None) -> torch.Tensor:
    """The most probable state path argmax_z p(z | x) (Viterbi; padded steps repeat the last
    real state).

    Shapes: as :func:`log_likelihood`; returns (..., T) int64.
    """
    delta, steps = _forward(log_init, log_trans, obs_logp, mask, "max")
    pointers = (delta[..., :-1, :, None] + steps).argmax(-2)
    return _backtrack(pointers, delta[..., -1, :].argmax(-1))


def sample_states(log_init: torch.Tensor, log_trans: torch.Tensor, obs_logp: torch.Tensor,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """One draw of the path z ~ p(z | x) by forward filtering, backward sampling, using torch's
    global random state (padded steps repeat the last real state).

    Shapes: as :func:`log_likelihood`; returns (..., T) int64.
    """
    alpha, steps = _forward(log_init, log_trans, obs_logp, mask, "sum")
    # For each step t and each next state k: z_t ~ p(z_t | z_{t+1} = k, x_0..x_t), Gumbel-max.
    logits = alpha[..., :-1, :, None] + steps
    pointers = (logits + _gumbel(logits.shape, logits)).argmax(-2)
    last = (alpha[..., -1, :] + _gumbel(alpha.shape[:-2] + alpha.shape[-1:], alpha)).argmax(-1)
    return _backtrack(pointers, last)


def sample_chain(log_init: torch.Tensor, log_trans: torch.Tensor, num_steps: int) -> torch.Tensor:
    """Simulate the Markov chain of states forward, using torch's global random state.

    Shapes: log_init (..., K), log_trans (..., K, K); returns (..., num_steps) int64.
    """
    K = log_init.shape[-1]
    batch = torch.Size(broadcast_shape(log_init.shape[:-1], log_trans.shape[:-2]))
    init = log_init.expand(batch + (K,))
    first = (init + _gumbel(init.shape, init)).argmax(-1)
    if num_steps == 1:
        return first.unsqueeze(-1)
    logits = log_trans.unsqueeze(-3).expand(batch + (num_steps - 1, K, K))
    moves = (logits + _gumbel(logits.shape, logits)).argmax(-1)  # next state from each state
    composed = _compose(moves)  # maps z_0 to z_{t+1}
    later = torch.gather(composed, -1, first[..., None, None].expand(batch + (num_steps - 1, 1))).squeeze(-1)
    return torch.cat([first.unsqueeze(-1), later], -1)


class HMMSequence(TorchDistribution):
    """Sequences of an HMM with its discrete states summed out exactly.

    Like Pyro's ``DiscreteHMM``, but ``initial_logits`` is the distribution of the *first* state
    (hmmlearn's ``startprob_``), padded steps are masked, and :meth:`log_prob` uses the fast
    forward algorithm of :func:`log_likelihood` (at T = 100,000 and K = 4, float64, its value and
    gradient take 15 ms on one CPU core, 27 ms as tensor operations, ``DiscreteHMM``'s 72 ms; see
    ``benchmarks/hmm.py``).

    Args:
        initial_logits: (..., K) logits of the first state.
        transition_logits: (..., K, K) logits of the transitions (row: old state, column: new).
        emission: per-state emission distribution with ``batch_shape`` (..., 1, K) (the -2 dim
            is time, of size 1 or T) and any ``event_shape``.
        mask: (..., T) bool, False at padded steps; their values are ignored by
            :meth:`log_prob` and set to 0 by :meth:`sample`.
        num_steps: T, required when ``mask`` is None.

    Shapes:
        ``batch_shape`` is the broadcast of the arguments' batch dims (excluding time and
        state); ``event_shape`` = (T,) + ``emission.event_shape``.
    """

    arg_constraints: dict[str, Any] = {}

    def __init__(self, initial_logits: torch.Tensor, transition_logits: torch.Tensor,
                 emission: TorchDistribution, mask: torch.Tensor | None = None,
                 num_steps: int | None = None, validate_args: bool | None = None) -> None:
        if mask is None and num_steps is None:
            raise ValueError("HMMSequence: pass mask or num_steps.")
        self.initial_logits = initial_logits - initial_logits.logsumexp(-1, keepdim=True)
        self.transition_logits = transition_logits - transition_logits.logsumexp(-1, keepdim=True)
        self.emission = emission
        self.mask = mask
        T = mask.shape[-1] if mask is not None else int(num_steps)  # type: ignore[arg-type]
        shapes = [self.initial_logits.shape[:-1], self.transition_logits.shape[:-2],
                  emission.batch_shape[:-2]]
        if mask is not None:
            shapes.append(mask.shape[:-1])
        batch_shape = torch.Size(broadcast_shape(*shapes))
        super().__init__(batch_shape, torch.Size((T,)) + emission.event_shape, validate_args=validate_args)

    @property
    def support(self) -> Any:  # type: ignore[override]
        return constraints.independent(self.emission.support, 1)

    def expand(self, batch_shape: Any, _instance: Any = None) -> "HMMSequence":
        new = self._get_checked_instance(HMMSequence, _instance)
        batch_shape = torch.Size(batch_shape)
        new.initial_logits = self.initial_logits.expand(batch_shape + self.initial_logits.shape[-1:])
        new.transition_logits = self.transition_logits
        new.emission = self.emission
        new.mask = self.mask
        super(HMMSequence, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self.__dict__.get("_validate_args")
        return new

    def observation_log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """log p(x_t | z_t = k), shape (..., T, K); 0 at padded steps."""
        value = value.unsqueeze(-1 - len(self.emission.event_shape))
        return _mask_obs(self.emission.log_prob(value), self.mask)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return log_likelihood(self.initial_logits, self.transition_logits,
                              self.observation_log_prob(value))

    @torch.no_grad()
    def sample(self, sample_shape: Any = ()) -> torch.Tensor:
        shape = torch.Size(sample_shape) + self.batch_shape
        T, K = self.event_shape[0], self.initial_logits.shape[-1]
        states = sample_chain(self.initial_logits.expand(shape + (K,)), self.transition_logits, T)
        event = self.emission.event_shape
        draws = self.emission.expand(self.batch_shape + (T, K)).sample(torch.Size(sample_shape))
        index = states.reshape(states.shape + (1,) * (1 + len(event))).expand(states.shape + (1,) + event)
        value = torch.gather(draws, -1 - len(event), index).squeeze(-1 - len(event))
        if self.mask is not None:
            keep = self.mask.reshape(self.mask.shape + (1,) * len(event))
            value = torch.where(keep, value, value.new_zeros(()))
        return value
