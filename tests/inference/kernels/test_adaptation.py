import math

import numpy as np
import pytest
import torch

from latentkit.inference.kernels.adaptation import (
    build_adaptation_schedule,
    dual_averaging_init,
    dual_averaging_update,
    find_reasonable_step_size,
    welford_covariance,
    welford_init,
    welford_update,
)
from latentkit.inference.kernels.metrics import identity_metric
from latentkit.inference.kernels.state import init


def test_schedule_matches_stan_defaults():
    windows = [tuple(window) for window in build_adaptation_schedule(1000)]
    assert windows == [
        (0, 74),
        (75, 99),
        (100, 149),
        (150, 249),
        (250, 449),
        (450, 949),
        (950, 999),
    ]
    # 75 + 25 + 50 fits exactly: one slow window.
    assert [tuple(w) for w in build_adaptation_schedule(150)] == [(0, 74), (75, 99), (100, 149)]


def test_schedule_shrinks_for_short_warmup():
    # 15 % initial buffer, 10 % terminal buffer, the rest one slow window (Stan).
    assert [tuple(w) for w in build_adaptation_schedule(100)] == [(0, 14), (15, 89), (90, 99)]
    assert [tuple(w) for w in build_adaptation_schedule(19)] == [(0, 18)]
    assert build_adaptation_schedule(0) == []


@pytest.mark.parametrize("num_warmup", [20, 149, 151, 200, 333, 500, 1234, 5000])
def test_schedule_windows_are_contiguous_and_growing(num_warmup):
    schedule = build_adaptation_schedule(num_warmup)
    assert schedule[0].start == 0 and schedule[-1].end == num_warmup - 1
    assert all(a.end + 1 == b.start for a, b in zip(schedule, schedule[1:], strict=False))
    sizes = [window.end - window.start + 1 for window in schedule[1:-1]]
    assert sizes and all(a <= b for a, b in zip(sizes, sizes[1:], strict=False))


def test_dual_averaging_finds_the_step_size_of_the_target_acceptance():
    # Acceptance exp(-step / scale) reaches 0.8 at step = -scale * log(0.8), per chain.
    scale = torch.tensor([1.0, 10.0, 0.01])
    state = dual_averaging_init(torch.ones(3))
    for _ in range(5000):
        acceptance = torch.exp(-state.log_step_size.exp() / scale)
        state = dual_averaging_update(state, acceptance, 0.8)
    torch.testing.assert_close(
        state.log_step_size_avg.exp(), -scale * math.log(0.8), rtol=0.02, atol=0
    )


@pytest.mark.parametrize("dense", [False, True])
def test_welford_matches_numpy(dense, generator):
    samples = torch.randn(50, 3, 4, generator=generator) * torch.tensor([1.0, 3.0, 0.1, 2.0])
    state = welford_init(samples[0], dense=dense)
    for sample in samples:
        state = welford_update(state, sample)
    covariance = welford_covariance(state, regularize=False)
    for chain in range(3):
        expected = np.cov(samples[:, chain].numpy(), rowvar=False)
        if not dense:
            expected = np.diag(expected)
        np.testing.assert_allclose(covariance[chain].numpy(), expected, rtol=1e-10)
    regularized = welford_covariance(state)
    shrinkage = 1e-3 * 5 / 55
    identity = torch.eye(4) if dense else torch.ones(4)
    torch.testing.assert_close(regularized, 50 / 55 * covariance + shrinkage * identity)


def test_find_reasonable_step_size_follows_the_scale(generator, gaussian):
    # One leapfrog step on N(0, s^2) has an O((step / s)^2) energy error: the heuristic must
    # land within a decade of s for every chain, whatever it started from.
    scale = torch.tensor([0.01, 1.0, 100.0])
    target = gaussian(torch.zeros(3, 2), torch.diag_embed(scale[:, None].square().expand(3, 2)))
    state = init(scale[:, None] * torch.ones(3, 2), target)
    metric = identity_metric(state.position, dense=False)
    step_size = find_reasonable_step_size(
        generator, state, potential_and_grad=target, metric=metric, step_size=torch.ones(3)
    )
    ratio = step_size / scale
    assert ((ratio > 0.1) & (ratio < 10)).all(), step_size


def test_find_reasonable_step_size_survives_an_invalid_point(generator):
    def potential(position):
        return torch.tensor([math.nan, 0.0]) + 0.5 * (position**2).sum(-1), position

    state = init(torch.zeros(2, 2), potential)
    step_size = find_reasonable_step_size(
        generator,
        state,
        potential_and_grad=potential,
        metric=identity_metric(state.position, dense=False),
        step_size=torch.ones(2),
    )
    assert step_size[0] > 0 and step_size[0] < 1e-20
    assert 0.1 < step_size[1] < 10
