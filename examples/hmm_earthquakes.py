"""Poisson hidden Markov model of yearly major-earthquake counts, 1900-2006.

Shows ``PoissonHMM`` fitted by both engines (SVI MAP, then NUTS with full posteriors), the
Viterbi path (``decode``), posterior state probabilities (``smooth``), a forecast of the next
years, and a plot of the counts with the decoded state rates written to a PNG. The data are the
classic example of Zucchini & MacDonald (2009), shipped as ``lk.datasets.load_earthquakes()``.
"""

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import latentkit as lk  # noqa: E402


def main(args: argparse.Namespace) -> None:
    data = lk.datasets.load_earthquakes()
    years, counts = data["year"].to_numpy(), data["count"].to_numpy()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    states = 2 if args.smoke else args.states
    model = lk.models.PoissonHMM(n_states=states, sticky=1.0)

    # MAP: a point estimate in seconds.
    svi = lk.fit(model, counts, engine="svi", guide="delta", steps=200 if args.smoke else 1000,
                 learning_rate=0.05, num_samples=1, seed=args.seed, progress=not args.smoke)
    print("MAP rates:", svi.posterior["rates"][0, 0].round(2))
    print("MAP transition:\n", svi.posterior["transition"][0, 0].round(3))

    # NUTS: full posteriors, states labelled consistently across chains.
    draws = 50 if args.smoke else 1000
    nuts = lk.fit(model, counts, engine="nuts", num_warmup=draws, num_samples=draws,
                  num_chains=1 if args.smoke else 4, seed=args.seed, progress=not args.smoke)
    print(nuts.summary(var_names=["rates", "transition"]).round(3))
    nuts.save(out / "earthquakes_nuts", plots=not args.smoke)

    path = model.decode(nuts, counts)
    probs = model.smooth(nuts, counts)
    rates = nuts.posterior["rates"].mean((0, 1))
    forecast = model.forecast(nuts, counts, horizon=5, seed=args.seed)
    print("forecast 2007-2011 (posterior mean counts):", forecast.obs.mean(0).round(1))

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    top.bar(years, counts, color="0.7", label="major earthquakes")
    top.step(years, rates[path], where="mid", color="C3", label="rate of the Viterbi state")
    top.set_ylabel("count per year")
    top.legend(loc="upper left")
    for k in range(states):
        bottom.plot(years, probs[:, k], label=f"state {k} (rate {rates[k]:.1f})")
    bottom.set_ylabel("P(state | all years)")
    bottom.set_xlabel("year")
    bottom.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(out / "hmm_earthquakes.png", dpi=100)
    plt.close(fig)
    print(f"plot: {out / 'hmm_earthquakes.png'}; state path changes in years "
          f"{years[1:][np.diff(path) != 0].tolist()}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run")
    parser.add_argument("--states", type=int, default=3, help="number of hidden states")
    parser.add_argument("--out", default="runs/examples")
    main(parser.parse_args())
