"""Sinking expands below elementwise operations: same values, smaller operations."""

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from latentkit.inference.kernels.simplify import (
    batch_matrix_products,
    factor_sums,
    fold_constants,
    make_out_of_place,
    merge_duplicates,
    sink_expands,
)


def broadcast_log_density(loc, scale, y):
    """Normal log density and its gradient the way Pyro computes it: parameters broadcast first."""
    loc, scale = loc.detach().requires_grad_(), scale.detach().requires_grad_()
    shape = torch.broadcast_shapes(loc.shape, scale.shape, y.shape)
    big_loc, big_scale = loc.expand(shape), scale.expand(shape)
    log_density = -((y - big_loc) ** 2) / (2 * big_scale**2) - big_scale.log() - 0.5 * torch.log(torch.tensor(6.2832))
    clamped = big_scale.clamp(0.1, 10.0)  # its backward updates a mask in place
    total = log_density.sum() + torch.where(big_scale > 1.0, clamped, torch.tensor(0.0)).sum()
    return (total, *torch.autograd.grad(total, (loc, scale)))


def test_sunk_graph_computes_the_same_with_fewer_large_operations():
    args = (torch.randn(4, 1, 3), torch.rand(4, 1, 1) + 0.5, torch.randn(1000, 3))
    module = make_fx(broadcast_log_density)(*args)

    def large_operations():
        return sum(1 for node in module.graph.nodes if node.op == "call_function" and "expand" not in str(node.target)
                   and isinstance(node.meta.get("val"), torch.Tensor) and node.meta["val"].numel() >= 1000)

    before = large_operations()
    assert sink_expands(module) >= 4
    assert large_operations() <= before - 4  # log, square, mul of the scale, and their derivatives
    for trial in range(3):
        point = tuple(arg + 0.1 * trial for arg in args)
        for expected, actual in zip(broadcast_log_density(*point), module(*point), strict=True):
            torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


def test_operations_mixing_dtypes_are_left_alone():
    def mixed(x, y):  # float64 expand and a float32 expand: promotion must see both as they are
        return (x.expand(5, 3) + y.expand(5, 3),)

    module = make_fx(mixed)(torch.ones(1, 3, dtype=torch.float64), torch.ones(1, 3, dtype=torch.float32))
    assert sink_expands(module) == 0


def test_in_place_updates_become_out_of_place_only_where_nothing_else_sees_them():
    def updates(x):
        fresh = (x * 2).clamp_(min=0.0)  # a new tensor: becomes clamp
        base = x + 1
        base[:, :1].clamp_(max=0.0)  # writes through a view into base: must stay in place
        return fresh, base

    x = torch.linspace(-2, 2, 12).reshape(4, 3)
    module = make_fx(updates)(x)
    sink_expands(module)
    targets = [node.target for node in module.graph.nodes if node.op == "call_function"]
    assert torch.ops.aten.clamp.default in targets and torch.ops.aten.clamp_.default in targets
    for expected, actual in zip(updates(x.clone()), module(x.clone()), strict=True):
        torch.testing.assert_close(actual, expected)


def test_updates_after_the_last_read_become_out_of_place():
    def updates(x, y):
        flags = x > 0
        first = flags.float().sum()  # read before the update: it may become out of place
        flags.logical_and_(y > 0)
        later = (x + 1).relu_()  # a fresh tensor nothing else reads
        kept = x * 2
        kept.add_(y.double())
        narrow = y * 2
        narrow.add_(x)  # float64 into float32: out of place it would be float64, so it stays
        seen = (y * 2).sum()
        doubled = y * 2
        head = doubled[:2]
        doubled.mul_(3)  # a view of it is read after the update: must stay in place
        return first, flags, later, kept, narrow, seen + head.sum()

    args = (torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float32))
    module = make_fx(updates)(*args)
    assert make_out_of_place(module) == 3
    targets = {node.target for node in module.graph.nodes if node.op == "call_function"}
    assert torch.ops.aten.mul_.Tensor in targets and torch.ops.aten.add_.Tensor in targets
    assert torch.ops.aten.logical_and_.default not in targets and torch.ops.aten.relu_.default not in targets
    point = (torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float32))
    for expected, actual in zip(updates(*point), module(*point), strict=True):
        torch.testing.assert_close(actual, expected)


def scale_gradient(x, s, t):
    """Sums of products with factors broadcast along the summed dimension, as autograd writes them."""
    big_s, big_t = s.expand(4, 1000), t.expand(4, 1000)
    product = -(x * big_s) / big_t * 2.0
    shared = x * big_s  # read twice: must stay
    return (product.sum([1]), (x * x + x * big_t).sum([1], keepdim=True), (x * 3.0).sum(), shared.sum([1]),
            shared, (x * big_s).sum([1], dtype=torch.float64))


def test_factor_sums_takes_broadcast_factors_out_of_sums():
    args = (torch.randn(4, 1000), torch.rand(4, 1) + 0.5, torch.rand(4, 1) + 0.5)
    module = make_fx(scale_gradient)(*args)

    def large_products():
        return sum(1 for node in module.graph.nodes if node.op == "call_function"
                   and node.target in (torch.ops.aten.mul.Tensor, torch.ops.aten.div.Tensor, torch.ops.aten.neg.default,
                                       torch.ops.aten.mul.Scalar)
                   and node.meta["val"].numel() >= 1000)

    before = large_products()
    # The first product, the second's split sum, the full sum; the twice-read product and the
    # sum with a dtype stay.
    assert factor_sums(module) == 4
    assert large_products() == before - 6  # the first product's four, x * big_t, x * 3
    for trial in range(3):
        point = tuple(arg + 0.1 * trial for arg in args)
        for expected, actual in zip(scale_gradient(*point), module(*point), strict=True):
            assert actual.shape == expected.shape and actual.dtype == expected.dtype
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-4)


