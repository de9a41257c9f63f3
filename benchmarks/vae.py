"""VAE on digits: latentkit's SVI training against a plain PyTorch loop, and held-out NLL per variant.

One run on scikit-learn's digits, binarised (pixel > 8 of 16), 1,500 train / 297 test (fixed
permutation), float32, one thread, Adam (learning rate 1e-3), minibatches of 100:

(a) time per epoch of ``lk.fit(VAE, engine="svi", epochs=..., batch_size=100)`` against a hand-written
    PyTorch training loop over the same encoder/decoder modules (MLP 64-256-16 and 8-256-64,
    Bernoulli likelihood, reparameterised single-sample ELBO scaled to the full data). The
    latentkit time per epoch is the slope between two fits of different lengths, so the fixed
    cost of a fit (tracing the model, guide draws, the result) is left out; it is printed apart.
(b) held-out negative log-likelihood in nats per image (IWAE, K = 1,000 particles) after the
    same number of epochs for: the plain PyTorch VAE, the latentkit MLP VAE, the VAE with an IAF
    guide (2 flows) and the VAE with an autoregressive MADE decoder.

(c) semi-supervised: 100 labelled training images (10 per class), the other 1,400 unlabelled; test
    accuracy of ``lk.models.SemiSupervisedVAE`` (M2) against the same classifier network (MLP
    64-256-10) trained on the 100 labelled images alone, and against scikit-learn's logistic regression
    on them.

Part (a) is timed ``--repeats`` times, alternating the two loops, and the fastest of each is kept:
other processes on the machine only ever slow a loop down.

    python benchmarks/vae.py                # full size, all parts
    python benchmarks/vae.py --parts c      # only the semi-supervised comparison
    python benchmarks/vae.py --smoke        # seconds
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
    lk.fit(vae, train, engine="svi", epochs=epochs, batch_size=BATCH, learning_rate=LR, num_samples=1, seed=seed,
           progress=False)
    return time.perf_counter() - start


def time_per_epoch(train: np.ndarray, epochs: int, latent: int, seed: int, repeats: int) -> None:
    """(a): the fastest of ``repeats`` alternating timings of each loop."""
    plain, ours, fixed = [], [], []
    short = max(1, epochs // 4)
    for _ in range(repeats):
        plain.append(plain_pytorch(torch.as_tensor(train), epochs, latent, seed)[0])
        times = []
        for length in (short, epochs):
            torch.manual_seed(seed)
            times.append(latentkit_fit(lk.models.VAE(input_dim=64, latent_dim=latent, hidden=(256,)), train, length,
                                       seed))
        ours.append((times[1] - times[0]) / (epochs - short))
        fixed.append(times[1] - epochs * ours[-1])
    plain_epoch, lk_epoch = min(plain), min(ours)
    print(f"(a) time per epoch ({len(train) // BATCH} steps of {BATCH}), {epochs} epochs, fastest of {repeats}:")
    print(f"    plain PyTorch  {plain_epoch * 1e3:8.1f} ms")
    print(f"    latentkit SVI  {lk_epoch * 1e3:8.1f} ms   ratio {lk_epoch / plain_epoch:.2f}x   "
          f"(+ {min(fixed):.2f} s fixed per fit)")


def semi_supervised(X: np.ndarray, y: np.ndarray, order: np.ndarray, epochs: int, seed: int) -> None:
    """(c): M2 on 100 labels + 1,400 unlabelled images against classifiers of the 100 labels alone."""
    from sklearn.linear_model import LogisticRegression

    train, test = order[:1500], order[1500:]
    rng = np.random.default_rng(seed)
    known = np.concatenate([rng.choice(np.flatnonzero(y[train] == c), 10, replace=False) for c in range(10)])
    labels = np.full(len(train), -1)
    labels[known] = y[train][known]
    torch.manual_seed(seed)
    m2 = lk.models.SemiSupervisedVAE(input_dim=64, n_classes=10, latent_dim=8, hidden=(256,))
    start = time.perf_counter()
    lk.fit(m2, (X[train], labels), engine="svi", epochs=epochs, batch_size=BATCH, learning_rate=LR, num_samples=1,
           seed=seed, progress=False)
    seconds = time.perf_counter() - start
    m2_accuracy = float((m2.classify(X[test]).numpy() == y[test]).mean())
    # the same classifier network, on the 100 labelled images alone (full batch, as many Adam steps as M2 took)
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Flatten(), MLP([64, 256, 10]))
    optimizer = torch.optim.Adam(net.parameters(), lr=LR)
    x_known, y_known = torch.as_tensor(X[train][known]), torch.as_tensor(y[train][known])
    for _ in range(epochs * (len(train) // BATCH)):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(x_known), y_known).backward()
        optimizer.step()
    with torch.no_grad():
        net_accuracy = float((net(torch.as_tensor(X[test])).argmax(-1).numpy() == y[test]).mean())
    logistic = LogisticRegression(max_iter=5000).fit(X[train][known], y[train][known])
    logistic_accuracy = float(logistic.score(X[test], y[test]))
    print(f"(c) semi-supervised, 100 labelled (10 per class) + 1,400 unlabelled training images, "
          f"{len(test)} test images, {epochs} epochs:")
    print(f"    M2 SemiSupervisedVAE            test accuracy {m2_accuracy:.3f}   ({seconds:.1f} s)")
    print(f"    same MLP, 100 labels alone      test accuracy {net_accuracy:.3f}")
    print(f"    logistic regression, 100 labels test accuracy {logistic_accuracy:.3f}")


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float32)
    digits = load_digits()
    X = (digits.data > 8).astype(np.float32)
    order = np.random.default_rng(args.seed).permutation(len(X))
    train, test = X[order[:1500]], X[order[1500:]]
    epochs = 2 if args.smoke else 100
    particles = 50 if args.smoke else 1000
    latent = 8

    if "a" in args.parts:
        time_per_epoch(train, epochs, latent, args.seed, 1 if args.smoke else args.repeats)

    if "b" in args.parts:  # held-out NLL, same epochs
        variants = {}
        # The arguments are built after seeding, so that the MADE's initial weights are reproducible.
        for name, kwargs in [("plain PyTorch VAE", None), ("latentkit MLP VAE", dict),
                             ("VAE + IAF guide (2 flows)", lambda: {"guide": "iaf", "flow_depth": 2}),
                             ("VAE + MADE decoder", lambda: {"decoder": MADE(64, hidden=(256,), context_dim=latent)})]:
            if kwargs is None:
                variants[name] = plain_pytorch(torch.as_tensor(train), epochs, latent, args.seed)[1]
                continue
            torch.manual_seed(args.seed)
            model = lk.models.VAE(input_dim=64, latent_dim=latent, hidden=(256,), **kwargs())
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

    if "c" in args.parts:
        semi_supervised(X, digits.target, order, epochs, args.seed)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run")
    parser.add_argument("--parts", default="abc", help="which parts to run, e.g. 'a' or 'bc'")
    parser.add_argument("--repeats", type=int, default=3, help="timings of part (a) (the fastest is kept)")
    main(parser.parse_args())
