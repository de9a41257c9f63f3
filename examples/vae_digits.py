"""A variational autoencoder on scikit-learn's handwritten digits (8x8, bundled, nothing downloaded).

Shows ``lk.models.VAE`` trained by the SVI engine on minibatches with its own amortised guide,
the held-out importance-weighted log-likelihood (IWAE) before and after training, the
posterior-collapse monitors (KL per latent dimension, active units), the encoder against the
exact posterior p(z | x) sampled by NUTS with the decoder fixed (the amortisation gap), an IAF
guide for comparison, and a run folder with reconstructions, samples, latent traversals and the
ELBO curve.

The digits are binarised (pixel > 8 of 16), so the Bernoulli log-likelihoods are in nats.
"""

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import latentkit as lk  # noqa: E402
from latentkit.diagnostics.plots import plot_elbo  # noqa: E402


def image_grid(rows: list[np.ndarray], titles: list[str], path: Path) -> None:
    """One row of 8x8 images per array in ``rows``."""
    fig, axes = plt.subplots(len(rows), len(rows[0]), figsize=(len(rows[0]), len(rows) * 1.1), squeeze=False)
    for r, (images, title) in enumerate(zip(rows, titles, strict=True)):
        for c, image in enumerate(images):
            axes[r, c].imshow(image.reshape(8, 8), cmap="gray_r", vmin=0, vmax=1)
            axes[r, c].axis("off")
        axes[r, 0].set_title(title, fontsize=8, loc="left")
    fig.savefig(path, dpi=80)
    plt.close(fig)


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
    train, test = X[order[:1500]], X[order[1500:]]
    epochs = 2 if args.smoke else 100
    batch_size = 100
    particles = 20 if args.smoke else 1000  # IWAE particles for the held-out log-likelihood
    out = Path(args.out) / "vae_digits"
    for guide in ("gaussian",) if args.smoke else ("gaussian", "iaf"):
        vae = lk.models.VAE(input_dim=64, latent_dim=8, hidden=(256,), guide=guide)
        before = vae.log_likelihood(test, num_particles=particles, seed=0).mean()
        res = lk.fit(vae, train, engine="svi", steps=epochs * len(train) // batch_size, batch_size=batch_size,
                     learning_rate=1e-3, num_samples=4 if args.smoke else 20, seed=args.seed, progress=not args.smoke)
        after = vae.log_likelihood(test, num_particles=particles, seed=0).mean()
        print(f"guide={guide}: held-out log p(x) (IWAE, K={particles}) {before:.2f} -> {after:.2f} nats per image")
        if guide == "gaussian":
            kl = vae.kl_per_dim(test)
            print("KL per latent dimension (nats):", np.round(kl.numpy(), 2), f"sum {kl.sum():.2f}")
            print(f"active units: {vae.active_units(test)} of {vae.latent_dim}")
            res.save(out, plots=False)
            (out / "plots").mkdir(exist_ok=True)
            recon = vae.reconstruct(test[:10]).numpy()
            image_grid([test[:10], recon], ["held-out digits", "reconstructions"],
                       out / "plots" / "reconstructions.png")
            image_grid([vae.sample(10, mean=True, seed=args.seed).numpy()], ["samples (means of p(x|z))"],
                       out / "plots" / "samples.png")
            with torch.no_grad():  # latent traversals: one dimension from -2.5 to 2.5 sd, the others at 0
                grid = torch.linspace(-2.5, 2.5, 9)
                rows = []
                for dim in range(vae.latent_dim):
                    z = torch.zeros(9, vae.latent_dim)
                    z[:, dim] = grid
                    rows.append(vae.decode(z).base_dist.probs.numpy())
            image_grid(rows, [f"z[{d}]" for d in range(vae.latent_dim)], out / "plots" / "latent_traversals.png")
            plot_elbo(res).savefig(out / "plots" / "elbo.png", dpi=80)
            plt.close("all")
            print(f"run folder with plots: {out}")
            amortisation_gap(vae, test[:2 if args.smoke else 10], args)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run")
    parser.add_argument("--out", default="runs/examples")
    main(parser.parse_args())
