"""The potential energy: eager through Pyro, or compiled (torch.jit, inductor) and checked against eager."""

import shutil

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

import latentkit as lk
from latentkit.errors import ConfigError
from latentkit.inference.kernels import chains as chains_module
from latentkit.inference.potential import Potential
from latentkit.inference.target import bind
from latentkit.inference.vectorize import BatchedModel
from tests.inference.models_zoo import SCHOOLS_SIGMA, SCHOOLS_Y, eight_schools, markov_chain

SCHOOLS = {"sigma": np.array(SCHOOLS_SIGMA), "y": np.array(SCHOOLS_Y)}


def _potential(model, data, z_rows=4, vectorized=None):
    target = bind(model, data)
    batched = BatchedModel(target, vectorized=vectorized)
    potential = Potential(target, batched)
    z = torch.randn(z_rows, potential.dim, generator=torch.Generator().manual_seed(1))
    if vectorized is None:
        batched.check_vectorization(potential.constrain(z)[0])
    return potential, z


def test_eight_schools_potential_is_the_closed_form():
    potential, z = _potential(eight_schools, SCHOOLS)
    mu, log_tau, theta_raw = z[:, 0], z[:, 1], z[:, 2:]
    tau = log_tau.exp()
    y, sigma = torch.tensor(SCHOOLS_Y), torch.tensor(SCHOOLS_SIGMA)
    log_p = (dist.Normal(0.0, 5.0).log_prob(mu) + dist.HalfCauchy(5.0).log_prob(tau) + log_tau
             + dist.Normal(0.0, 1.0).log_prob(theta_raw).sum(-1)
             + dist.Normal(mu[:, None] + tau[:, None] * theta_raw, sigma).log_prob(y).sum(-1))
    value, grad = potential(z)
    torch.testing.assert_close(value, -log_p)
    zg = z.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(potential.energy(zg).sum(), zg)
    torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("model, data", [(eight_schools, SCHOOLS),
                                         (markov_chain, {"y": torch.linspace(-1.0, 2.0, 10)})])
def test_traced_potential_matches_eager_away_from_the_trace_point(model, data):
    potential, z = _potential(model, data)
    eager = potential(z + 2.0)
    assert potential.compile(z)
    traced = potential(z + 2.0)
    torch.testing.assert_close(traced, eager, rtol=1e-9, atol=1e-9)
    # Another batch size is not what was traced: evaluated eagerly, still right.
    torch.testing.assert_close(potential(z[:1] + 2.0)[0], eager[0][:1])


