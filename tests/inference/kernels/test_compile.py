import pytest
import torch

from latentkit.inference.kernels import chains as chains_module
from latentkit.inference.kernels import compile as compile_module
from latentkit.inference.kernels import run_chains
from latentkit.inference.kernels.compile import TensorPacking, compile_function


def energy(z):
    return 0.5 * (z**2).sum(-1), z


def test_compiled_function_matches_eager_away_from_the_example():
    z = torch.zeros(3, 2)
    compiled = compile_function(energy, (z,), probes=[(torch.ones(3, 2),)])
    assert compiled is not None
    point = torch.tensor([[1.0, 2.0], [-3.0, 0.5], [0.0, 4.0]])
    value, grad = compiled(point)
    torch.testing.assert_close(value, torch.tensor([2.5, 4.625, 8.0]))
    torch.testing.assert_close(grad, point)


def test_value_dependent_control_flow_falls_back_to_eager():
    def branchy(z):
        return (z.sum(-1) if bool((z > 0).all()) else -z.sum(-1)),

    with pytest.warns(UserWarning, match="jit: (tracing the test function failed|the traced version of the test "
                                         "function differs)"):
        compiled = compile_function(branchy, (torch.ones(2, 2),), probes=[(-torch.ones(2, 2),)],
                                    name="the test function")
    assert compiled is None


def test_without_static_runtime_the_interpreter_runs_the_graph(monkeypatch):
    def unavailable(module):
        raise RuntimeError("no static runtime")

    monkeypatch.setattr(torch._C, "_jit_to_static_module", unavailable)
    compiled = compile_function(energy, (torch.zeros(3, 2),))
    assert isinstance(compiled, torch.jit.ScriptModule)
    torch.testing.assert_close(compiled(torch.ones(3, 2))[0], torch.full((3,), 1.0))
    assert compile_module._static_runtime.__doc__  # the fallback is documented where it is made


def test_packing_round_trips_tensors_of_mixed_dtypes_and_shapes():
    tensors = [torch.arange(3.0), torch.ones(3, dtype=torch.bool), torch.zeros(3), torch.eye(3),
               torch.tensor([1, 2, 3])]
    packing = TensorPacking(tensors)
    packed = packing.pack(tensors)
    assert len(packed) == 4 and packed[0].shape == (2, 3)
    for original, unpacked in zip(tensors, packing.unpack(packed), strict=True):
        assert torch.equal(original, unpacked)


@pytest.fixture
def whole_step(monkeypatch):
    """Compile NUTS's whole step with TorchScript, as without Numba or on a GPU."""
    monkeypatch.setattr(chains_module, "_fused_nuts", lambda *args: None)


@pytest.mark.parametrize("dense", [False, True])
def test_compiled_and_eager_nuts_chains_draw_the_same(dense, whole_step):
    # The compiled step is the eager step's graph: same seed, the same draws bit for bit.
    scales = torch.tensor([0.5, 1.0, 3.0])

    def target(z):
        return 0.5 * ((z / scales) ** 2).sum(-1), z / scales**2

    runs = [run_chains(target, torch.zeros(3, 3), num_warmup=60, num_samples=40, dense_mass=dense,
                       generator=torch.Generator().manual_seed(5), jit=jit) for jit in ("torchscript", False)]
    assert runs[0].compiled == "torchscript" and runs[1].compiled is False
    torch.testing.assert_close(runs[0].samples, runs[1].samples, rtol=1e-9, atol=1e-9)
    for name in ("n_steps", "tree_depth", "diverging"):
        assert torch.equal(runs[0].stats[name], runs[1].stats[name]), name


def branchy(z):  # Python control flow on the values: a trace cannot record it
    scale = 1.0 if bool((z > -100).all()) else 2.0
    return 0.5 * ((z / scale) ** 2).sum(-1), z / scale**2


def test_an_untraceable_potential_runs_the_nuts_step_eagerly(whole_step):
    with pytest.warns(UserWarning, match="jit: (tracing the NUTS step failed|the traced version of the NUTS step)"):
        chains = run_chains(branchy, torch.zeros(2, 2), num_warmup=50, num_samples=50,
                            generator=torch.Generator().manual_seed(0), jit="torchscript")
    assert chains.compiled is False
    assert chains.samples.shape == (2, 50, 2) and torch.isfinite(chains.samples).all()


def test_an_untraceable_potential_runs_eagerly_beside_the_numba_tree():
    with pytest.warns(UserWarning, match="jit: (tracing the potential failed|the traced version of the potential)"):
        chains = run_chains(branchy, torch.zeros(2, 2), num_warmup=50, num_samples=50,
                            generator=torch.Generator().manual_seed(0), jit="torchscript")
    assert chains.compiled is False
    assert chains.samples.shape == (2, 50, 2) and torch.isfinite(chains.samples).all()
