import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import latentkit as lk
from latentkit.inference.kernels import discrete_hmm
from latentkit.inference.kernels.compile import compile_function
from latentkit.inference.kernels.discrete_hmm import forward_log_likelihood, fused_kernels


def hmm_log_prob(init, trans, locs, y, *, fused):
    """DiscreteHMM's log-likelihood of ``y`` and its gradients by the three parameter tensors."""
    params = [tensor.clone().requires_grad_() for tensor in (init, trans, locs)]
    with fused_kernels() if fused else torch.autograd.set_grad_enabled(True):
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


@np.errstate(divide="ignore", invalid="ignore")  # log(0) and -inf - (-inf): impossible paths
def _longdouble_reference(initial, trans, obs):
    """log p(x) and its gradients by ``initial`` (K,) and ``obs`` (T, K) for one transition matrix
    ``trans`` (K, K), by the forward-backward algorithm in 80-bit log space: a reference sharing
    no code with either implementation."""
    initial, trans, obs = (x.numpy().astype(np.longdouble) for x in (initial, trans, obs))

    def logsumexp(x, axis):
        top = x.max(axis=axis, keepdims=True)
        top = np.where(np.isfinite(top), top, 0.0)
        return (top + np.log(np.exp(x - top).sum(axis=axis, keepdims=True))).squeeze(axis)

    alpha, beta = [initial], [np.zeros_like(initial)]
    for step in obs:
        alpha.append(logsumexp(alpha[-1][:, None] + trans + step[None, :], 0))
    for step in obs[::-1]:
        beta.append(logsumexp(trans + step[None, :] + beta[-1][None, :], 1))
    beta = beta[::-1]  # beta[t]: log p(x_t, ..., x_{T-1} | state before step t)
    log_p = logsumexp(alpha[-1], 0)
    grad_obs = np.stack([np.exp(alpha[t][:, None] + trans + step[None, :] + beta[t + 1][None, :] - log_p).sum(0)
                         for t, step in enumerate(obs)])
    return log_p, np.exp(initial + beta[0] - log_p), grad_obs


@pytest.mark.parametrize("obs_scale", [1.0, 1e-3])
def test_accurate_where_the_logits_are_huge(obs_scale):
    # Observations 1,000 sds from a state's mean (obs_scale 1e-3) give logits near -5e5 and a
    # log-likelihood near -1e8, as at NUTS's first steps: the gradient must stay as accurate as
    # float64 allows, which needs the shifts to cancel exactly.
    generator = torch.Generator().manual_seed(1)
    initial = torch.tensor([0.3, 0.7], dtype=torch.float64).log().requires_grad_()
    trans = torch.tensor([[0.9, 0.1], [0.2, 0.8]], dtype=torch.float64).log()
    y = torch.randn(500, generator=generator, dtype=torch.float64)
    obs = dist.Normal(torch.tensor([-1.0, 1.0], dtype=torch.float64), obs_scale).log_prob(y[:, None])
    obs.requires_grad_()
    log_p = forward_log_likelihood(initial, trans, obs)
    grad_initial, grad_obs = torch.autograd.grad(log_p, (initial, obs))
    expected, expected_initial, expected_obs = _longdouble_reference(initial.detach(), trans, obs.detach())
    np.testing.assert_allclose(log_p.item(), float(expected), rtol=1e-14)
    # The reference's exponents are differences of sums near 1e8 (80-bit rounding: ~1e-11 of a
    # weight); an identity checks the kernel more tightly: the gradients by initial and by each
    # obs[t] are posterior probabilities of the states, so each sums to 1.
    np.testing.assert_allclose(grad_initial.numpy(), expected_initial.astype(np.float64), atol=1e-10)
    np.testing.assert_allclose(grad_obs.numpy(), expected_obs.astype(np.float64), atol=1e-10)
    torch.testing.assert_close(grad_obs.sum(-1), torch.ones(500, dtype=torch.float64), rtol=0, atol=1e-13)
    torch.testing.assert_close(grad_initial.sum(), torch.tensor(1.0, dtype=torch.float64), rtol=0, atol=1e-13)


