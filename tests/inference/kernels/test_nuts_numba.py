"""NUTS with Numba-compiled tree bookkeeping against the PyTorch reference, leaf by leaf."""

import math

import pytest
import torch

from latentkit.inference.kernels import nuts, run_chains
from latentkit.inference.kernels.metrics import metric_from_inverse_mass
from latentkit.inference.kernels.nuts_numba import FusedNuts
from latentkit.inference.kernels.state import init

COVARIANCE = torch.tensor([[1.0, 0.9, 0.0], [0.9, 1.0, 0.3], [0.0, 0.3, 2.0]], dtype=torch.float64)


def quartic(z):
    """A correlated Gaussian with a quartic term on the last coordinate; NaN beyond |z| = 6, where
    the potential must be treated as infinite (divergences, rejected points)."""
    precision = torch.linalg.inv(COVARIANCE).to(z.dtype)
    energy = 0.5 * torch.einsum("cd,de,ce->c", z, precision, z) + 0.1 * z[:, 2] ** 4
    grad = z @ precision + torch.nn.functional.pad(0.4 * z[:, 2:] ** 3, (2, 0))
    outside = (z.abs() > 6).any(-1)
    return torch.where(outside, math.nan, energy), grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("max_tree_depth", [10, 2, 1])
def test_fused_leaves_match_the_reference(dtype, dense, max_tree_depth):
    num_chains = 5
    start = torch.randn(num_chains, 3, generator=torch.Generator().manual_seed(0), dtype=dtype)
    state = init(start, quartic)
    inverse_mass = COVARIANCE.to(dtype) if dense else torch.tensor([1.0, 2.0, 0.5], dtype=dtype)
    metric = metric_from_inverse_mass(inverse_mass.expand(num_chains, *inverse_mass.shape).clone())
    # From tiny to far too large steps: long trees, U-turns, divergences and non-finite points.
    step_size = torch.tensor([0.05, 0.3, 0.9, 1.5, 4.0], dtype=dtype)
    reference_generator, fused_generator = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    tree = nuts.start_tree(state, max_tree_depth)
    fused = FusedNuts(quartic, state, max_tree_depth=max_tree_depth)
    # Rounding differs (Numba sums in another order, and in float64 for float32 chains), and far-out
    # trajectories with large steps amplify it: compare 200 leaves (float32: 60), before it grows
    # past round-off.
    tolerance = {"rtol": 1e-9, "atol": 1e-9} if dtype == torch.float64 else {"rtol": 1e-3, "atol": 1e-3}
    leaves = 200 if dtype == torch.float64 else 60
    ended, diverged = 0, 0
    for _ in range(leaves):
        noise, uniforms = nuts.draw_randomness(reference_generator, state.position)
        tree, ends, info = nuts.advance(tree, potential_and_grad=quartic, metric=metric, step_size=step_size,
                                        noise=noise, uniforms=uniforms, max_tree_depth=max_tree_depth)
        fused_state, fused_ends, fused_info = fused.advance(fused_generator, metric, step_size)
        assert torch.equal(ends, fused_ends)
        for expected, actual in zip(tree.state, fused_state, strict=True):
            torch.testing.assert_close(actual, expected, **tolerance)
        for name, expected, actual in zip(info._fields, info, fused_info, strict=True):
            torch.testing.assert_close(actual[ends], expected[ends], **tolerance, msg=name)
        ended += int(ends.sum())
        diverged += int((ends & info.diverging).sum())
    assert ended > leaves * 0.6 and diverged > leaves * 0.05  # it went through the cases meant to be compared


def test_run_chains_draws_the_same_with_fused_and_reference_steps():
    scales = torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64)

    def target(z):
        return 0.5 * ((z / scales) ** 2).sum(-1), z / scales**2

    runs = [run_chains(target, torch.zeros(3, 3, dtype=torch.float64), num_warmup=100, num_samples=50,
                       generator=torch.Generator().manual_seed(3), jit=jit) for jit in ("torchscript", False)]
    # Round-off differences pass through warm-up's adaptation (step sizes, metric) and grow there
    # to about 1e-7 in step size: the same draws, not bit for bit (float64).
    torch.testing.assert_close(runs[0].samples, runs[1].samples, rtol=1e-4, atol=1e-4)
    for name in ("n_steps", "tree_depth", "diverging"):
        assert torch.equal(runs[0].stats[name], runs[1].stats[name]), name


def test_a_numba_failure_falls_back_to_the_compiled_whole_step(monkeypatch):
    def broken(self, *args):
        raise RuntimeError("no LLVM here")

    monkeypatch.setattr(FusedNuts, "advance", broken)
    with pytest.warns(UserWarning, match="Numba kernels are unavailable .*no LLVM here.*whole step with torchscript"):
        chains = run_chains(lambda z: (0.5 * (z**2).sum(-1), z), torch.zeros(2, 2), num_warmup=30, num_samples=20,
                            generator=torch.Generator().manual_seed(0), jit="torchscript")
    assert chains.compiled == "torchscript"
    assert chains.samples.shape == (2, 20, 2) and torch.isfinite(chains.samples).all()
