"""Rewrite a recorded aten graph so that it does less work on large tensors.

Pyro's distributions broadcast their parameters to the batch shape before computing
(``broadcast_all``): in a mixture of ``K`` components over ``N`` points and ``C`` chains,
``Normal(loc, scale).log_prob(y)`` takes ``log(scale)`` and ``scale ** 2`` of ``C * K * N``
copies of ``C`` numbers, and autograd's backward does the same. In a recorded graph (``make_fx``)
the broadcast is an explicit ``expand``, and an elementwise operation commutes with it:
``log(expand(s)) == expand(log(s))``. :func:`sink_expands` moves expands after such operations,
so they run on the small tensors; :func:`factor_sums` takes factors that are constant along a
sum's dimensions out of the sum (autograd's gradient of a broadcast parameter is such a sum);
:func:`merge_duplicates` computes repeated operations once and :func:`fold_constants` what
depends on no input. TorchScript's freezing passes do not do the first two, nor fold what comes
through ``lift_fresh_copy``. In-place updates that nothing could observe (autograd's backward
passes write some) are made out-of-place first (:func:`make_out_of_place`), so that the
operations before them can be rewritten too; :func:`batch_matrix_products` multiplies a constant
matrix by all chains' vectors at once. Measured on the benchmark mixture (K = 3,
N = 1,000, 4 chains, potential and gradient): 390 -> 265 us with :func:`sink_expands`, large
operations 39 -> 23 and 257 -> 250 us with :func:`factor_sums` too (what remains is mostly the
~0.5 us each of ~250 operations on small tensors).
"""

import torch
from torch import fx
from torch.fx.passes.dialect.common.cse_pass import CSEPass, get_CSE_banned_ops

__all__ = ["batch_matrix_products", "factor_sums", "fold_constants", "make_out_of_place", "merge_duplicates",
           "simplify", "sink_expands"]

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

def _value(node: object) -> torch.Tensor | None:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def make_out_of_place(module: fx.GraphModule) -> int:
    """Rewrite in-place updates that nothing could observe as out-of-place operations.

    ``op_(x, ...)`` becomes ``op(x, ...)`` where ``x`` is a new tensor (not an input, not a view)
    that no view shares and nothing reads after the update, and the result keeps its shape and
    dtype. Autograd's backward passes write such updates (``clamp``'s mask with ``logical_and_``,
    ``cumprod``'s with ``scatter_``, ``bitwise_and_`` and ``relu_``); one left in a graph keeps
    :func:`merge_duplicates` and :func:`fold_constants` from running (the benchmark mixture's
    ordered transform: potential and gradient 226 -> 211 us with them, 4 chains).

    Returns:
        The number of updates rewritten.
    """
    graph = module.graph
    order = {node: index for index, node in enumerate(graph.nodes)}
    rewritten = 0
    for node in list(graph.nodes):
        op = _out_of_place(node.target) if node.op == "call_function" else None
        target = node.args[0] if op is not None and node.args else None
        if not isinstance(target, fx.Node) or not _owns_memory(target):
            continue
        others = [user for user in target.users if user is not node]
        if any(order[user] > order[node] or not _owns_memory(user) for user in others):
            continue
        try:
            value = op(*fx.node.map_arg(node.args, _meta), **fx.node.map_arg(node.kwargs, _meta))
        except (RuntimeError, TypeError):  # no meta kernel: leave it
            continue
        updated = _value(node)
        if not isinstance(value, torch.Tensor) or value.shape != updated.shape or value.dtype != updated.dtype:
            continue  # type promotion or broadcasting that the update did not do
        with graph.inserting_before(node):
            replacement = graph.call_function(op, node.args, dict(node.kwargs))
        replacement.meta.update(node.meta)
        order[replacement] = order[node]
        node.replace_all_uses_with(replacement)
        graph.erase_node(node)
        rewritten += 1
    if rewritten:
        module.recompile()
    return rewritten


def _out_of_place(op: object) -> object | None:
    """``aten.name.overload`` for an in-place ``aten.name_.overload``, if there is one."""
    schema = getattr(op, "_schema", None)
    if schema is None or not schema.is_mutable or not schema.name.startswith("aten::") \
            or not schema.name.endswith("_") or schema.name.endswith("__"):
        return None
    packet = getattr(aten, schema.name[len("aten::"):-1], None)
    return getattr(packet, op._overloadname, None) if packet is not None else None


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
    make_out_of_place(module)  # lets the operations before an update be rewritten too
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