def test_forbidden_transitions_and_nan():
    # -inf transition logits (impossible moves) and an impossible initial state stay exact; a
    # NaN observation gives NaN.
    initial = torch.tensor([0.0, -float("inf")], dtype=torch.float64)
    trans = torch.tensor([[-float("inf"), 0.0], [0.0, -float("inf")]], dtype=torch.float64)  # alternate
    obs = torch.randn(6, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    expected = obs[0, 1] + obs[1, 0] + obs[2, 1] + obs[3, 0] + obs[4, 1] + obs[5, 0]  # the one possible path
    torch.testing.assert_close(forward_log_likelihood(initial, trans, obs), expected, rtol=1e-14, atol=0)
    obs[3, 1] = float("nan")
    assert forward_log_likelihood(initial, trans, obs).isnan()


def test_float32_in_float32_out():
    initial = torch.zeros(2, dtype=torch.float32)
    trans = torch.tensor([[0.9, 0.1], [0.2, 0.8]], dtype=torch.float32).log()
    obs = torch.randn(30, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float32)
    log_p = forward_log_likelihood(initial, trans, obs)
    assert log_p.dtype == torch.float32
    torch.testing.assert_close(log_p, forward_log_likelihood(initial.double(), trans.double(), obs.double()).float())


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
    with fused_kernels(), pyro.validation_enabled(False):
        graph = make_fx(potential)(example)
    kernels = {str(node.target) for node in graph.graph.nodes if node.op == "call_function"}
    assert {"latentkit.hmm_forward.default", "latentkit.hmm_forward_backward.default"} <= kernels
    with pyro.validation_enabled(False):
        compiled = compile_function(potential, (example,), probes=[(example + 1.0,)])
    assert compiled is not None
    point = torch.tensor([[-2.0, 2.0, -3.0], [1.0, 1.5, 1.0]], dtype=torch.float64)
    for got, expected in zip(compiled(point), potential(point), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-10)


def test_pyros_log_prob_is_restored():
    pyro_log_prob = dist.DiscreteHMM.log_prob
    with pytest.raises(RuntimeError, match="inside"), fused_kernels():
        assert dist.DiscreteHMM.log_prob is not pyro_log_prob
        raise RuntimeError("inside")
    assert dist.DiscreteHMM.log_prob is pyro_log_prob


def test_shapes_that_do_not_fit_are_refused():
    # Three transition matrices for five steps: neither one matrix nor one per step.
    with pytest.raises(ValueError, match=r"transition_logits \(3, 2, 2\) must end in \(1 or T, K, K\)"):
        forward_log_likelihood(torch.zeros(2), torch.zeros(3, 2, 2), torch.zeros(5, 2))


def test_under_vmap_the_mapped_dimension_joins_the_batch():
    generator = torch.Generator().manual_seed(5)
    initial = torch.randn(2, generator=generator, dtype=torch.float64)
    transitions = torch.randn(6, 2, 2, generator=generator, dtype=torch.float64)  # mapped over
    obs = torch.randn(20, 2, generator=generator, dtype=torch.float64)
    mapped = torch.func.vmap(lambda trans: forward_log_likelihood(initial, trans, obs))(transitions)
    one_by_one = torch.stack([forward_log_likelihood(initial, trans, obs) for trans in transitions])
    torch.testing.assert_close(mapped, one_by_one, rtol=1e-14, atol=0)


def test_the_availability_check_holds_under_no_grad():
    # The check runs once, wherever the kernel is first wanted (often under no_grad): it must not
    # need autograd, or HMMs would lose the kernel for the whole process.
    discrete_hmm.kernels_work.cache_clear()
    with torch.no_grad():
        assert discrete_hmm.kernels_work()


def test_fits_store_pyros_log_likelihood_of_each_draw():
    def hmm(y):
        locs = pyro.sample("locs", dist.Normal(torch.tensor([-1.0, 1.0], dtype=y.dtype), 1.0).to_event(1))
        trans = torch.tensor([[0.9, 0.1], [0.1, 0.9]], dtype=y.dtype).log()
        pyro.sample("y", dist.DiscreteHMM(torch.zeros(2, dtype=y.dtype), trans, dist.Normal(locs.unsqueeze(-2), 1.0),
                                          duration=len(y)), obs=y)

    y = torch.randn(60, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    res = lk.fit(hmm, {"y": y}, engine="nuts", num_chains=2, num_warmup=30, num_samples=20, seed=0, progress=False)
    locs = torch.as_tensor(res.posterior["locs"]).reshape(-1, 2)
    trans = torch.tensor([[0.9, 0.1], [0.1, 0.9]], dtype=torch.float64).log()
    expected = dist.DiscreteHMM(torch.zeros(2, dtype=torch.float64), trans, dist.Normal(locs.unsqueeze(-2), 1.0),
                                duration=len(y)).log_prob(y)  # Pyro's scan, draw by draw
    got = torch.as_tensor(res.log_likelihood["y"]).reshape(-1)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-10)
