"""VAE on digits: latentkit's SVI training against a plain PyTorch loop, and held-out NLL per variant.

One run on scikit-learn's digits, binarised (pixel > 8 of 16), 1,500 train / 297 test (fixed
permutation), float32, one thread, Adam (learning rate 1e-3), minibatches of 100:

(a) time per epoch of ``lk.fit(VAE, engine="svi", batch_size=100)`` against a hand-written
    PyTorch training loop over the same encoder/decoder modules (MLP 64-256-16 and 8-256-64,
    Bernoulli likelihood, reparameterised single-sample ELBO scaled to the full data). The
    latentkit time per epoch is the slope between two fits of different lengths, so the fixed
    cost of a fit (tracing the model, guide draws, the result) is left out; it is printed apart.
(b) held-out negative log-likelihood in nats per image (IWAE, K = 1,000 particles) after the
    same number of epochs for: the plain PyTorch VAE, the latentkit MLP VAE, the VAE with an IAF
    guide (2 flows) and the VAE with an autoregressive MADE decoder.

    python benchmarks/vae.py            # full size
    python benchmarks/vae.py --smoke    # seconds
"""

import argparse
import time

import numpy as np
import torch
from sklearn.datasets import load_digits

import latentkit as lk
from latentkit.nn import MADE, MLP

BATCH = 100
LR = 1e-3


def modules(latent: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The VAE's default encoder and decoder for 64 inputs and one hidden layer of 256."""
    encoder = torch.nn.Sequential(torch.nn.Flatten(), MLP([64, 256, 2 * latent]))
    decoder = torch.nn.Sequential(MLP([latent, 256, 64]), torch.nn.Unflatten(1, (64,)))
    return encoder, decoder


def plain_pytorch(train: torch.Tensor, epochs: int, latent: int, seed: int) -> tuple[float, lk.models.VAE]:
    """Train with a hand-written loop; returns seconds per epoch and the modules wrapped in a VAE
    (for the same IWAE evaluation)."""
    torch.manual_seed(seed)
    encoder, decoder = modules(latent)
    optimizer = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=LR)
    N = len(train)
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(N)
        for i in range(N // BATCH):
            x = train[order[i * BATCH:(i + 1) * BATCH]]
            loc, log_scale = encoder(x).chunk(2, -1)
            z = loc + log_scale.exp() * torch.randn_like(loc)
            log_lik = -torch.nn.functional.binary_cross_entropy_with_logits(decoder(z), x, reduction="sum")
            kl = (0.5 * (loc ** 2 + (2 * log_scale).exp() - 1) - log_scale).sum()
            loss = -(log_lik - kl) * (N / BATCH)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    per_epoch = (time.perf_counter() - start) / epochs
    return per_epoch, lk.models.VAE(input_dim=64, latent_dim=latent, encoder=encoder, decoder=decoder)


def latentkit_fit(vae: lk.models.VAE, train: np.ndarray, epochs: int, seed: int) -> float:
    start = time.perf_counter()
    lk.fit(vae, train, engine="svi", steps=epochs * (len(train) // BATCH), batch_size=BATCH, learning_rate=LR,
           num_samples=1, seed=seed, progress=False)
    return time.perf_counter() - start


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float32)
    X = (load_digits().data > 8).astype(np.float32)
    order = np.random.default_rng(args.seed).permutation(len(X))
    train, test = X[order[:1500]], X[order[1500:]]
    epochs = 2 if args.smoke else 100
    particles = 50 if args.smoke else 1000
    latent = 8

    # (a) time per epoch
    plain_epoch, plain_vae = plain_pytorch(torch.as_tensor(train), epochs, latent, args.seed)
    short = max(1, epochs // 4)
    torch.manual_seed(args.seed)
    t_short = latentkit_fit(lk.models.VAE(input_dim=64, latent_dim=latent, hidden=(256,)), train, short, args.seed)
    torch.manual_seed(args.seed)
    vae = lk.models.VAE(input_dim=64, latent_dim=latent, hidden=(256,))
    t_long = latentkit_fit(vae, train, epochs, args.seed)
    lk_epoch = (t_long - t_short) / (epochs - short)
    print(f"(a) time per epoch ({len(train) // BATCH} steps of {BATCH}), {epochs} epochs:")
    print(f"    plain PyTorch  {plain_epoch * 1e3:8.1f} ms")
    print(f"    latentkit SVI  {lk_epoch * 1e3:8.1f} ms   ratio {lk_epoch / plain_epoch:.2f}x   "
          f"(+ {t_long - epochs * lk_epoch:.2f} s fixed per fit)")

    # (b) held-out NLL, same epochs
    variants = {"plain PyTorch VAE": plain_vae, "latentkit MLP VAE": vae}
    for name, kwargs in [("VAE + IAF guide (2 flows)", {"guide": "iaf", "flow_depth": 2}),
                         ("VAE + MADE decoder", {"decoder": MADE(64, hidden=(256,), context_dim=latent)})]:
        torch.manual_seed(args.seed)
        model = lk.models.VAE(input_dim=64, latent_dim=latent, hidden=(256,), **kwargs)
        seconds = latentkit_fit(model, train, epochs, args.seed)
        print(f"    trained {name} in {seconds:.1f} s")
        variants[name] = model
    print(f"(b) held-out NLL, nats per image (IWAE, K={particles}), after {epochs} epochs:")
    scores = {}
    for name, model in variants.items():
        scores[name] = -float(model.log_likelihood(test, num_particles=particles, seed=0).mean())
        print(f"    {name:28s} {scores[name]:8.2f}")
    best = min(scores, key=scores.get)
    runner_up = sorted(scores.values())[1]
    print(f"    best: {best}, by {runner_up - scores[best]:.2f} nats over the next")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run")
    main(parser.parse_args())