# Operations through which a product is collected: a factor, a sign or a number.
_PRODUCT = {aten.mul.Tensor, aten.div.Tensor, aten.neg.default, aten.mul.Scalar, aten.div.Scalar}


def simplify(module: fx.GraphModule) -> int:
    """:func:`sink_expands`, :func:`factor_sums`, :func:`merge_duplicates`, :func:`fold_constants`,
    then :func:`batch_matrix_products`; the number of rewrites."""
    return (sink_expands(module) + factor_sums(module) + merge_duplicates(module) + fold_constants(module)
            + batch_matrix_products(module))


# Random operations (as overload packets): never merged nor folded.
_RANDOM = get_CSE_banned_ops()
# Operations whose result depends only on their arguments' shapes and dtypes (fixed in a recording).
_SHAPE_ONLY = {aten.zeros_like.default, aten.ones_like.default, aten.full_like.default, aten.zeros.default,
               aten.ones.default, aten.full.default, aten.scalar_tensor.default, aten.new_zeros.default,
               aten.new_ones.default, aten.new_full.default}
# Operations that return their first argument unchanged in a graph that mutates nothing (no
# autograd at run time) when their numeric argument is this identity and the shape stays.
_IDENTITY = {aten.add.Tensor: 0, aten.sub.Tensor: 0, aten.mul.Tensor: 1, aten.div.Tensor: 1, aten.add.Scalar: 0,
             aten.sub.Scalar: 0, aten.mul.Scalar: 1, aten.div.Scalar: 1}
# Folded results at most this large (elements) are stored as constants, or at most as large as
# the constants they are computed from: an expand of a constant over the data stays an expand.
FOLD_ELEMENTS = 256


def fold_constants(module: fx.GraphModule) -> int:
    """Compute once what does not depend on the inputs, and drop operations that do nothing.

    A recorded potential computes from constants (``log(scale)``, ``scale ** 2`` of a prior's
    fixed scale; autograd's ``ones_like`` seeds; the zero log-Jacobian of an identity transform)
    at every call, each for ~0.4 us; TorchScript's freezing does not fold them (they come
    through ``lift_fresh_copy``). Here such operations become constants, and ``detach``, ``x +
    0``, ``x * 1``, and ``view``/``expand`` to the same shape are replaced by their input. Eight
    schools' potential and gradient: 170 -> 124 operations, 66 -> 58 us (4 chains). Skipped where
    the graph mutates a tensor (a folded constant would then be changed).

    Returns:
        The number of nodes removed.
    """
    graph = module.graph
    if any(_mutates(node) for node in graph.nodes):
        return 0
    before = len(graph.nodes)
    constants = {node: getattr(module, node.target) for node in graph.nodes if node.op == "get_attr"}
    for index, node in enumerate(list(graph.nodes)):
        if node.op != "call_function" or not isinstance(_value(node), torch.Tensor):
            continue
        replacement = _identity_input(node)
        if replacement is not None:
            node.replace_all_uses_with(replacement)
            graph.erase_node(node)
            continue
        value = _folded(node, constants)
        if value is None:
            continue
        name = f"_folded_{index}"
        module.register_buffer(name, value)
        with graph.inserting_before(node):
            constant = graph.get_attr(name)
        constant.meta["val"] = node.meta["val"]
        node.replace_all_uses_with(constant)
        graph.erase_node(node)
        constants[constant] = value
    graph.eliminate_dead_code()
    module.recompile()
    return before - len(graph.nodes)


def _folded(node: fx.Node, constants: dict[fx.Node, torch.Tensor]) -> torch.Tensor | None:
    """The value of ``node`` where it depends on constants (or shapes) only and is small."""
    schema = getattr(node.target, "_schema", None)
    if schema is None or schema.is_mutable or not schema.name.startswith("aten::") \
            or node.target.overloadpacket in _RANDOM:
        return None
    inputs = node.all_input_nodes
    shape_only = node.target in _SHAPE_ONLY
    if not shape_only and not all(arg in constants for arg in inputs):
        return None

    def concrete(arg: fx.Node) -> torch.Tensor:
        if arg in constants:
            return constants[arg]
        meta = _value(arg)  # only the shape and dtype of a shape-only operation's argument matter
        return torch.empty(meta.shape, dtype=meta.dtype, device=meta.device)

    args, kwargs = fx.node.map_arg((node.args, node.kwargs), concrete)
    value = node.target(*args, **kwargs)
    source = sum(constants[arg].numel() for arg in inputs if arg in constants)
    if not isinstance(value, torch.Tensor) or value.numel() > max(FOLD_ELEMENTS, source):
        return None
    return value.clone()