def branchy(y):
    """A model whose Python control flow depends on a latent value: a trace would freeze it."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    scale = 1.0 if bool((mu > 0).all()) else 2.0
    pyro.sample("y", dist.Normal(mu, scale), obs=y)


def test_value_dependent_control_flow_falls_back_to_eager():
    potential, z = _potential(branchy, {"y": torch.tensor(0.5)}, vectorized=True)
    z = z.abs() + 1.0  # traced where every mu > 0
    with pytest.warns(UserWarning,
                      match="jit: (tracing the potential failed|the traced version of the potential differs)"):
        assert not potential.compile(z)
    assert potential.compiled is None
    value, _ = potential(-z)
    assert torch.allclose(value, -(dist.Normal(-z[:, 0], 2.0).log_prob(torch.tensor(0.5))
                                   + dist.Normal(0.0, 1.0).log_prob(-z[:, 0])))


def test_jit_and_eager_fits_agree():
    kwargs = dict(engine="nuts", num_warmup=100, num_samples=100, num_chains=2, seed=3, progress=False)
    fast = lk.fit(eight_schools, SCHOOLS, jit=True, **kwargs)
    slow = lk.fit(eight_schools, SCHOOLS, jit=False, **kwargs)
    assert fast.config["jit"] and not slow.config["jit"]
    # Same seed and algorithm, but not the same arithmetic (the compiled tree bookkeeping sums in
    # another order), and early warm-up's large steps amplify round-off until the chains separate
    # (tests/inference/kernels/test_nuts_numba.py compares them leaf by leaf): the posteriors
    # agree within Monte Carlo error (sd of mu is 3.3).
    assert abs(fast.posterior["mu"].mean() - slow.posterior["mu"].mean()) < 4 * 3.3 / np.sqrt(100)


def matmul_regression(X, y=None):
    """Written as Pyro users often do: ``X @ beta`` does not broadcast over a batch of chains."""
    beta = pyro.sample("beta", dist.Normal(0.0, 1.0).expand([X.shape[-1]]).to_event(1))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Normal((X @ beta.unsqueeze(-1)).squeeze(-1), 1.0), obs=y)


def test_a_model_evaluated_chain_by_chain_is_traced_too():
    X = torch.randn(30, 3, generator=torch.Generator().manual_seed(2))
    potential, z = _potential(matmul_regression, {"X": X, "y": X.sum(-1)})
    assert not potential.batched.vectorized
    eager = potential(z + 1.0)
    assert potential.compile(z)
    torch.testing.assert_close(potential(z + 1.0), eager, rtol=1e-9, atol=1e-9)


def test_inductor_potential_matches_eager_away_from_the_trace_point():
    if not any(shutil.which(compiler) for compiler in ("g++", "c++", "clang++")):
        pytest.skip("inductor generates C++ and needs a C++ compiler; none is installed")
    potential, z = _potential(eight_schools, SCHOOLS)
    eager = potential(z + 2.0)
    assert potential.compile(z, "inductor")
    torch.testing.assert_close(potential(z + 2.0), eager, rtol=1e-9, atol=1e-9)


def test_a_failed_inductor_compile_falls_back_to_eager(monkeypatch):
    def no_compiler(graph, **options):
        def compiled(z):
            raise RuntimeError("no C++ compiler")
        return compiled

    monkeypatch.setattr(torch, "compile", no_compiler)
    potential, z = _potential(eight_schools, SCHOOLS)
    with pytest.warns(UserWarning, match=r"failed \(inductor, RuntimeError: no C\+\+ compiler"):
        assert not potential.compile(z, "inductor")
    assert potential.compiled is None
    torch.testing.assert_close(potential(z), potential._value_and_grad(z))


def test_the_jit_option_picks_the_compiler(monkeypatch):
    backends = []

    def record(fn, example, *, backend, **options):
        backends.append(backend)  # and fail: the fit runs eagerly

    monkeypatch.setattr(chains_module, "compile_function", record)
    monkeypatch.setattr(Potential, "compile", lambda self, z, backend="torchscript": backends.append(("hmc", backend)))
    kwargs = dict(num_warmup=5, num_samples=5, num_chains=2, seed=0, progress=False)
    for jit in (True, "inductor", False):
        result = lk.fit(eight_schools, SCHOOLS, engine="nuts", jit=jit, **kwargs)
        assert result.config["jit"] is False
    lk.fit(eight_schools, SCHOOLS, engine="hmc", jit="inductor", **kwargs)
    # NUTS: the potential (TorchScript, beside Numba's tree) or the whole step (inductor), then the
    # warm-up adaptation (always TorchScript).
    assert backends == ["torchscript", "torchscript", "inductor", "torchscript", ("hmc", "inductor")]
    with pytest.raises(ConfigError, match="jit: must be True, False or one of"):
        lk.fit(eight_schools, SCHOOLS, jit="inducto", **kwargs)


def test_logsumexp_reusing_exp_matches_torch_values_gradients_and_infinities():
    from latentkit.inference.vectorize import logsumexp_reusing_exp

    x = torch.randn(5, 7, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_()
    for dim in range(3):
        ours, theirs = logsumexp_reusing_exp(x, dim), torch.logsumexp(x, dim)
        torch.testing.assert_close(ours, theirs, rtol=1e-13, atol=1e-13)
        grads = [torch.autograd.grad(value.sin().sum(), x)[0] for value in (ours, theirs)]
        torch.testing.assert_close(*grads, rtol=1e-13, atol=1e-13)
    inf = float("inf")
    edge = torch.tensor([[-inf, -inf], [1.0, inf], [float("nan"), 0.0], [-inf, 0.5]], dtype=torch.float64)
    torch.testing.assert_close(logsumexp_reusing_exp(edge, 1), torch.logsumexp(edge, 1), equal_nan=True)
