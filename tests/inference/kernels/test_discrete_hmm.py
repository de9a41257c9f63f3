import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from latentkit.inference.kernels.compile import compile_function
from latentkit.inference.kernels.discrete_hmm import log_transition_product, recording_kernels


def hmm_log_prob(init, trans, locs, y, *, fused):
    """DiscreteHMM's log-likelihood of ``y`` and its gradients by the three parameter tensors."""
    params = [tensor.clone().requires_grad_() for tensor in (init, trans, locs)]
    with recording_kernels() if fused else torch.autograd.set_grad_enabled(True):
        hmm = dist.DiscreteHMM(params[0], params[1], dist.Normal(params[2], 1.0), duration=y.shape[-1])
        log_prob = hmm.log_prob(y)
    return log_prob, torch.autograd.grad(log_prob.sum(), params)


@pytest.mark.parametrize(("init_shape", "trans_shape", "locs_shape", "time"), [
    ((2,), (2, 2), (2,), 50),  # no batch, one transition matrix
    ((4, 2), (4, 1, 2, 2), (4, 1, 2), 300),  # chains as the batch (the MCMC potential's layout)
    ((3,), (40, 3, 3), (3,), 40),  # a transition matrix per step
    ((5, 1, 3), (2, 1, 3, 3), (3,), 20),  # batch shapes that broadcast
    ((2,), (2, 2), (2,), 1),
])
def test_equals_pyros_discrete_hmm_in_value_and_gradient(init_shape, trans_shape, locs_shape, time):
    generator = torch.Generator().manual_seed(0)
    init, trans, locs = (torch.randn(shape, generator=generator, dtype=torch.float64)
                         for shape in (init_shape, trans_shape, locs_shape))
    y = 3 * torch.randn(time, generator=generator, dtype=torch.float64)
    expected, expected_grads = hmm_log_prob(init, trans, locs, y, fused=False)
    value, grads = hmm_log_prob(init, trans, locs, y, fused=True)
    assert value.shape == expected.shape
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-10)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-10)


@np.errstate(invalid="ignore", divide="ignore")  # log(0) and -inf - (-inf): impossible paths
def _longdouble_reference(trans, obs, grad_out):
    """log(prod_t exp(trans + obs[t, None, :])) (K, K) and the gradient of sum(grad_out * it) by
    obs (T, K), in 80-bit log space: a sequential forward-backward sharing no code with either
    implementation."""
    trans, obs, grad_out = (x.numpy().astype(np.longdouble) for x in (trans, obs, grad_out))
    steps = trans[None] + obs[:, None, :]  # (T, K, K)

    def logsumexp(x, axis):
        top = x.max(axis=axis, keepdims=True)
        top = np.where(np.isfinite(top), top, 0.0)
        return (top + np.log(np.exp(x - top).sum(axis=axis, keepdims=True))).squeeze(axis)

    eye = np.where(np.eye(trans.shape[-1]) > 0, 0.0, -np.inf).astype(np.longdouble)
    before, after = [eye], [eye]
    for step in steps:
        before.append(logsumexp(before[-1][:, :, None] + step[None], 1))
    for step in steps[::-1]:
        after.append(logsumexp(step[:, :, None] + after[-1][None], 1))
    after = after[::-1]  # after[t]: the product of steps t, ..., T-1
    out = before[-1]
    grad_obs = np.zeros(obs.shape, dtype=np.longdouble)
    for t, step in enumerate(steps):
        # d out[a, b] / d step[i, j] = exp(before[a, i] + step[i, j] + after[j, b] - out[a, b])
        weight = np.exp(before[t][:, :, None, None] + step[None, :, :, None] + after[t + 1][None, None]
                        - out[:, None, None, :])
        grad_obs[t] = (grad_out[:, None, None, :] * weight).sum((0, 1, 3))
    return out, grad_obs


