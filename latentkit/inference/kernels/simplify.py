"""Rewrite a recorded aten graph so that elementwise work is done on unbroadcast tensors.

Pyro's distributions broadcast their parameters to the batch shape before computing
(``broadcast_all``): in a mixture of ``K`` components over ``N`` points and ``C`` chains,
``Normal(loc, scale).log_prob(y)`` takes ``log(scale)`` and ``scale ** 2`` of ``C * K * N``
copies of ``C`` numbers, and autograd's backward does the same. In a recorded graph (``make_fx``)
the broadcast is an explicit ``expand``, and an elementwise operation commutes with it:
``log(expand(s)) == expand(log(s))``. :func:`sink_expands` moves expands after such operations,
so they run on the small tensors; TorchScript's freezing passes do not do this rewrite. In-place
updates of fresh tensors (autograd's ``clamp`` backward builds its mask with ``logical_and_``)
are made out-of-place first, so that the operations before them can be rewritten too. Measured
on the benchmark mixture (K = 3, N = 1,000, 4 chains): potential and gradient 390 -> 265 us.
"""

import torch
from torch import fx

__all__ = ["sink_expands"]

aten = torch.ops.aten

# Elementwise operations: of one tensor (other arguments Python numbers), of two, and where.
_ELEMENTWISE = {
    aten.abs.default, aten.exp.default, aten.expm1.default, aten.log.default, aten.log1p.default,
    aten.neg.default, aten.reciprocal.default, aten.rsqrt.default, aten.sigmoid.default, aten.sqrt.default,
    aten.square.default, aten.tanh.default, aten.lgamma.default, aten.digamma.default,
    aten.pow.Tensor_Scalar, aten.mul.Scalar, aten.div.Scalar, aten.add.Scalar, aten.sub.Scalar,
    aten.rsub.Scalar, aten.clamp.default, aten.clamp_min.default, aten.clamp_max.default,
    aten.eq.Scalar, aten.ne.Scalar, aten.ge.Scalar, aten.gt.Scalar, aten.le.Scalar, aten.lt.Scalar,
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.rsub.Tensor,
    aten.pow.Tensor_Tensor, aten.maximum.default, aten.minimum.default, aten.eq.Tensor, aten.ne.Tensor,
    aten.ge.Tensor, aten.gt.Tensor, aten.le.Tensor, aten.lt.Tensor, aten.logical_and.default,
    aten.logical_or.default, aten.where.self,
}

# In-place operations and their out-of-place forms.
_OUT_OF_PLACE = {
    aten.logical_and_.default: aten.logical_and.default, aten.logical_or_.default: aten.logical_or.default,
    aten.clamp_.default: aten.clamp.default, aten.clamp_min_.default: aten.clamp_min.default,
    aten.clamp_max_.default: aten.clamp_max.default, aten.masked_fill_.Scalar: aten.masked_fill.Scalar,
}


def _value(node: object) -> torch.Tensor | None:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def sink_expands(module: fx.GraphModule) -> int:
    """Move ``expand`` nodes of ``module`` after the elementwise operations that consume them.

    An operation is rewritten when each of its tensor arguments is an ``expand`` or 0-d, its
    tensor arguments have one dtype (so that type promotion cannot depend on shapes), and no
    in-place operation writes to its result. ``pow(x, 1)`` (autograd's derivative of a square)
    becomes ``x``. Rewritten in place; the caller checks the result against the original function.

    Returns:
        The number of operations rewritten.

    Example:
        >>> from torch.fx.experimental.proxy_tensor import make_fx
        >>> module = make_fx(lambda s: s.expand(3, 1000).log().sum())(torch.ones(3, 1))
        >>> sink_expands(module)
        1
        >>> [str(node.target) for node in module.graph.nodes if node.op == "call_function"]
        ['aten.log.default', 'aten.expand.default', 'aten.sum.default']
    """
    graph = module.graph
    rewritten = 0
    # An in-place update of a tensor nothing else reads is an out-of-place operation (and lets the
    # operations before it be rewritten).
    for node in list(graph.nodes):
        target = node.args[0] if node.op == "call_function" and node.target in _OUT_OF_PLACE else None
        if isinstance(target, fx.Node) and len(target.users) == 1 and _owns_memory(target):
            with graph.inserting_before(node):
                replacement = graph.call_function(_OUT_OF_PLACE[node.target], node.args, dict(node.kwargs))
            replacement.meta.update(node.meta)
            node.replace_all_uses_with(replacement)
            graph.erase_node(node)
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _ELEMENTWISE or _value(node) is None:
            continue
        if any(_mutates(user) for user in node.users):  # an in-place update cannot write to an expand
            continue
        out = _value(node)
        if node.target is aten.pow.Tensor_Scalar and node.args[1] == 1 and _value(node.args[0]).dtype == out.dtype \
                and _value(node.args[0]).shape == out.shape:
            node.replace_all_uses_with(node.args[0])
            rewritten += 1
            continue
        tensors = [arg for arg in node.args if isinstance(arg, fx.Node)]
        expands = [arg for arg in tensors if arg.target is aten.expand.default]
        # Every tensor argument broadcast by an expand or a 0-d tensor, at least one expand.
        if not expands or any(arg not in expands and _value(arg).dim() != 0 for arg in tensors):
            continue
        values = tensors[1:] if node.target is aten.where.self else tensors  # where's condition is boolean
        if len({_value(arg).dtype for arg in values}) != 1:
            continue
        sources = {arg: _unexpanded(arg) for arg in expands}
        small = [_value(source) for source in sources.values()]
        if any(value is None for value in small):
            continue
        shape = torch.broadcast_shapes(*(value.shape for value in small))
        if shape == out.shape:
            continue
        with graph.inserting_before(node):
            args = tuple(sources.get(arg, arg) if isinstance(arg, fx.Node) else arg for arg in node.args)
            smaller = graph.call_function(node.target, args, dict(node.kwargs))
            smaller.meta["val"] = node.target(*(_meta(arg) for arg in args), **node.kwargs)
            expanded = graph.call_function(aten.expand.default, (smaller, list(out.shape)))
            expanded.meta["val"] = smaller.meta["val"].expand(out.shape)
        node.replace_all_uses_with(expanded)
        rewritten += 1
    graph.eliminate_dead_code()
    module.recompile()
    return rewritten


def _owns_memory(node: fx.Node) -> bool:
    """Whether ``node`` computes a new tensor (not an input, not a view of another tensor)."""
    schema = getattr(node.target, "_schema", None)
    return node.op == "call_function" and schema is not None and not schema.is_mutable and all(
        result.alias_info is None for result in schema.returns)


def _mutates(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return node.op == "call_function" and schema is not None and schema.is_mutable


def _unexpanded(node: fx.Node) -> fx.Node:
    """The tensor that a chain of ``expand`` nodes broadcasts."""
    while node.op == "call_function" and node.target is aten.expand.default:
        node = node.args[0]
    return node


def _meta(arg: object) -> object:
    """An argument as a tensor on the meta device (shape and dtype only), numbers as they are."""
    value = _value(arg)
    if value is None:
        return arg
    return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")
