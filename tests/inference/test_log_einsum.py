import pytest
import torch
from pyro.ops.einsum import torch_log

from latentkit.inference import log_einsum


@pytest.mark.parametrize("equation", ["ab,bc->ac", "xab,xbc->xac", "ab,b->a", "a,a->", "abc->ca", "ab,ab->ab",
                                      "ab,bc,cd->ad"])
def test_equals_pyros_log_space_einsum_in_value_and_gradient(equation):
    generator = torch.Generator().manual_seed(0)
    sizes = dict(zip("abcdx", (2, 3, 4, 2, 5), strict=True))
    inputs = equation.split("->")[0].split(",")
    operands = [torch.randn([sizes[s] for s in term], generator=generator, dtype=torch.float64) for term in inputs]
    operands[0][(0,) * operands[0].dim()] = -float("inf")  # an impossible value
    results = []
    for backend in (torch_log.einsum, log_einsum.einsum):
        leaves = [operand.clone().requires_grad_() for operand in operands]
        value = backend(equation, *leaves)
        weights = torch.randn(value.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        # Results of -inf get no weight, as from any log-sum-exp after them (Pyro's gradient by
        # the other operands of a -inf term is 0, the sum's is 1; neither reaches a potential).
        weights = torch.where(torch.isneginf(value), 0.0, weights)
        results.append((value, torch.autograd.grad((value * weights).sum(), leaves)))
    (expected, expected_grads), (value, grads) = results
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)


def test_a_dimension_of_size_one_broadcasts_as_in_pyro():
    x = torch.randn(2, 1, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y = torch.randn(3, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.testing.assert_close(log_einsum.einsum("ab,bc->ac", x, y), torch_log.einsum("ab,bc->ac", x, y),
                               rtol=1e-12, atol=1e-12)


def test_slices_that_are_impossible_throughout_give_zero_gradient():
    # Pyro's einsum gives -inf with a zero gradient where every term is -inf; torch.logsumexp alone
    # would give a NaN gradient there.
    x = torch.tensor([[-float("inf"), -float("inf")], [0.0, 1.0]], dtype=torch.float64, requires_grad=True)
    y = torch.zeros(2, 3, dtype=torch.float64)
    value = log_einsum.einsum("ab,bc->ac", x, y)
    assert torch.isneginf(value[0]).all()
    (grad,) = torch.autograd.grad(value[1].sum(), x)
    assert torch.isfinite(grad).all() and (grad[0] == 0).all()


def test_large_contractions_take_pyros_path(monkeypatch):
    calls = []
    monkeypatch.setattr(log_einsum.torch_log, "einsum", lambda *args: calls.append(args[0]) or torch.zeros(()))
    big = torch.zeros(300, 300, dtype=torch.float64)
    log_einsum.einsum("ab,bc->ac", big, big)  # 300^3 elements broadcast: 150 times its operands
    log_einsum.einsum("ab,bc->ac", big[:4, :4], big[:4, :4])
    assert calls == ["ab,bc->ac"]
