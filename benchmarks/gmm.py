"""GaussianMixture (SVI MAP and NUTS) against scikit-learn's GaussianMixture.

Same synthetic data for all (N = 10,000 train + 10,000 held out, D = 2, K = 3): fit time,
held-out mean log-likelihood per point (at the MAP / posterior-mean parameters for
latentkit: the plug-in density, comparable to scikit-learn's ``score``), adjusted Rand index
of the held-out labels. Printed as a table with ratios to scikit-learn.

    python benchmarks/gmm.py            # full size
    python benchmarks/gmm.py --smoke    # seconds
"""

import argparse
import time

import numpy as np
import torch
from scipy.stats import multivariate_normal
from sklearn.metrics import adjusted_rand_score
from sklearn.mixture import GaussianMixture as SkGaussianMixture

import latentkit as lk
from latentkit.datasets import make_gaussian_mixture

LOCS = np.array([[-3.0, 0.0], [0.0, 2.5], [3.0, 0.0]])
SCALES = np.array([[1.0, 0.7], [0.8, 1.2], [1.1, 0.6]])
WEIGHTS = np.array([0.3, 0.3, 0.4])


def plug_in(weights: np.ndarray, locs: np.ndarray, covs: np.ndarray, X: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean log density per point and MAP labels of a mixture with the given parameters."""
    parts = zip(weights, locs, covs, strict=True)
    comp = np.stack([np.log(w) + multivariate_normal(m, c).logpdf(X) for w, m, c in parts], 1)
    total = np.logaddexp.reduce(comp, axis=1)
    return float(total.mean()), comp.argmax(1)


def main(args: argparse.Namespace) -> None:
    torch.set_default_dtype(torch.float64)
    n = 1000 if args.smoke else 10_000
    X, _ = make_gaussian_mixture(n, LOCS, SCALES, WEIGHTS, seed=0)
    X_test, y_test = make_gaussian_mixture(n, LOCS, SCALES, WEIGHTS, seed=1)
    rows = []

    start = time.perf_counter()
    sk = SkGaussianMixture(3, covariance_type="full", random_state=0).fit(X)
    rows.append(("scikit-learn EM", time.perf_counter() - start, sk.score(X_test),
                 adjusted_rand_score(y_test, sk.predict(X_test))))

    gmm = lk.models.GaussianMixture(3, covariance="full")
    for engine, options in [
        ("svi", {"guide": "delta", "steps": 200 if args.smoke else 1000, "learning_rate": 0.05,
                 "num_samples": 1}),
        ("nuts", {"num_chains": 4, "num_warmup": 100 if args.smoke else 500,
                  "num_samples": 100 if args.smoke else 500}),
    ]:
        start = time.perf_counter()
        res = lk.fit(gmm, X, engine=engine, seed=0, progress=False, **options)
        elapsed = time.perf_counter() - start
        post = res.posterior
        tril = post["scale_tril"].mean((0, 1))
        ll, labels = plug_in(post["weights"].mean((0, 1)), post["locs"].mean((0, 1)),
                             tril @ np.swapaxes(tril, -1, -2), X_test)
        rows.append((f"latentkit {engine}", elapsed, ll, adjusted_rand_score(y_test, labels)))

    base_time, base_ll = rows[0][1], rows[0][2]
    print(f"N = {n} train / {n} held out, D = 2, K = 3")
    print(f"{'method':<18}{'fit s':>9}{'time ratio':>12}{'held-out ll/pt':>16}{'ll - sklearn':>14}{'ARI':>8}")
    for name, seconds, ll, ari in rows:
        print(f"{name:<18}{seconds:>9.2f}{seconds / base_time:>12.1f}{ll:>16.4f}{ll - base_ll:>14.4f}{ari:>8.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true")
    main(parser.parse_args())
