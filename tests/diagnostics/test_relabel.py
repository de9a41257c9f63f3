"""Pivot-based Hungarian relabelling recovers permuted labels."""

import numpy as np
import pytest

import latentkit as lk
from latentkit.diagnostics import relabel, relabel_result
from latentkit.errors import ConfigError
from latentkit.inference import Result

TRUE_LOCS = np.array([[-4.0, 0.0], [0.0, 3.0], [4.0, 0.0]])
TRUE_WEIGHTS = np.array([0.2, 0.3, 0.5])


@pytest.fixture()
def permuted():
    """Two chains of 300 draws near the true components, each draw's labels shuffled."""
    rng = np.random.default_rng(0)
    C, S, K = 2, 300, 3
    locs = TRUE_LOCS + 0.3 * rng.normal(size=(C, S, K, 2))
    weights = TRUE_WEIGHTS + 0.02 * rng.normal(size=(C, S, K))
    transition = np.broadcast_to(np.arange(K * K, dtype=float).reshape(K, K), (C, S, K, K)).copy()
    true_assignment = rng.integers(0, K, size=20)
    perms = np.array([[rng.permutation(K) for _ in range(S)] for _ in range(C)])  # new j <- old perms[j]
    shuffle = lambda a, axis=2: np.take_along_axis(  # noqa: E731
        a, perms.reshape(perms.shape + (1,) * (a.ndim - 3)), axis=axis)
    shuffled_transition = np.take_along_axis(shuffle(transition), perms[:, :, None, :], axis=3)
    inverse = np.argsort(perms, axis=-1)
    assignment = np.take_along_axis(inverse, np.broadcast_to(true_assignment, (C, S, 20)), axis=-1)
    posterior = {"locs": shuffle(locs), "weights": shuffle(weights), "transition": shuffled_transition,
                 "assignment": assignment}
    truth = {"locs": locs, "weights": weights, "transition": transition, "assignment": true_assignment}
    return posterior, truth


def test_relabel_with_true_pivot_recovers_every_label(permuted):
    posterior, truth = permuted
    out, perms = relabel(posterior, "locs", permute={"locs": 0, "weights": 0, "transition": (0, 1)},
                         labels=["assignment"], pivot=TRUE_LOCS)
    assert perms.shape == (2, 300, 3)
    np.testing.assert_array_equal(out["locs"], truth["locs"])
    np.testing.assert_array_equal(out["weights"], truth["weights"])
    np.testing.assert_array_equal(out["transition"], truth["transition"])
    assert (out["assignment"] == truth["assignment"]).all()


def test_relabel_with_a_draw_as_pivot_is_consistent_up_to_one_permutation(permuted):
    posterior, truth = permuted
    out, _ = relabel(posterior, "locs", permute={"locs": 0, "weights": 0}, pivot=0)
    # Every draw now carries the labels of draw 0: one permutation maps them all to the truth.
    order = np.argmin(((out["locs"][0, 0][:, None] - TRUE_LOCS[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(out["locs"], truth["locs"][:, :, order])
    summary = out["locs"].mean((0, 1))
    np.testing.assert_allclose(summary, TRUE_LOCS[order], atol=0.1)


def test_relabel_result_and_errors(permuted):
    posterior, truth = permuted
    result = Result(posterior={"locs": posterior["locs"], "weights": posterior["weights"]})
    fixed = relabel_result(result, "locs", permute={"locs": 0, "weights": 0}, pivot=TRUE_LOCS)
    np.testing.assert_array_equal(fixed.posterior["weights"], truth["weights"])
    assert result.posterior["weights"] is posterior["weights"]  # the original is untouched
    with pytest.raises(ConfigError, match="no posterior sites"):
        relabel(posterior, "means")


def test_gaussian_mixture_relabels_unless_told_not_to(permuted):
    posterior, truth = permuted
    gmm = lk.models.GaussianMixture(n_components=3, covariance="diag")
    out = gmm.relabel({"locs": posterior["locs"], "weights": posterior["weights"]})
    order = np.argmin(((out["locs"].mean((0, 1))[:, None] - TRUE_LOCS[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(out["locs"], truth["locs"][:, :, order])
    off = lk.models.GaussianMixture(n_components=3, covariance="diag", relabel=False)
    assert off.init_args["relabel"] is False
    assert off.relabel(posterior)["locs"] is posterior["locs"]
