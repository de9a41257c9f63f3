"""Eight schools written as a plain Pyro function, fitted with NUTS and with SVI.

Shows that any Pyro model is a latentkit model: the data is a dict of the function's keyword
arguments, deterministic sites land in the posterior, and the result converts to ArviZ.
"""

import argparse

import numpy as np
import pyro
import pyro.distributions as dist

import latentkit as lk

Y = np.array([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
SIGMA = np.array([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])


def eight_schools(sigma, y=None):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("school", len(sigma)):
        theta_raw = pyro.sample("theta_raw", dist.Normal(0.0, 1.0))
        theta = pyro.deterministic("theta", mu + tau * theta_raw)
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)


def main(args: argparse.Namespace) -> None:
    data = {"sigma": SIGMA, "y": Y}
    draws = 100 if args.smoke else 1000
    nuts = lk.fit(eight_schools, data, engine="nuts", num_warmup=draws, num_samples=draws,
                  num_chains=4, seed=args.seed, progress=not args.smoke)
    print(nuts.summary(var_names=["mu", "tau", "theta"]).round(2))
    print(lk.diagnostics.check(nuts))
    svi = lk.fit(eight_schools, data, engine="svi", steps=300 if args.smoke else 3000,
                 learning_rate=0.02, seed=args.seed, progress=not args.smoke)
    print(f"SVI (mean-field normal) mu: {svi.posterior['mu'].mean():.2f} "
          f"(NUTS: {nuts.posterior['mu'].mean():.2f})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run")
    main(parser.parse_args())
