"""SemiSupervisedVAE (M2): the enumerated ELBO against its closed form on a tiny case, learning to
classify digits from a few labels, labels in results, and bad labels."""

import numpy as np
import pytest
import torch
from pyro.infer import TraceEnum_ELBO
from sklearn.datasets import load_digits

import latentkit as lk
from latentkit.errors import ConfigError, DataError


def test_enumerated_elbo_matches_the_m2_bound_exactly():
    """TraceEnum_ELBO's loss equals Kingma et al.'s bound computed by hand on the same draws of z:
    labelled points L(x, y) + alpha log q(y | x); unlabelled sum_y q(y | x) [L(x, y) - log q(y | x)]."""
    torch.manual_seed(0)
    m2 = lk.models.SemiSupervisedVAE(input_dim=3, n_classes=2, latent_dim=1, hidden=(4,), alpha=2.0)
    X = np.array([[1, 0, 1], [0, 1, 1], [1, 1, 0], [0, 0, 1]])
    for labels in ([0, -1, 1, np.nan], [-1, -1, -1, -1], [1, 0, 1, 1]):
        kwargs = m2.prepare((X, labels))
        del kwargs["subsample_size"]
        torch.manual_seed(5)
        loss = TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(m2.model, m2.guide, **kwargs).detach()
        x, y, known = kwargs["X"], kwargs["Y"], kwargs["labelled"]
        with torch.no_grad():
            ys = torch.where(known, y, torch.arange(2)[:, None])  # (class, point)
            torch.manual_seed(5)  # the guide draws z for every enumerated class of every point
            q = m2.encode(x.expand(2, 4, 3), m2._one_hot(ys))
            z = q.rsample()
            bound = (m2.decode(z, m2._one_hot(ys)).log_prob(x) + m2.prior().log_prob(z) - q.log_prob(z)
                     + np.log(0.5))  # L(x, y) per class and point, log p(y) = log 1/2
            q_y = m2.class_probabilities(X)
            elbo = sum(bound[y[i], i] + 2.0 * q_y[i, y[i]].log() if known[i] else
                       (q_y[i] * (bound[:, i] - q_y[i].log())).sum() for i in range(4))
        assert float(loss) == pytest.approx(-float(elbo), rel=1e-12)


def test_classifies_digits_from_few_labels():
    """100 labels among 1,000 binarised digits, 5 epochs: held-out accuracy at least 40%, chance is 10%
    (seen: 0.6+; the margin allows for other BLAS builds)."""
    digits = load_digits()
    X, y = (digits.data > 8).astype(float), digits.target
    order = np.random.default_rng(0).permutation(len(X))
    train, test = order[:1000], order[1500:]
    labels = np.full(1000, -1)
    known = np.random.default_rng(1).choice(1000, 100, replace=False)
    labels[known] = y[train][known]
    torch.manual_seed(0)
    m2 = lk.models.SemiSupervisedVAE(input_dim=64, n_classes=10, latent_dim=8, hidden=(128,))
    res = lk.fit(m2, (X[train], labels), engine="svi", epochs=5, batch_size=100, learning_rate=1e-3,
                 num_samples=2, seed=0, progress=False)
    accuracy = (m2.classify(X[test]).numpy() == y[test]).mean()
    assert accuracy > 0.4
    assert res.epoch_metrics["elbo"][-1] > res.epoch_metrics["elbo"][0]
    assert res.epoch_metrics["kl_per_dim"].shape == (5, 8)
    # the imputed labels: observed ones kept, missing ones drawn from p(y | x, z)
    assert np.array_equal(res.posterior["y"][0, :, known], np.broadcast_to(y[train][known][:, None], (100, 2)))
    assert res.posterior["y"].shape == (1, 2, 1000)


def test_bad_labels_and_options():
    m2 = lk.models.SemiSupervisedVAE(input_dim=4, n_classes=3, latent_dim=2, hidden=(8,))
    X = np.zeros((4, 4))
    with pytest.raises(DataError, match="labels: must be integers in 0..2, or -1 / NaN"):
        m2.prepare((X, [0, 3, 1, -1]))
    with pytest.raises(DataError, match="labels: must be integers"):
        m2.prepare((X, [0, 0.5, 1, -1]))
    with pytest.raises(DataError, match=r"labels: expected shape \(4,\)"):
        m2.prepare((X, [0, 1]))
    with pytest.raises(DataError, match="labels: must be numbers"):
        m2.prepare((X, ["a", "b", "c", "d"]))
    with pytest.raises(DataError, match="a SemiSupervisedVAE takes"):
        m2.prepare(X)
    with pytest.raises(ConfigError, match="n_classes: must be an integer >= 2"):
        lk.models.SemiSupervisedVAE(input_dim=4, n_classes=1)
    with pytest.raises(ConfigError, match="alpha"):
        lk.models.SemiSupervisedVAE(input_dim=4, n_classes=3, alpha=-1.0)
    assert m2.prepare({"x": X, "labels": [0, np.nan, 2, -1]})["labelled"].tolist() == [True, False, True, False]


def test_run_folder_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    X = (rng.random((40, 6)) > 0.5).astype(float)
    labels = np.where(rng.random(40) < 0.3, rng.integers(0, 2, 40), -1)
    m2 = lk.models.SemiSupervisedVAE(input_dim=6, n_classes=2, latent_dim=2, hidden=(8,))
    res = lk.fit(m2, (X, labels), engine="svi", epochs=2, batch_size=10, num_samples=3, seed=0, progress=False,
                 out=tmp_path / "run")
    loaded = lk.load(tmp_path / "run")
    assert loaded == res and isinstance(loaded.model, lk.models.SemiSupervisedVAE)
