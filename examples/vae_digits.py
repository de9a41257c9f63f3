"""A variational autoencoder on scikit-learn's handwritten digits (8x8, bundled, nothing downloaded).

Shows ``lk.models.VAE`` trained by the SVI engine by epochs of minibatches with its own amortised
guide, a KL warm-up, the validation ELBO per epoch with early stopping, the held-out
importance-weighted log-likelihood (IWAE) before and after training, the posterior-collapse
monitors per epoch (KL per latent dimension, active units), the quality check of the encoder
(Pareto k-hat per data point), the encoder against the exact posterior p(z | x) sampled by NUTS
with the decoder fixed (the amortisation gap), an IAF guide for comparison, and a run folder
whose plots/ hold reconstructions, samples, latent traversals, the ELBO curve and the per-epoch
curves.

The digits are binarised (pixel > 8 of 16), so the Bernoulli log-likelihoods are in nats.
"""

import argparse
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits

import latentkit as lk


def amortisation_gap(vae: lk.models.VAE, x: np.ndarray, args: argparse.Namespace) -> None:
    """The encoder q(z | x) against the exact posterior, sampled by NUTS with the decoder fixed."""
    draws = 50 if args.smoke else 500
    res = lk.fit(vae.latent_posterior(x), None, engine="nuts", num_chains=1 if args.smoke else 2,
                 num_warmup=draws, num_samples=draws, seed=args.seed, progress=not args.smoke)
    z = res.posterior["z"].reshape(-1, len(x), vae.latent_dim)
    q = vae.encode(vae.as_tensor(x))
    shift = np.abs(q.mean.detach().numpy() - z.mean(0)) / z.std(0)
    ratio = q.stddev.detach().numpy() / z.std(0)
    elbo = vae.log_likelihood(x, num_particles=1, seed=0)
    for _ in range(99):  # average of 100 one-particle estimates: the ELBO
        elbo += vae.log_likelihood(x, num_particles=1)
    gap = vae.log_likelihood(x, num_particles=5000, seed=0) - elbo / 100
    print(f"encoder vs NUTS posterior on {len(x)} held-out digits: mean shift {shift.mean():.2f} posterior sd, "
          f"sd ratio q/p {np.median(ratio):.2f} (median); log p(x) - ELBO = KL(q || p) {gap.mean():.2f} nats")


def main(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    X = (load_digits().data > 8).astype(float)
    order = np.random.default_rng(args.seed).permutation(len(X))
    train, valid, test = X[order[:1300]], X[order[1300:1500]], X[order[1500:]]
    particles = 20 if args.smoke else 1000  # IWAE particles for the held-out log-likelihood
    options = dict(engine="svi", epochs=2 if args.smoke else 300, batch_size=100, learning_rate=1e-3,
                   kl_warmup=1 if args.smoke else 10, validation=valid, patience=10,
                   num_samples=4 if args.smoke else 20, seed=args.seed, progress=not args.smoke)
    for guide in ("gaussian",) if args.smoke else ("gaussian", "iaf"):
        vae = lk.models.VAE(input_dim=64, latent_dim=8, hidden=(256,), guide=guide)
        before = vae.log_likelihood(test, num_particles=particles, seed=0).mean()
        out = Path(args.out) / f"vae_digits_{guide}"
        res = lk.fit(vae, train, out=out, **options)
        after = vae.log_likelihood(test, num_particles=particles, seed=0).mean()
        stopping = res.config["early_stopping"]
        print(f"guide={guide}: {stopping['epochs_run']} epochs, best validation ELBO at epoch {stopping['best_epoch']} "
              f"(networks restored from it); held-out log p(x) (IWAE, K={particles}) {before:.2f} -> {after:.2f} "
              f"nats per image; run folder with plots: {out}")
        if guide == "gaussian":
            kl = res.epoch_metrics["kl_per_dim"]
            print("KL per latent dimension (nats) on the validation data, first and best epoch:",
                  np.round(kl[0], 2), np.round(kl[stopping["best_epoch"] - 1], 2))
            print("active units per epoch:", res.epoch_metrics["active_units"].astype(int)[::max(1, len(kl) // 10)])
            print(next(c for c in lk.diagnostics.check(res).checks if c.name == "pareto_k").reason)
            amortisation_gap(vae, test[:2 if args.smoke else 10], args)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run")
    parser.add_argument("--out", default="runs/examples")
    main(parser.parse_args())
