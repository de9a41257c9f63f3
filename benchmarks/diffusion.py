"""Diffusion prior on digits: training, test bound, and inverse problems against a Gaussian prior.

One run on scikit-learn's digits (8 x 8, 17 grey levels), 1,437 train / 360 test (fixed permutation),
float32, one thread. Pixels v in 0..16 become x = 2 (v + u) / 17 - 1 in [-1, 1) with uniform dequantisation
noise u for training and for the bound (u = 1/2 for the inverse problems' ground truth).

(a) ``lk.models.Diffusion((1, 8, 8), timesteps=200, weighting="simple")`` with a small U-Net noise predictor
    (channels 16, 32; ``--network mlp``: an MLP 64-256-256-256-64, 10x faster, 1-2 dB worse), trained by
    ``lk.fit(..., engine="svi", elbo="meanfield")`` for 4,000 steps of 128 images:
    training time, and the test bound on log p(v) of the discrete digits in nats per image and bits per
    dimension: ``E_u log p(x) + 64 log(2 / 17)`` (the dequantisation bound, Theis et al. 2016), with the
    diffusion bound (all T steps) in place of log p(x). Sample quality (Fréchet distance, MMD p-value)
    of 360 DDPM samples against the test set, and of a Gaussian fitted to the training set.
(b) Inverse problems on 100 test images: inpainting (a random half of the pixels of each image observed,
    noise σ = 0.05) and denoising (σ = 0.5): PSNR (peak-to-peak 2) of the posterior mean against the
    truth, and coverage of pixelwise 90% intervals (inpainting: over the unobserved pixels), for
    (i) the Gaussian prior (closed-form posterior), (ii) the diffusion prior with the variational engine
    (``lk.fit(problem, ..., engine="svi")``, Gaussian guide), (iii) with the twisted SMC sampler and
    (iv) with DPS (``engine="diffusion"``); seconds per method.
(c) A latent diffusion prior: a VAE (latent dimension 8) on binarised digits, a diffusion model trained on
    its encoder means, and sample quality of decoded samples with z from N(0, I) and from the diffusion
    prior, against the test set.

    python benchmarks/diffusion.py            # full size (about 8 minutes on one core)
    python benchmarks/diffusion.py --smoke    # seconds
"""

import argparse
import math
import time

import numpy as np
import torch
from scipy.stats import multivariate_normal
from sklearn.datasets import load_digits

import latentkit as lk
from latentkit.models.inverse_problem import gaussian_posterior

LEVELS = 17


def scaled(v: np.ndarray, u: np.ndarray | float) -> np.ndarray:
    return 2 * (v + u) / LEVELS - 1


def psnr(estimate: np.ndarray, truth: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB for images in [-1, 1] (peak-to-peak 2), over all pixels."""
    return float(10 * np.log10(4 / np.mean((estimate - truth) ** 2)))


def coverage(low: np.ndarray, high: np.ndarray, truth: np.ndarray, where: np.ndarray) -> float:
    return float(((truth >= low) & (truth <= high))[where].mean())


def from_draws(draws: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Posterior mean and 5% / 95% quantiles from draws (chain, draw, N, D)."""
    flat = draws.reshape((-1,) + draws.shape[2:])
    return flat.mean(0), np.quantile(flat, 0.05, 0), np.quantile(flat, 0.95, 0)


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float32)
    rng = np.random.default_rng(args.seed)
    digits = load_digits().data
    order = rng.permutation(len(digits))
    train_v, test_v = digits[order[:1437]], digits[order[1437:]]
    train = scaled(train_v, rng.random(train_v.shape))
    steps, T, particles, vi_steps, n_images = (
        (100, 50, 4, 50, 5) if args.smoke else (args.steps, args.timesteps, args.particles, args.vi_steps, 100))

    # (a) training and the test bound
    network = lk.nn.ScoreUNet((1, 8, 8), channels=(16, 32)) if args.network == "unet" else None
    shape = (1, 8, 8) if args.network == "unet" else 64
    diffusion = lk.models.Diffusion(shape, network=network, timesteps=T, weighting="simple",
                                    hidden=(256, 256, 256))
    data = train.reshape((-1,) + ((1, 8, 8) if args.network == "unet" else (64,)))
    start = time.perf_counter()
    lk.fit(diffusion, data, engine="svi", elbo="meanfield", steps=steps, batch_size=128,
           learning_rate=args.learning_rate, num_samples=1, progress=False, seed=args.seed)
    train_seconds = time.perf_counter() - start
    test = scaled(test_v, rng.random(test_v.shape)).reshape((-1,) + data.shape[1:])
    with torch.no_grad():
        bound_x = diffusion.log_prob_bound(test, num_time_samples=None, seed=None).double().mean().item()
    nats = bound_x + 64 * math.log(2 / LEVELS)
    print(f"(a) training: {steps} steps, T = {T}, {args.network} network: {train_seconds:.1f} s")
    print(f"    test bound on log p(digit): {nats:.1f} nats per image, {-nats / (64 * math.log(2)):.3f} bits/dim "
          f"(continuous bound in [-1, 1]: {bound_x:.1f} nats)")
    samples = diffusion.sample(len(test), clip=True, seed=args.seed).reshape(len(test), 64).numpy()
    mean, cov = train.mean(0), np.cov(train, rowvar=False)
    gaussian_x = multivariate_normal(mean, cov).logpdf(test.reshape(len(test), 64)).mean()
    gaussian_nats = gaussian_x + 64 * math.log(2 / LEVELS)
    print(f"    Gaussian fit, same units: {gaussian_nats:.1f} nats per image, "
          f"{-gaussian_nats / (64 * math.log(2)):.3f} bits/dim")
    gaussian_samples = rng.multivariate_normal(mean, cov, size=len(test))
    for name, s in (("diffusion (DDPM)", samples), ("Gaussian fit", gaussian_samples)):
        q = lk.diagnostics.sample_quality(s, test.reshape(len(test), 64), seed=args.seed)
        print(f"    samples, {name}: Fréchet {q.frechet_distance:.2f}, MMD² {q.mmd2:.4f} (p = {q.mmd_p_value:.3f}), "
              f"precision {q.precision:.2f}, recall {q.recall:.2f}")

    # (b) inverse problems
    truth = scaled(test_v[:n_images], 0.5)
    print(f"(b) {n_images} test images; PSNR of the posterior mean (dB) | 90% interval coverage | seconds")
    for task, sigma in (("inpainting", 0.05), ("denoising", 0.5)):
        mask = rng.random(truth.shape) < 0.5 if task == "inpainting" else np.ones(truth.shape, dtype=bool)
        y = np.where(mask, truth + sigma * rng.normal(size=truth.shape), np.nan)
        judged = ~mask if task == "inpainting" else mask
        rows = []
        start = time.perf_counter()
        m, c = gaussian_posterior(mean, cov, np.eye(64), np.nan_to_num(y), sigma, mask=mask)
        sd = c.diagonal(dim1=-2, dim2=-1).sqrt().numpy()
        m = m.numpy()
        rows.append(("Gaussian prior, exact", m, m - 1.645 * sd, m + 1.645 * sd, time.perf_counter() - start))
        problem = lk.models.InverseProblem(diffusion, noise_scale=sigma, num_time_samples=8)
        observed = {"y": y.reshape((-1,) + data.shape[1:]), "mask": mask.reshape((-1,) + data.shape[1:])}
        start = time.perf_counter()
        res = lk.fit(problem, observed, engine="svi", steps=vi_steps, learning_rate=0.01, num_samples=100,
                     progress=False, seed=args.seed)
        rows.append(("diffusion, variational", *from_draws(res.posterior["x"].reshape(1, 100, n_images, 64)),
                     time.perf_counter() - start))
        for method in ("smc", "dps"):
            start = time.perf_counter()
            res = lk.fit(problem, observed, engine="diffusion", method=method, num_particles=particles,
                         progress=False, seed=args.seed)
            draws = res.posterior["x"].reshape(res.posterior["x"].shape[:3] + (64,))
            rows.append((f"diffusion, {method}", *from_draws(draws), time.perf_counter() - start))
        print(f"  {task} (σ = {sigma}):")
        for name, estimate, low, high, seconds in rows:
            covered = coverage(low, high, truth, judged)
            print(f"    {name:24s} PSNR {psnr(estimate, truth):6.2f} | coverage {covered:.3f} | {seconds:7.1f} s")

    latent_prior(args, digits[order[:1437]], digits[order[1437:]])


