"""Log-space tensor contractions for summing out enumerated sites, in few tensor operations.

Pyro's :class:`~pyro.ops.rings.LogRing` contracts with ``pyro.ops.einsum.torch_log``: each
log-space einsum shifts every operand by its maximum, exponentiates, multiplies with
``torch.einsum`` (permutations, reshapes and a ``bmm``) and takes the log: about 25 tensor
operations, and as many again in the gradient. That suits large factors; a model whose enumerated
sites are many and small (a ``pyro.markov`` HMM: one contraction of (chains, K, K) factors per time
step) spends its potential on per-operation overhead, and a recorded graph of it has tens of
thousands of nodes (at T = 100: 16,000, 20 s to record and compile). :class:`BroadcastLogRing`
contracts small factors as a sum of broadcast operands and one ``logsumexp`` (about 12
operations with the gradient), and large ones as Pyro does.
"""

import math

import torch
from pyro.ops.einsum import torch_log
from pyro.ops.einsum.util import Tensordot
from pyro.ops.rings import LogRing

__all__ = ["BroadcastLogRing", "einsum", "tensordot", "transpose"]

#: Contractions whose broadcast sum has at most this many elements (or at most this factor more
#: than their operands together) are done by broadcasting; larger ones by Pyro's exp-bmm-log.
BROADCAST_ELEMENTS = 2**16
BROADCAST_GROWTH = 8


def transpose(a: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
    return a.permute(axes)


def einsum(equation: str, *operands: torch.Tensor) -> torch.Tensor:
    """``log(einsum(equation, *exp(operands)))``, the ``torch_log`` backend's function.

    Small contractions: the operands aligned on the equation's symbols (output first) and added,
    then log-sum-exp'd over the summed symbols. Entries of ``-inf`` (impossible values) are first
    raised to the most negative finite float, as ``torch_log`` clamps its shifts: otherwise a
    slice that is ``-inf`` throughout would give a NaN gradient (now 0, and its result ``-inf``
    again); they still contribute nothing.
    """
    inputs, output = equation.split("->")
    terms = inputs.split(",")
    sizes: dict[str, int] = {}
    for term, operand in zip(terms, operands, strict=True):
        for symbol, size in zip(term, operand.shape, strict=True):
            sizes[symbol] = max(size, sizes.get(symbol, 1))  # a size-1 dimension broadcasts
    summed = sorted(set(inputs) - set(output) - {","})
    symbols = output + "".join(summed)
    total_size = 1
    for symbol in symbols:
        total_size *= sizes[symbol]
    operand_sizes = sum(operand.numel() for operand in operands)
    repeated = any(len(set(term)) < len(term) for term in terms) or len(set(output)) < len(output)
    if repeated or total_size > max(BROADCAST_ELEMENTS, BROADCAST_GROWTH * operand_sizes):
        return torch_log.einsum(equation, *operands)
    total = None
    for term, operand in zip(terms, operands, strict=True):
        aligned = operand.permute(sorted(range(len(term)), key=lambda i: symbols.index(term[i])))
        aligned = aligned.reshape([operand.shape[term.index(symbol)] if symbol in term else 1 for symbol in symbols])
        total = aligned if total is None else total + aligned
    if not summed:  # every symbol is in some operand, so the sum has the output's shape
        return total.clone() if len(operands) == 1 else total
    lowest = torch.finfo(total.dtype).min
    result = total.clamp(min=lowest).logsumexp(tuple(range(len(output), len(symbols))))
    # Where every term was -inf the result is lowest (log of the count is below its rounding).
    return torch.where(result == lowest, -math.inf, result)


tensordot = Tensordot(einsum)


class BroadcastLogRing(LogRing):
    """Pyro's log-space ring, contracting by :func:`einsum` of this module."""

    _backend = __name__