def _identity_input(node: fx.Node) -> fx.Node | None:
    """The input that ``node`` returns unchanged (same shape and dtype), if it does."""
    value, first = _value(node), node.args[0] if node.args else None
    if not isinstance(first, fx.Node) or not isinstance(_value(first), torch.Tensor):
        return None
    same = _value(first).shape == value.shape and _value(first).dtype == value.dtype
    if node.target is aten.detach.default:
        return first
    if node.target in (aten.view.default, aten.expand.default, aten.reshape.default):
        return first if same else None
    if node.target in _IDENTITY and len(node.args) == 2 and not node.kwargs:
        other = node.args[1]
        return first if same and isinstance(other, (int, float)) and other == _IDENTITY[node.target] else None
    return None


def merge_duplicates(module: fx.GraphModule) -> int:
    """Compute each distinct operation on the same arguments once (common subexpressions), with
    torch.fx's ``CSEPass`` (random operations left alone). A model that builds the same
    distribution at every step (a ``pyro.markov`` HMM indexing its transition matrix by the
    enumerated state) records the same operations again and again: at T = 100, 9,900 nodes
    become 6,900. Skipped where the graph mutates a tensor (two equal results could then differ).

    Returns:
        The number of nodes removed.
    """
    graph = module.graph
    if any(_mutates(node) for node in graph.nodes):
        return 0
    before = len(graph.nodes)
    merged = CSEPass(banned_ops=_RANDOM)(module).graph_module.graph
    merged.eliminate_dead_code()
    module.graph = merged
    module.recompile()
    return before - len(merged.nodes)


