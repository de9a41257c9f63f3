"""Gaussian mixture on the Old Faithful eruptions: SVI (MAP) and NUTS side by side.

Shows the built-in model, both engines, ArviZ diagnostics and model comparison by PSIS-LOO
between 2 and 3 components, and a run folder written for each fit.
"""

import argparse
from pathlib import Path

import arviz as az

import latentkit as lk


def main(args: argparse.Namespace) -> None:
    data = lk.datasets.load_old_faithful()
    draws = 50 if args.smoke else 1000
    # A third component that the data hardly supports makes long trajectories; a smoke run caps them.
    tree = {"max_tree_depth": 5} if args.smoke else {}
    steps = 200 if args.smoke else 2000
    out = Path(args.out)
    fits = {}
    for k in (2, 3):
        gmm = lk.models.GaussianMixture(n_components=k, covariance="full")
        svi = lk.fit(gmm, data, engine="svi", guide="delta", steps=steps, learning_rate=0.05,
                     num_samples=1, seed=args.seed, progress=not args.smoke)
        print(f"K={k} MAP locs:\n{svi.posterior['locs'][0, 0].round(2)}")
        nuts = lk.fit(gmm, data, engine="nuts", num_warmup=draws, num_samples=draws,
                      num_chains=4, seed=args.seed, progress=not args.smoke, **tree)
        nuts.save(out / f"gmm{k}", plots=not args.smoke)
        print(lk.diagnostics.check(nuts))
        fits[f"gmm-{k}"] = nuts.to_arviz()
    print(nuts.summary(var_names=["weights", "locs"]).round(3))
    print(az.compare(fits, ic="loo").round(2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run")
    parser.add_argument("--out", default="runs/examples")
    main(parser.parse_args())
