"""What the HMC-family kernels take, carry between transitions and report.

Every kernel in this package works on ``C`` chains at once. Positions live in the unconstrained
space as a ``(C, D)`` tensor, one row per chain; all per-chain scalars are ``(C,)`` tensors.
"""

import math
from typing import NamedTuple, Protocol, TypeVar

import torch
from torch import Tensor

__all__ = ["HMCState", "Info", "PotentialAndGrad", "evaluate_potential", "init", "select_where"]


class PotentialAndGrad(Protocol):
    """A batched potential energy with its gradient.

    The potential is the negative log density up to an additive constant. Rows are independent
    chains: row ``c`` of the outputs may depend on row ``c`` of ``position`` only. A row may be
    ``+inf`` or ``NaN`` (out of support, overflow); the kernels treat such a point as divergent for
    that chain only. The returned tensors must not require grad.

    Shapes:
        ``position``: ``(C, D)``; returns ``(C,)`` potentials and ``(C, D)`` gradients.
    """

    def __call__(self, position: Tensor, /) -> tuple[Tensor, Tensor]: ...


class HMCState(NamedTuple):
    """The state of ``C`` chains between transitions.

    Shapes:
        ``position``: ``(C, D)``; ``potential_energy``: ``(C,)``; ``potential_grad``: ``(C, D)``.
    """

    position: Tensor
    potential_energy: Tensor
    potential_grad: Tensor


class Info(NamedTuple):
    """Per-chain statistics of one transition, named as ArviZ's ``sample_stats``.

    Attributes:
        acceptance_rate: mean Metropolis acceptance probability ``min(1, exp(H0 - H))`` over all
            leapfrog steps of the transition (Stan's ``accept_stat__``).
        tree_depth: number of trajectory doublings (NUTS), counting a last subtree rejected for
            turning or diverging (NumPyro's convention; Stan does not count it); ``0`` for
            static HMC, which builds no tree.
        n_steps: number of leapfrog steps taken; for NUTS
            ``2**(tree_depth - 1) <= n_steps <= 2**tree_depth - 1``.
        diverging: whether the energy error exceeded the divergence threshold (or was ``NaN``).
        energy: Hamiltonian ``H = U + K`` at the selected point.

    Shapes:
        every field is ``(C,)``; ``tree_depth`` and ``n_steps`` are ``int64``, ``diverging``
        is ``bool``, the rest have the dtype of the positions.
    """

    acceptance_rate: Tensor
    tree_depth: Tensor
    n_steps: Tensor
    diverging: Tensor
    energy: Tensor


States = TypeVar("States", bound=tuple[Tensor, ...])


def select_where(mask: Tensor, new: States, old: States) -> States:
    """Per chain, the fields of ``new`` where ``mask`` holds, else those of ``old``.

    Works for any named tuple of per-chain tensors (:class:`HMCState`, :class:`Info`, ...): how
    chains are frozen or moved one at a time while all compute together.

    Shapes:
        ``mask``: ``(C,)`` ``bool``; every field ``(C, ...)``.

    Example:
        >>> old = HMCState(torch.zeros(2, 1), torch.zeros(2), torch.zeros(2, 1))
        >>> new = HMCState(torch.ones(2, 1), torch.ones(2), torch.ones(2, 1))
        >>> select_where(torch.tensor([True, False]), new, old).potential_energy
        tensor([1., 0.])
    """
    # One broadcastable mask per field rank, not per field: inside a compiled NUTS step every
    # operation costs about as much as the arithmetic on these small tensors.
    masks: dict[int, Tensor] = {}
    selected = []
    for a, b in zip(new, old, strict=True):
        if a.dim() not in masks:
            masks[a.dim()] = mask.reshape(mask.shape + (1,) * (a.dim() - 1))
        selected.append(torch.where(masks[a.dim()], a, b))
    return type(old)(*selected)


def evaluate_potential(
    potential_and_grad: PotentialAndGrad, position: Tensor
) -> tuple[Tensor, Tensor]:
    """Call the potential so that no chain can break another or the caller.

    Non-finite coordinates are replaced by zeros before the call (a model's support checks
    may raise on ``NaN``) and their rows get potential ``+inf``. A ``NaN`` or
    ``-inf`` potential becomes ``+inf`` too, so that downstream code sees one kind of invalid
    point.

    Shapes:
        ``position``: ``(C, D)``; returns ``(C,)`` and ``(C, D)``.

    Example:
        >>> evaluate_potential(lambda z: (z.sum(-1), z), torch.tensor([[1.0], [math.nan]]))[0]
        tensor([1., inf])
    """
    finite = torch.isfinite(position).all(-1)
    potential_energy, potential_grad = potential_and_grad(position.nan_to_num(0.0, 0.0, 0.0))
    potential_energy = torch.where(finite, potential_energy.detach(), math.inf)
    potential_energy = potential_energy.nan_to_num(math.inf, posinf=math.inf, neginf=math.inf)
    return potential_energy, potential_grad.detach()


def init(position: Tensor, potential_and_grad: PotentialAndGrad) -> HMCState:
    """Evaluate the potential at the initial positions.

    A chain whose potential is not finite there gets ``+inf`` (see
    :func:`evaluate_potential`); its transitions will all diverge.

    Args:
        position: initial unconstrained positions, one row per chain.
        potential_and_grad: the batched potential.

    Returns:
        The initial state of every chain.

    Shapes:
        ``position``: ``(C, D)``.

    Example:
        >>> state = init(torch.zeros(4, 2), lambda z: (0.5 * (z**2).sum(-1), z))
        >>> state.potential_energy
        tensor([0., 0., 0., 0.])
    """
    return HMCState(position, *evaluate_potential(potential_and_grad, position))