def batch_matrix_products(module: fx.GraphModule) -> int:
    """Multiply a constant tall matrix by several independent vectors in one matrix product.

    A model whose code does not broadcast over chains (``X @ beta``) is recorded one chain at a
    time, so its graph holds one ``mm(X, beta_c)`` per chain, each reading all of ``X``. Here
    they become ``mm(stack(beta_c), X^T)``, whose rows are the chains' products (contiguous, as
    the single products were): logistic regression's ``X`` of 10,000 x 20, 4 chains, one thread:
    92 -> 60 us. Only tall matrices (more rows than columns): the gradient's products with the
    wide ``X^T`` are as fast one by one (77 us) as batched (85 us with the stacking). Skipped
    where the graph mutates a tensor.

    Returns:
        The number of products merged away.

    Example:
        >>> from torch.fx.experimental.proxy_tensor import make_fx
        >>> X = torch.randn(100, 3)
        >>> module = make_fx(lambda b: ((X @ b[0:1].T).sum() + (X @ b[1:2].T).sum(),))(torch.randn(2, 3))
        >>> batch_matrix_products(module)
        1
    """
    graph = module.graph
    if any(_mutates(node) for node in graph.nodes):
        return 0
    groups: dict[int, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op != "call_function" or node.target is not aten.mm.default:
            continue
        matrix, vector = node.args
        if matrix.op != "get_attr" or _value(matrix) is None or _value(vector) is None:
            continue
        rows, columns = _value(matrix).shape
        if rows > columns and tuple(_value(vector).shape) == (columns, 1) \
                and _value(vector).dtype == _value(matrix).dtype:
            groups.setdefault(id(getattr(module, matrix.target)), []).append(node)
    merged = 0
    for products in groups.values():
        batch, downstream = [], set()
        for product in products:  # in graph order: a product fed by an earlier one starts no new batch
            if product.args[1] not in downstream:
                batch.append(product)
                downstream |= _downstream(product)
        if len(batch) > 1:
            _merge_products(module, batch)
            merged += len(batch) - 1
    if merged:
        _sort_topologically(module)  # a new graph
        module.graph.eliminate_dead_code()
        module.recompile()
    return merged


def _downstream(node: fx.Node) -> set[fx.Node]:
    """``node`` and every node that reads its result, directly or not."""
    seen, stack = {node}, [node]
    while stack:
        for user in stack.pop().users:
            if user not in seen:
                seen.add(user)
                stack.append(user)
    return seen


def _merge_products(module: fx.GraphModule, products: list[fx.Node]) -> None:
    """Replace ``mm(X, v_i)`` (``v_i`` of shape (k, 1)) by rows of ``mm(stack(v_i^T), X^T)``."""
    graph = module.graph
    matrix = products[0].args[0]
    name = f"_transposed_{matrix.target}"
    if not hasattr(module, name):
        module.register_buffer(name, getattr(module, matrix.target).t().contiguous())
    with graph.inserting_before(products[0]):  # the order is repaired by the caller's sort
        transposed = graph.get_attr(name)
        transposed.meta["val"] = _meta(matrix).t().contiguous()
        rows = [_call(graph, aten.t.default, (product.args[1],)) for product in products]
        stacked = _call(graph, aten.cat.default, (rows,))
        batched = _call(graph, aten.mm.default, (stacked, transposed))
        for index, product in enumerate(products):
            row = _call(graph, aten.select.int, (batched, 0, index))
            product.replace_all_uses_with(_call(graph, aten.unsqueeze.default, (row, -1)))
            graph.erase_node(product)


def _sort_topologically(module: fx.GraphModule) -> None:
    try:  # keeps the recorded order where it can, in the PyTorch versions that have it
        from torch.fx.passes.tools_common import stable_topological_sort as sort
    except ImportError:
        from torch.fx.passes.tools_common import legalize_graph as sort
    sort(module)


def factor_sums(module: fx.GraphModule) -> int:
    """Move factors that are constant along a sum's dimensions out of the sum.

    ``sum(x * expand(a) / expand(b) * -2, dims) == sum(x, dims) * a / b * -2`` when ``a`` and
    ``b`` have size 1 along ``dims``: autograd's gradient of a parameter broadcast over the data
    (a scale per chain and component, used by ``N`` points) is such a sum of a product, and the
    rewrite leaves one large multiplication where there were one per factor. A sum of a sum or
    difference of such products is split first when that lets factors out. Products are
    collected through ``mul``, ``div`` (numerators), ``neg`` and multiplications by numbers, and
    only through operations nothing else reads. Rewritten in place; the caller checks the result.

    Returns:
        The number of sums rewritten.

    Example:
        >>> from torch.fx.experimental.proxy_tensor import make_fx
        >>> module = make_fx(lambda x, s: (-(x * s.expand(4, 1000))).sum([1]))(torch.ones(4, 1000), torch.ones(4, 1))
        >>> factor_sums(module)
        1
        >>> [str(node.target) for node in module.graph.nodes if node.op == "call_function"]
        ['aten.sum.dim_IntList', 'aten.mul.Tensor', 'aten.mul.Scalar', 'aten.squeeze.dims']
    """
    graph = module.graph
    rewritten = 0
    work = [node for node in graph.nodes if _sum_dims(node) is not None]
    while work:
        node = work.pop()
        dims = _sum_dims(node)
        if dims is None or not node.users:
            continue
        summed = node.args[0]
        keepdim = node.target is aten.sum.dim_IntList and len(node.args) > 2 and node.args[2]
        if _splits(summed, dims):
            with graph.inserting_before(node):
                left, right = (_call(graph, aten.sum.dim_IntList, (arg, dims, True)) for arg in summed.args[:2])
                result = _keep(graph, _call(graph, summed.target, (left, right)), dims, keepdim)
            work += [left, right]
        else:
            product = _product(summed, dims)
            if product is None:
                continue
            inner, outer, coefficient = product
            with graph.inserting_before(node):
                result = inner[0][0]
                for factor, power in inner[1:]:
                    result = _call(graph, aten.mul.Tensor if power > 0 else aten.div.Tensor, (result, factor))
                result = _call(graph, aten.sum.dim_IntList, (result, dims, True))
                for factor, power in outer:
                    result = _call(graph, aten.mul.Tensor if power > 0 else aten.div.Tensor, (result, factor))
                if coefficient != 1:
                    result = _call(graph, aten.mul.Scalar, (result, coefficient))
                kept = [1 if d in dims else size for d, size in enumerate(_value(summed).shape)]
                if list(_value(result).shape) != kept:
                    result = _call(graph, aten.expand.default, (result, kept))
                result = _keep(graph, result, dims, keepdim)
        node.replace_all_uses_with(result)
        graph.erase_node(node)
        if not summed.users:  # a split sum's operands are read by the new sums only
            graph.erase_node(summed)
        rewritten += 1
    graph.eliminate_dead_code()
    module.recompile()
    return rewritten


def _sum_dims(node: fx.Node) -> list[int] | None:
    """The (non-negative) dimensions a plain floating-point ``sum`` node reduces, else None."""
    if node.op != "call_function" or node.kwargs or _value(node) is None:
        return None
    if node.target is aten.sum.default and len(node.args) == 1:
        value = _value(node.args[0])
        return list(range(value.dim())) if value is not None and value.is_floating_point() else None
    if node.target is not aten.sum.dim_IntList or len(node.args) < 2 or not node.args[1]:
        return None
    value = _value(node.args[0])
    if value is None or not value.is_floating_point() or value.dim() == 0:
        return None
    return sorted({d % value.dim() for d in node.args[1]})


def _keep(graph: fx.Graph, node: fx.Node, dims: list[int], keepdim: bool) -> fx.Node:
    return node if keepdim else _call(graph, aten.squeeze.dims, (node, dims))


def _call(graph: fx.Graph, target: object, args: tuple[object, ...]) -> fx.Node:
    """A new node computing ``target(*args)``, its shape and dtype recorded for later passes."""
    node = graph.call_function(target, args)
    node.meta["val"] = target(*fx.node.map_arg(args, _meta))
    return node


def _private(node: object, like: torch.Tensor) -> bool:
    """Whether ``node`` is an operation only one other node reads, shaped and typed like ``like``."""
    value = _value(node)
    return (node.op == "call_function" and len(node.users) == 1 and value is not None
            and value.shape == like.shape and value.dtype == like.dtype)


def _splits(node: object, dims: list[int]) -> bool:
    """Whether ``sum(node, dims)`` is worth writing as the sum or difference of two sums."""
    value = _value(node)
    if value is None or node.target not in (aten.add.Tensor, aten.sub.Tensor) or node.kwargs \
            or len(node.args) != 2 or len(node.users) != 1:
        return False
    if not all(isinstance(arg, fx.Node) and _value(arg) is not None and _value(arg).shape == value.shape
               and _value(arg).dtype == value.dtype for arg in node.args):
        return False
    return any(_splits(arg, dims) or _product(arg, dims) is not None for arg in node.args)


def _product(node: object, dims: list[int]) -> tuple[list, list, float] | None:
    """``node`` as (factors varying along ``dims``, factors constant along them, a number), each
    factor a (node, +1 or -1) pair, where taking the constant ones and the number out of
    ``sum(node, dims)`` saves work; else None."""
    value = _value(node)
    if value is None or not isinstance(node, fx.Node) or len(node.users) != 1:
        return None
    factors: list[tuple[fx.Node, int]] = []
    coefficient = 1.0

    def collect(part: fx.Node, power: int) -> None:
        nonlocal coefficient
        if power > 0 and (part is node or _private(part, value)) and part.target in _PRODUCT and not part.kwargs:
            if part.target is aten.neg.default:
                coefficient = -coefficient
                collect(part.args[0], power)
                return
            first, second = part.args[:2] if len(part.args) > 1 else (part.args[0], None)
            if isinstance(first, fx.Node) and isinstance(second, fx.Node) and _value(first).dtype == value.dtype \
                    and _value(second).dtype == value.dtype:
                collect(first, power)
                collect(second, power if part.target is aten.mul.Tensor else -power)
                return
            if isinstance(first, fx.Node) and isinstance(second, int | float) and not isinstance(second, bool):
                multiplies = part.target in (aten.mul.Scalar, aten.mul.Tensor)
                coefficient = coefficient * second if multiplies else coefficient / second
                collect(first, power)
                return
        factors.append((part, power))

    collect(node, 1)
    inner, outer = [], []
    for factor, power in factors:
        source = _unexpanded(factor)
        shape = _value(source).shape
        padded = (1,) * (value.dim() - len(shape)) + tuple(shape)
        constant = len(shape) <= value.dim() and all(padded[d] == 1 for d in dims)
        (outer if constant else inner).append((source if constant else factor, power))
    if not inner or inner[0][1] < 0 or (not outer and coefficient == 1):
        return None
    shape = torch.broadcast_shapes(*(_value(factor).shape for factor, _ in inner))
    if len(shape) != value.dim() or any(shape[d] != value.shape[d] for d in dims):
        return None  # the varying factors alone are broadcast along a summed dimension
    return inner, outer, coefficient


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
