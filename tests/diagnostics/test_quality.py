"""Sample quality: Fréchet distance, kernel MMD with a permutation test, k-NN precision/recall."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

import latentkit as lk
from latentkit.diagnostics import SampleQuality, sample_quality
from latentkit.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    X = load_digits().data / 16.0
    return X[np.random.default_rng(0).permutation(len(X))]  # the file is ordered by writer


def test_identical_sets(digits):
    report = sample_quality(digits[:400], digits[:400])
    assert report.frechet_distance == pytest.approx(0.0, abs=1e-8)
    assert report.mmd_p_value > 0.05 and report.mmd2 < 0
    assert report.precision == 1.0 and report.recall == 1.0
    assert isinstance(report, SampleQuality) and lk.diagnostics.sample_quality is sample_quality


def test_independent_sets_from_one_distribution():
    rng = np.random.default_rng(1)
    D, n = 4, 1000
    report = sample_quality(rng.normal(size=(n, D)), rng.normal(size=(n, D)))
    # E[Fréchet] of two independent sets of n standard-normal D-vectors is about 2 D / n + D (D + 1) / (2 n)
    # (mean term + covariance term; 0.018 here, checked over 200 repetitions, max 0.047): 4x is the bound
    assert report.frechet_distance < 4 * (2 * D / n + D * (D + 1) / (2 * n))
    assert report.mmd_p_value > 0.05
    # k-NN balls of 1000 points in 4-D cover all but the tails of the other set
    assert report.precision > 0.9 and report.recall > 0.9


def test_digits_against_shuffled_pixels(digits):
    shuffled = digits[400:800].copy()
    rng = np.random.default_rng(2)
    for row in shuffled:
        rng.shuffle(row)
    report = sample_quality(shuffled, digits[:400])
    same = sample_quality(digits[800:1200], digits[:400])  # held-out digits: the floor
    assert report.frechet_distance > 10 * same.frechet_distance
    assert report.mmd_p_value < 0.01 and same.mmd_p_value > 0.05
    assert report.precision < 0.05  # no shuffled image looks like a digit


def test_disjoint_supports_and_mode_collapse():
    rng = np.random.default_rng(3)
    reference = rng.normal(size=(500, 2))
    far = sample_quality(reference + 10.0, reference)
    assert far.precision == 0.0 and far.recall == 0.0 and far.mmd_p_value < 0.01
    collapsed = sample_quality(reference[reference[:, 0] > 0.5], reference)  # one side only
    assert collapsed.precision > 0.9 and collapsed.recall < 0.5


def test_features_callable_report_and_seed(digits):
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 5))
    images = digits.reshape(-1, 1, 8, 8)
    report = sample_quality(images[:100], torch.as_tensor(images[100:200]), features=net, num_permutations=50, seed=4)
    assert report.num_features == 5 and report.num_permutations == 50
    assert report == sample_quality(images[:100], images[100:200], features=net, num_permutations=50, seed=4)
    assert set(report.to_dict()) >= {"frechet_distance", "mmd2", "mmd_p_value", "precision", "recall"}
    assert "Fréchet distance" in str(report) and "recall" in str(report)


def test_bad_input():
    X = np.random.default_rng(5).normal(size=(20, 3))
    with pytest.raises(DataError, match="different shapes"):
        sample_quality(X, X[:, :2])
    with pytest.raises(DataError, match="5 features for samples but 3"):
        sample_quality(X[:19], X, features=lambda x: torch.cat([x, x[:, :2]], 1) if len(x) == 19 else x)
    bad = X.copy()
    bad[3, 1] = np.nan
    with pytest.raises(DataError, match="reference: contains NaN"):
        sample_quality(X, bad)
    with pytest.raises(DataError, match="features: returned NaN"):
        sample_quality(X, X, features=lambda x: x * np.nan)
    with pytest.raises(DataError, match=r"\(N, \*event_shape\)"):
        sample_quality(X[:, 0], X[:, 0])
    with pytest.raises(DataError, match="at least 4 points"):
        sample_quality(X[:3], X)
    with pytest.raises(ConfigError, match="num_permutations"):
        sample_quality(X, X, num_permutations=0)


@pytest.fixture(scope="module")
def digits_split_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from latentkit.diagnostics.features import digits_split

    data = load_digits()
    train, test = digits_split()
    X = data.data / 16.0
    return X[train], data.target[train], X[test], data.target[test]


def test_digits_classifier_accuracy_and_weights(digits_split_data):
    from importlib import resources

    from latentkit.diagnostics.features import WEIGHTS, digits_classifier

    *_, X_test, y_test = digits_split_data
    with torch.no_grad():
        predicted = digits_classifier()(torch.as_tensor(X_test)).argmax(1).numpy()
    # 0.982 for the shipped weights (scripts/train_digits_classifier.py); 450 images: a standard error of 0.006
    assert (predicted == y_test).mean() >= 0.97
    assert (resources.files("latentkit.diagnostics") / WEIGHTS).stat().st_size < 200_000  # type: ignore[attr-defined]


def test_digits_features_identical_held_out_and_shuffled(digits_split_data):
    X_train, _, X_test, _ = digits_split_data
    same = sample_quality(X_test, X_test.reshape(-1, 1, 8, 8), features="digits", num_permutations=100)
    assert same.frechet_distance == pytest.approx(0.0, abs=1e-6) and same.mmd_p_value > 0.05
    assert same.num_features == 64
    floor = sample_quality(X_train[:450], X_test, features="digits", num_permutations=100)  # held-out digits
    shuffled = X_train[450:900].copy()
    rng = np.random.default_rng(2)
    for row in shuffled:
        rng.shuffle(row)
    far = sample_quality(shuffled, X_test, features="digits", num_permutations=100)
    assert floor.mmd_p_value > 0.05 and far.mmd_p_value < 0.01
    # test vs train: about 14; shuffled pixels: about 500
    assert far.frechet_distance > 10 * floor.frechet_distance
    assert far.precision < 0.3 < 0.8 < floor.precision


def test_feature_space_errors(digits_split_data):
    X = digits_split_data[0][:20]
    with pytest.raises(ConfigError, match=r"features: unknown feature space 'inception'; choose one of \['digits'\]"):
        sample_quality(X, X, features="inception")
    with pytest.raises(ConfigError, match="features: must be None"):
        sample_quality(X, X, features=3)
    with pytest.raises(DataError, match="digits classifier takes 8 x 8 images"):
        sample_quality(X[:, :10], X[:, :10], features="digits")