def test_factor_sums_keeps_factors_that_vary_along_the_sum():
    def varying(x, y):
        return ((x * y.expand(4, 1000)).sum([1]),)  # y varies along the summed dimension

    module = make_fx(varying)(torch.randn(4, 1000), torch.randn(1, 1000))
    assert factor_sums(module) == 0


def test_repeated_operations_are_computed_once():
    def repeated(probs, x):  # the same normalisation at every "step", as a pyro.markov model records it
        total = 0.0
        for step in range(5):
            normalised = probs / probs.sum(-1, keepdim=True)
            total = total + (normalised.log() * x[step]).sum()
        return (total,)

    args = (torch.rand(3, 2) + 0.1, torch.randn(5, 3, 2))
    module = make_fx(repeated)(*args)
    divisions = sum(1 for node in module.graph.nodes if node.target is torch.ops.aten.div.Tensor)
    assert divisions == 5
    assert merge_duplicates(module) >= 4 * 3  # sum, div and log of four steps
    assert sum(1 for node in module.graph.nodes if node.target is torch.ops.aten.div.Tensor) == 1
    point = (torch.rand(3, 2) + 0.1, torch.randn(5, 3, 2))
    torch.testing.assert_close(module(*point)[0], repeated(*point)[0], rtol=1e-12, atol=1e-12)


def test_graphs_that_mutate_are_not_merged():
    def mutating(x):
        a = x * 2
        b = x * 2
        a.add_(1.0)  # merging b into a would make b see this
        return (a + b,)

    module = make_fx(mutating)(torch.ones(3))
    assert merge_duplicates(module) == 0
    torch.testing.assert_close(module(torch.ones(3))[0], torch.full((3,), 5.0))


def test_constant_work_is_done_once_and_no_ops_are_dropped():
    scale = torch.tensor(2.0)

    def prior(x):  # a Normal prior's log density: log(scale) and scale**2 depend on no input
        log_density = -((x - 1.0) ** 2) / (2 * scale**2) - scale.log() + torch.zeros_like(x) * 1
        return ((log_density + 0).detach().view(x.shape).sum(),)

    module = make_fx(prior)(torch.randn(3))
    operations = sum(1 for node in module.graph.nodes if node.op == "call_function")
    removed = fold_constants(module)
    assert removed >= 6  # pow, mul, log of the scale, zeros_like, the * 1 and + 0, detach, view
    targets = {node.target for node in module.graph.nodes if node.op == "call_function"}
    assert torch.ops.aten.log.default not in targets and torch.ops.aten.detach.default not in targets
    assert sum(1 for node in module.graph.nodes if node.op == "call_function") <= operations - 6
    point = torch.randn(3)
    torch.testing.assert_close(module(point)[0], prior(point)[0], rtol=1e-12, atol=1e-12)


def test_broadcast_constants_stay_small_and_random_numbers_stay_random():
    table = torch.arange(4.0)

    def fn(x):  # a constant expanded over 10,000 points: folding would store all 40,000 values
        return ((x + table.log1p().expand(10_000, 4)).sum() + torch.rand(()),)

    module = make_fx(fn)(torch.zeros(10_000, 4))
    fold_constants(module)
    assert torch.ops.aten.expand.default in {node.target for node in module.graph.nodes}
    assert all(buffer.numel() <= 4 for buffer in module.buffers())
    assert module(torch.zeros(10_000, 4))[0] != module(torch.zeros(10_000, 4))[0]


def test_graphs_that_mutate_are_not_folded():
    def mutating(x):
        a = torch.ones(3) * 2  # constant, but written to below
        a.add_(x)
        return (a,)

    module = make_fx(mutating)(torch.ones(3))
    assert fold_constants(module) == 0
    torch.testing.assert_close(module(torch.ones(3))[0], torch.full((3,), 3.0))
    torch.testing.assert_close(module(torch.ones(3))[0], torch.full((3,), 3.0))


def test_products_with_one_tall_matrix_become_one_product():
    X = torch.randn(50, 3, dtype=torch.float64)
    wide = torch.randn(3, 50, dtype=torch.float64)

    def per_chain(b):  # as a model that does not broadcast over chains is recorded
        first = X @ b[0].unsqueeze(-1)
        second = X @ (b[1].unsqueeze(-1) + first[:3])  # fed by the first product: not in its batch
        third = X @ b[2].unsqueeze(-1)
        return (first.sin().sum() + second.sum() + third.exp().sum() + (wide @ first).sum(),)

    module = make_fx(per_chain)(torch.randn(3, 3, dtype=torch.float64))
    assert batch_matrix_products(module) == 1  # the first and third; the wide matrix is left alone
    products = [node for node in module.graph.nodes if node.target is torch.ops.aten.mm.default]
    assert len(products) == 3
    point = torch.randn(3, 3, dtype=torch.float64)
    torch.testing.assert_close(module(point)[0], per_chain(point)[0], rtol=1e-12, atol=1e-12)
