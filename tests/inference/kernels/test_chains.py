import math

import arviz as az
import pytest
import torch

from latentkit.errors import ConfigError
from latentkit.inference.kernels.chains import STAT_NAMES, run_chains

# rho = 0.9 between coordinates of scales 1 and 3.
CORRELATED_COVARIANCE = torch.tensor([[1.0, 2.7], [2.7, 9.0]], dtype=torch.float64)
CORRELATED_MEAN = torch.tensor([1.0, -2.0], dtype=torch.float64)


@pytest.mark.parametrize(
    ("algorithm", "dense", "options", "min_ess"),
    [
        ("nuts", False, {}, 400),
        ("nuts", True, {}, 1000),
        ("hmc", False, {"trajectory_length": 3.0}, 400),
        # An isotropic metric with trajectory_length near pi would flip x to about -x and
        # leave |x| stuck (a resonance the folded R-hat catches): 2 avoids it.
        ("hmc", True, {"trajectory_length": 2.0}, 1000),
    ],
)
def test_correlated_gaussian(algorithm, dense, options, min_ess, gaussian, moments):
    target = gaussian(CORRELATED_MEAN, CORRELATED_COVARIANCE)
    chains = run_chains(
        target,
        torch.zeros(4, 2),
        algorithm=algorithm,
        num_warmup=1000,
        num_samples=1000,
        dense_mass=dense,
        generator=torch.Generator().manual_seed(1),
        **options,
    )
    moments(chains.samples, CORRELATED_MEAN, CORRELATED_COVARIANCE.diagonal(), min_ess=min_ess)
    # The adapted inverse mass matrix estimates the posterior (co)variance.
    expected = CORRELATED_COVARIANCE if dense else CORRELATED_COVARIANCE.diagonal()
    torch.testing.assert_close(
        chains.inverse_mass_matrix,
        expected.expand_as(chains.inverse_mass_matrix),
        rtol=0.25,
        atol=0.5,
    )
    assert not chains.stats["diverging"].any()
    # E[H] = E[U] + E[K] = D / 2 + D / 2 for a Gaussian: checks the reported energy.
    energy = chains.stats["energy"].numpy()
    assert abs(energy.mean() - 2.0) < 5 * az.mcse(energy)


def test_badly_scaled_gaussian_needs_and_gets_mass_matrix_adaptation(gaussian, moments):
    # Scales from 0.01 to 100: with a unit metric NUTS would need ~10^4 steps per U-turn; the
    # adapted diagonal metric makes the problem isotropic.
    scales = torch.logspace(-2, 2, 10)
    target = gaussian(torch.zeros(10), torch.diag(scales**2))
    # max_tree_depth=6 keeps the initial buffer, run with a unit metric and trees cut at 63
    # steps, cheap; adapted trees need depth 3.
    chains = run_chains(
        target,
        torch.zeros(4, 10),
        num_warmup=500,
        num_samples=300,
        max_tree_depth=6,
        generator=torch.Generator().manual_seed(2),
    )
    moments(chains.samples / scales, torch.zeros(10), torch.ones(10), min_ess=300, max_rhat=1.02)
    ratio = chains.inverse_mass_matrix / scales**2
    assert ((ratio > 0.6) & (ratio < 1.6)).all(), ratio
    # Stan reaches about 0.5 to 1 for a 10-D standard normal at 0.8 acceptance.
    assert ((chains.step_size > 0.3) & (chains.step_size < 1.5)).all(), chains.step_size
    assert not chains.stats["diverging"].any()
    assert chains.stats["tree_depth"].max() <= 4