def latent_prior(args: argparse.Namespace, train_v: np.ndarray, test_v: np.ndarray) -> None:
    """(c) A diffusion prior on a fitted VAE's latent codes, in place of N(0, I) for sampling."""
    train, test = (train_v > 8).astype("float32"), (test_v > 8).astype("float32")
    vae_steps, steps = (50, 50) if args.smoke else (4000, 4000)
    vae = lk.models.VAE(input_dim=64, latent_dim=8, hidden=(256,))
    lk.fit(vae, train, engine="svi", steps=vae_steps, batch_size=128, learning_rate=1e-3, num_samples=1,
           progress=False, seed=args.seed)
    with torch.no_grad():
        codes = vae.encode(torch.as_tensor(train)).mean.numpy()
    diffusion = lk.models.Diffusion(8, timesteps=200, weighting="simple", hidden=(128, 128, 128))
    start = time.perf_counter()
    lk.fit(diffusion, codes, engine="svi", elbo="meanfield", steps=steps, batch_size=128, learning_rate=1e-3,
           num_samples=1, progress=False, seed=args.seed)
    seconds = time.perf_counter() - start
    n = len(test)
    torch.manual_seed(args.seed)
    with torch.no_grad():
        standard = vae.decode(torch.randn(n, 8)).sample().numpy()
        latent = vae.decode(diffusion.sample(n, seed=args.seed)).sample().numpy()
        posterior = vae.decode(vae.encode(torch.as_tensor(train[:n])).sample()).sample().numpy()
    print(f"(c) VAE (latent 8) on binarised digits; diffusion prior on its {len(codes)} codes trained in "
          f"{seconds:.1f} s; {n} Bernoulli samples against the {n} test images:")
    for name, samples in (("N(0, I) prior", standard), ("diffusion prior", latent),
                          ("reconstructions (reference)", posterior)):
        q = lk.diagnostics.sample_quality(samples, test, seed=args.seed)
        print(f"    {name:28s} Fréchet {q.frechet_distance:.2f}, MMD² {q.mmd2:.4f} (p = {q.mmd_p_value:.3f}), "
              f"precision {q.precision:.2f}, recall {q.recall:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--network", choices=("mlp", "unet"), default="unet")
    parser.add_argument("--steps", type=int, default=4000, help="training steps")
    parser.add_argument("--learning-rate", type=float, default=2e-3, help="training step size (Adam)")
    parser.add_argument("--timesteps", type=int, default=200)
    parser.add_argument("--particles", type=int, default=32, help="SMC / DPS particles per image")
    parser.add_argument("--vi-steps", type=int, default=800, help="SVI steps of the variational engine")
    main(parser.parse_args())
