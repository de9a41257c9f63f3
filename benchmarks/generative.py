"""Sample quality of latentkit's generative models on digits, each trained for the same CPU time.

One run on scikit-learn's digits (grey levels / 16, in [0, 1]), split by
``latentkit.diagnostics.features.digits_split()``: 1,347 training images (the classifier behind
``features="digits"`` was trained on the same ones) and 450 held-out test images, the reference.
Each model trains on the training images for the same CPU time (``--budget`` seconds of
``time.process_time``, one thread, float32): the number of steps is set from the CPU time per step of
a short calibration fit. Then 1,000 samples of each model are compared with the test images by
``lk.diagnostics.sample_quality``: Fréchet distance in the digits classifier's features (FD) and in raw
pixels (FD pixels), kernel MMD² with its permutation p-value, k-NN precision and recall (k = 3).
The floor is 1,000 training images against the same test images: what a model that reproduced the
data distribution exactly would score.

Models: a DCGAN (``ConvGenerator`` latent 16, channels 64-32, tanh output on data scaled to [-1, 1];
``ConvDiscriminator`` channels 32-64; non-saturating loss and the engine's defaults, samples from the
averaged generator), the VAE (MLP 64-256-8, Bernoulli likelihood on grey levels, samples are the
decoder's means), and the diffusion model of benchmarks/diffusion.py (U-Net noise predictor, T = 200,
simple weighting, data scaled to [-1, 1], ancestral DDPM samples with the Tweedie estimate clipped).

    python benchmarks/generative.py                 # 120 CPU seconds per model: 8 to 11 minutes on a busy machine
    python benchmarks/generative.py --smoke         # seconds
"""

import argparse
import time
from collections.abc import Callable

import numpy as np
import pandas as pd
import torch
from sklearn.datasets import load_digits

import latentkit as lk
from latentkit.diagnostics.features import digits_split
from latentkit.nn import ConvDiscriminator, ConvGenerator

NUM_SAMPLES = 1000


def cpu_steps(fit: Callable[[int], object], budget: float, probe: int) -> tuple[int, float]:
    """Steps that fill ``budget`` CPU seconds: the CPU time per step is the slope between fits of ``probe``
    and ``2 * probe`` steps (the fixed cost of a fit left out). Returns (steps, seconds per step)."""
    times = []
    for steps in (probe, 2 * probe):
        start = time.process_time()
        fit(steps)
        times.append(time.process_time() - start)
    average = times[1] / (2 * probe)
    slope = (times[1] - times[0]) / probe
    per_step = slope if slope > 0.2 * average else average  # timer noise swamping the slope: the average
    return max(int(budget / per_step), 1), per_step


def gan(train: np.ndarray, budget: float, probe: int, seed: int) -> tuple[np.ndarray, int, float]:
    def model() -> lk.models.GAN:
        torch.manual_seed(seed)
        generator = ConvGenerator(16, (1, 8, 8), channels=(64, 32), output_activation="tanh")
        return lk.models.GAN(generator, ConvDiscriminator((1, 8, 8), channels=(32, 64)))

    data = 2 * train.reshape(-1, 1, 8, 8) - 1

    def fit(steps: int) -> lk.models.GAN:
        network = model()
        lk.fit(network, data, engine="adversarial", steps=steps, num_samples=1, seed=seed, progress=False)
        return network

    steps, _ = cpu_steps(fit, budget, probe)
    start = time.process_time()
    network = fit(steps)
    used = time.process_time() - start
    samples = (network.sample(NUM_SAMPLES, seed=seed + 1).reshape(NUM_SAMPLES, 64).numpy() + 1) / 2
    return samples, steps, used


def vae(train: np.ndarray, budget: float, probe: int, seed: int) -> tuple[np.ndarray, int, float]:
    def fit(steps: int) -> lk.models.VAE:
        torch.manual_seed(seed)
        model = lk.models.VAE(input_dim=64, latent_dim=8)
        lk.fit(model, train, engine="svi", steps=steps, batch_size=128, learning_rate=1e-3, num_samples=1,
               seed=seed, progress=False)
        return model

    steps, _ = cpu_steps(fit, budget, probe)
    start = time.process_time()
    model = fit(steps)
    used = time.process_time() - start
    return model.sample(NUM_SAMPLES, mean=True, seed=seed + 1).numpy(), steps, used


def diffusion(train: np.ndarray, budget: float, probe: int, seed: int) -> tuple[np.ndarray, int, float]:
    """The U-Net diffusion model of benchmarks/diffusion.py (T = 200, simple weighting) on data in [-1, 1]."""
    data = 2 * train.reshape(-1, 1, 8, 8) - 1

    def fit(steps: int) -> lk.models.Diffusion:
        torch.manual_seed(seed)
        model = lk.models.Diffusion((1, 8, 8), network=lk.nn.ScoreUNet((1, 8, 8), channels=(16, 32)),
                                    timesteps=200, weighting="simple")
        lk.fit(model, data, engine="svi", steps=steps, batch_size=128, learning_rate=2e-3, num_samples=1,
               seed=seed, progress=False)
        return model

    steps, _ = cpu_steps(fit, budget, probe)
    start = time.process_time()
    model = fit(steps)
    used = time.process_time() - start
    samples = model.sample(NUM_SAMPLES, clip=True, seed=seed + 1).reshape(NUM_SAMPLES, 64).numpy()
    return (samples + 1) / 2, steps, used


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float32)
    X = (load_digits().data / 16.0).astype(np.float32)
    train_idx, test_idx = digits_split()
    train, test = X[train_idx], X[test_idx]
    budget = 3.0 if args.smoke else args.budget
    # calibration fits of PROBE and 2 PROBE steps: GAN steps take ~20 ms, VAE steps ~1.5 ms, diffusion ~20 ms
    gan_probe, vae_probe, diffusion_probe = (5, 20, 5) if args.smoke else (100, 1000, 100)
    rows = {}

    def score(name: str, samples: np.ndarray, steps: int | None, seconds: float | None) -> None:
        report = lk.diagnostics.sample_quality(samples, test, features="digits", seed=args.seed)
        pixels = lk.diagnostics.sample_quality(samples, test, num_permutations=1, seed=args.seed)
        rows[name] = {"steps": "" if steps is None else str(steps),
                      "CPU s": "" if seconds is None else f"{seconds:.0f}",
                      "FD": report.frechet_distance, "FD pixels": pixels.frechet_distance, "MMD²": report.mmd2,
                      "MMD p": report.mmd_p_value, "precision": report.precision, "recall": report.recall}
        print(f"{name}: done", flush=True)

    rng = np.random.default_rng(args.seed)
    score("floor: train vs test", train[rng.permutation(len(train))[:NUM_SAMPLES]], None, None)
    score("GAN (DCGAN, non-saturating)", *gan(train, budget, gan_probe, args.seed))
    score("VAE (MLP, Bernoulli, means)", *vae(train, budget, vae_probe, args.seed))
    score("diffusion (U-Net, T = 200, DDPM)", *diffusion(train, budget, diffusion_probe, args.seed))
    table = pd.DataFrame(rows).T
    with pd.option_context("display.float_format", "{:.4g}".format, "display.width", 160):
        print(f"\n{NUM_SAMPLES} samples per model vs the {len(test)} held-out test images; "
              f"{budget:g} CPU seconds of training per model\n")
        print(table.to_string())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=120.0, help="CPU seconds of training per model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run")
    main(parser.parse_args())