@pytest.mark.parametrize("obs_scale", [1.0, 1e-3])
def test_accurate_where_the_logits_are_huge(obs_scale):
    # Observations 1,000 sds from a state's mean (obs_scale 1e-3) give logits near -5e5 and a
    # potential near 1e8, as at NUTS's first steps: the product and its gradient must still be
    # as accurate as float64 allows, which needs the shifts to cancel exactly.
    generator = torch.Generator().manual_seed(1)
    trans = torch.tensor([[0.9, 0.1], [0.2, 0.8]], dtype=torch.float64).log()
    y = torch.randn(500, generator=generator, dtype=torch.float64)
    obs = dist.Normal(torch.tensor([-1.0, 1.0], dtype=torch.float64), obs_scale).log_prob(y[:, None])
    obs.requires_grad_()
    out = log_transition_product(trans, obs)
    grad_out = torch.softmax(out.detach().flatten(), 0).reshape(2, 2)  # as DiscreteHMM's log-sum-exps pass it
    (grad_obs,) = torch.autograd.grad((out * grad_out).sum(), obs)
    expected_out, expected_grad = _longdouble_reference(trans, obs.detach(), grad_out)
    # Entries below e^-700 times their row's largest are 0 (documented): they vanish in any HMM's
    # log-likelihood; the others are exact.
    expected_out = expected_out.astype(np.float64)
    kept = expected_out - expected_out.max(-1, keepdims=True) > -700
    np.testing.assert_allclose(out.detach().numpy()[kept], expected_out[kept], rtol=1e-13)
    assert (out.detach().numpy()[~kept] == -np.inf).all()
    # The reference's exponents are differences of sums near 1e8 (80-bit rounding: ~1e-11 of a
    # weight); an identity checks the kernel more tightly: with grad_out summing to 1 (as from a
    # log-sum-exp), the gradient by obs[t] holds the posterior probabilities of the states at t.
    np.testing.assert_allclose(grad_obs.numpy(), expected_grad.astype(np.float64), rtol=0,
                               atol=1e-9 * float(np.abs(expected_grad).max()))
    torch.testing.assert_close(grad_obs.sum(-1), torch.ones(500, dtype=torch.float64), rtol=0, atol=1e-13)


def test_forbidden_transitions_and_nan():
    # -inf transition logits (impossible moves) stay exact; a NaN observation gives NaN.
    trans = torch.tensor([[0.0, 0.0], [-float("inf"), 0.0]], dtype=torch.float64)
    obs = torch.randn(6, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    expected, _ = _longdouble_reference(trans, obs, torch.zeros(2, 2))
    np.testing.assert_allclose(log_transition_product(trans, obs).numpy(), expected.astype(np.float64), rtol=1e-13)
    assert log_transition_product(trans, obs).exp()[1, 0] == 0.0
    obs[3, 1] = float("nan")
    assert log_transition_product(trans, obs).isnan().all()


def test_float32_in_float32_out():
    trans = torch.tensor([[0.9, 0.1], [0.2, 0.8]], dtype=torch.float32).log()
    obs = torch.randn(30, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float32)
    out = log_transition_product(trans, obs)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, log_transition_product(trans.double(), obs.double()).float())


def test_a_recorded_potential_calls_the_kernel_and_matches_pyro():
    y = torch.randn(200, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    def potential(z):  # z (C, 3): two state means and a log switching probability, per chain
        z = z.clone().requires_grad_()
        switch = torch.sigmoid(z[:, 2])
        trans = torch.stack([torch.stack([1 - switch, switch], -1), torch.stack([switch, 1 - switch], -1)], -2).log()
        hmm = dist.DiscreteHMM(torch.zeros(2, dtype=z.dtype), trans.unsqueeze(-3), dist.Normal(z[:, None, :2], 1.0))
        energy = -hmm.log_prob(y)
        return energy.detach(), torch.autograd.grad(energy.sum(), z)[0]

    example = torch.tensor([[-1.0, 1.0, -2.0], [0.0, 0.5, 0.0]], dtype=torch.float64)
    with recording_kernels(), pyro.validation_enabled(False):
        graph = make_fx(potential)(example)
    kernels = {str(node.target) for node in graph.graph.nodes if node.op == "call_function"}
    assert {"latentkit.log_transition_product.default", "latentkit.log_transition_product_backward.default"} <= kernels
    with pyro.validation_enabled(False):
        compiled = compile_function(potential, (example,), probes=[(example + 1.0,)])
    assert compiled is not None
    point = torch.tensor([[-2.0, 2.0, -3.0], [1.0, 1.5, 1.0]], dtype=torch.float64)
    for got, expected in zip(compiled(point), potential(point), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-10)


def test_pyros_log_prob_is_restored():
    pyro_log_prob = dist.DiscreteHMM.log_prob
    with pytest.raises(RuntimeError, match="inside"), recording_kernels():
        assert dist.DiscreteHMM.log_prob is not pyro_log_prob
        raise RuntimeError("inside")
    assert dist.DiscreteHMM.log_prob is pyro_log_prob