def walled_potential(position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A standard normal with a wall at x_0 = 1 for chains 0 to 2, none for chain 3.

    Beyond the wall the potential is +inf (chains 0 and 1) or NaN with NaN gradients
    (chain 2), and the function raises on non-finite input as a model's support checks can.
    """
    if not torch.isfinite(position).all():
        raise ValueError("non-finite position")
    potential, grad = 0.5 * (position**2).sum(-1), position.clone()
    beyond = position[:, 0] > 1.0
    beyond[3] = False
    invalid = torch.tensor([math.inf, math.inf, math.nan, 0.0], dtype=position.dtype)
    grad[2] = torch.where(beyond[2], math.nan, grad[2])
    return torch.where(beyond, invalid, potential), grad


@pytest.mark.parametrize("algorithm", ["nuts", "hmc"])
def test_walls_give_divergences_confined_to_their_chains(algorithm, moments):
    # Static HMC cannot reach 0.8 acceptance next to a wall at any step size: dual averaging
    # would drive the step size to 0, so it runs with a fixed one.
    options = (
        {"num_steps": 5, "step_size": 0.3, "adapt_step_size": False} if algorithm == "hmc" else {}
    )
    chains = run_chains(
        walled_potential,
        torch.zeros(4, 2),
        algorithm=algorithm,
        num_warmup=300,
        num_samples=1000,
        generator=torch.Generator().manual_seed(3),
        **options,
    )
    diverging = chains.stats["diverging"]
    assert diverging[:3].any(-1).all()
    assert not diverging[3].any()
    for name in STAT_NAMES:
        assert not chains.stats[name].double().isnan().any(), name
    assert torch.isfinite(chains.samples).all() and torch.isfinite(chains.stats["lp"]).all()
    assert (chains.samples[:3, :, 0] <= 1.0).all()
    # The wall-free chain is untouched: a standard normal.
    moments(chains.samples[3:], torch.zeros(2), torch.ones(2), min_ess=200, max_rhat=None)
    # Walled chains sample N(0, 1) truncated to x_0 <= 1: mean -phi(1) / Phi(1).
    truncated_mean = -math.exp(-0.5) / math.sqrt(2 * math.pi) / (0.5 * math.erfc(-1 / 2**0.5))
    walled = chains.samples[:3, :, 0].numpy()
    assert abs(walled.mean() - truncated_mean) < 5 * az.mcse(walled)


def test_same_seed_same_draws_other_seed_other_draws(gaussian):
    target = gaussian(CORRELATED_MEAN, CORRELATED_COVARIANCE)

    def run(seed: int):
        return run_chains(
            target,
            torch.zeros(3, 2),
            num_warmup=60,
            num_samples=30,
            dense_mass=True,
            generator=torch.Generator().manual_seed(seed),
        )

    first, again, other = run(5), run(5), run(6)
    assert torch.equal(first.samples, again.samples)
    assert torch.equal(first.step_size, again.step_size)
    assert torch.equal(first.inverse_mass_matrix, again.inverse_mass_matrix)
    for name in STAT_NAMES:
        assert torch.equal(first.stats[name], again.stats[name]), name
    assert not torch.equal(first.samples, other.samples)


def test_chains_adapt_and_sample_independently(gaussian, moments):
    # Each chain has its own target, N(mean_c, scale_c^2 I): adaptation and draws of one chain
    # must not depend on the others, whether it runs alone or among them.
    means = torch.tensor([-5.0, 0.0, 5.0, 50.0])
    scales = torch.tensor([0.1, 1.0, 10.0, 100.0])
    covariance = torch.diag_embed(scales[:, None].square().expand(4, 3))
    target = gaussian(means[:, None].expand(4, 3), covariance)
    together = run_chains(
        target,
        means[:, None] + torch.zeros(4, 3),
        num_warmup=300,
        num_samples=800,
        generator=torch.Generator().manual_seed(4),
    )
    alone = run_chains(
        gaussian(means[:1, None].expand(1, 3), covariance[:1]),
        means[:1, None] + torch.zeros(1, 3),
        num_warmup=300,
        num_samples=800,
        generator=torch.Generator().manual_seed(4),
    )
    for c in range(4):
        standardized = (together.samples[c : c + 1] - means[c]) / scales[c]
        moments(standardized, torch.zeros(3), torch.ones(3), min_ess=200, max_rhat=None)
        ratio = together.inverse_mass_matrix[c] / scales[c] ** 2
        assert ((ratio > 0.6) & (ratio < 1.6)).all(), (c, ratio)
    moments(
        (alone.samples - means[0]) / scales[0],
        torch.zeros(3),
        torch.ones(3),
        min_ess=200,
        max_rhat=None,
    )
    ratio = alone.inverse_mass_matrix[0] / scales[0] ** 2
    assert ((ratio > 0.6) & (ratio < 1.6)).all(), ratio
    # With the metric adapted, step sizes no longer follow the scales.
    assert together.step_size.max() / together.step_size.min() < 2


def test_results_shapes_dtypes_and_lp():
    def potential(position):
        return 0.5 * (position**2).sum(-1), position

    calls = []
    chains = run_chains(
        potential,
        torch.zeros(3, 2, dtype=torch.float32),
        num_warmup=30,
        num_samples=20,
        generator=torch.Generator().manual_seed(0),
        should_stop=lambda iteration: calls.append(iteration),
    )
    # Asked once per iteration completed by every chain (chains go at their own pace).
    assert calls == list(range(50))
    assert chains.samples.shape == (3, 20, 2) and chains.samples.dtype == torch.float32
    assert set(chains.stats) == set(STAT_NAMES)
    dtypes = {name: stat.dtype for name, stat in chains.stats.items()}
    assert dtypes == {
        "lp": torch.float32,
        "acceptance_rate": torch.float32,
        "step_size": torch.float32,
        "n_steps": torch.int64,
        "tree_depth": torch.int64,
        "diverging": torch.bool,
        "energy": torch.float32,
    }
    assert all(stat.shape == (3, 20) for stat in chains.stats.values())
    torch.testing.assert_close(
        chains.stats["lp"], -potential(chains.samples.reshape(-1, 2))[0].reshape(3, 20)
    )
    assert torch.equal(chains.stats["step_size"], chains.step_size[:, None].expand(3, 20))
    assert chains.inverse_mass_matrix.shape == (3, 2)


def test_without_adaptation_the_given_step_size_and_unit_metric_are_kept():
    def potential(position):
        return 0.5 * (position**2).sum(-1), position

    chains = run_chains(
        potential,
        torch.zeros(2, 2),
        algorithm="hmc",
        num_steps=4,
        step_size=0.3,
        adapt_step_size=False,
        adapt_mass_matrix=False,
        num_warmup=20,
        num_samples=5,
        progress=True,
        generator=torch.Generator().manual_seed(0),
    )
    assert (chains.stats["step_size"] == 0.3).all()
    assert (chains.stats["n_steps"] == 4).all()
    assert torch.equal(chains.inverse_mass_matrix, torch.ones(2, 2))


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"algorithm": "mala"}, "algorithm"),
        ({"num_warmup": -1}, "num_warmup"),
        ({"target_accept": 1.0}, "target_accept"),
        ({"max_tree_depth": 0}, "max_tree_depth"),
        ({"step_size": 0.0}, "step_size"),
        ({"num_steps": 5}, "num_steps"),
        ({"algorithm": "hmc", "num_steps": 5, "trajectory_length": 1.0}, "num_steps"),
        ({"algorithm": "hmc", "num_steps": 0}, "num_steps"),
        ({"algorithm": "hmc", "trajectory_length": -1.0}, "trajectory_length"),
        ({"init_position": torch.zeros(3)}, "init_position"),
    ],
)
def test_bad_options_raise_config_errors(options, name):
    def potential(position):
        return 0.5 * (position**2).sum(-1), position

    arguments = {
        "init_position": torch.zeros(2, 2),
        "num_warmup": 10,
        "num_samples": 10,
        "generator": torch.Generator(),
        **options,
    }
    with pytest.raises(ConfigError, match=name):
        run_chains(potential, **arguments)


def test_static_hmc_defaults_to_an_integration_time_of_two_pi():
    def potential(position):
        return 0.5 * (position**2).sum(-1), position

    chains = run_chains(
        potential,
        torch.zeros(2, 1),
        algorithm="hmc",
        step_size=0.1,
        adapt_step_size=False,
        num_warmup=0,
        num_samples=3,
        generator=torch.Generator().manual_seed(0),
    )
    assert (chains.stats["n_steps"] == 62).all()  # floor(2 pi / 0.1)


def test_nuts_chains_do_not_wait_for_each_other():
    # Four chains on N(0, 1) whose trajectory lengths vary from draw to draw. In lock-step every
    # iteration would cost the longest of the four trajectories; here each chain starts its next
    # transition when its own ends, so the run costs about the busiest chain's own total.
    calls = []

    def target(z):
        calls.append(1)
        return 0.5 * (z**2).sum(-1), z

    chains = run_chains(target, torch.zeros(4, 1), num_warmup=0, num_samples=300, step_size=0.3,
                        adapt_step_size=False, adapt_mass_matrix=False, generator=torch.Generator().manual_seed(0))
    n_steps = chains.stats["n_steps"]
    own = int(n_steps.sum(1).max())
    lock_step = int(n_steps.max(0).values.sum())
    # One potential call per leapfrog step, plus the initial evaluation; faster chains may run
    # into extra transitions while the slowest finishes its last one (at most one trajectory).
    assert own <= len(calls) - 1 <= own + 2**10
    assert len(calls) - 1 < 0.85 * lock_step, (len(calls), own, lock_step)
