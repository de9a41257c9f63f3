"""Train the digits classifier behind ``sample_quality(..., features="digits")`` and write its weights.

Deterministic: one thread, float32, seed 0, full-batch order drawn from a seeded generator; on CPU the
same torch version writes the same file. Trains on the training part of
``latentkit.diagnostics.features.digits_split()`` (1,347 images) for 60 epochs of Adam (learning rate
2e-3, minibatches of 64, weight decay 1e-4), and prints the accuracy on the 450 held-out images.

    python -m scripts.train_digits_classifier   # writes latentkit/diagnostics/data/digits_classifier.safetensors
    python -m scripts.train_digits_classifier --out FILE
"""

import argparse
import hashlib
from pathlib import Path

import torch
from safetensors.torch import save_file
from sklearn.datasets import load_digits

from latentkit.diagnostics.features import WEIGHTS, DigitsClassifier, digits_split

EPOCHS, BATCH, LEARNING_RATE, WEIGHT_DECAY = 60, 64, 2e-3, 1e-4
#: Asserted by tests/diagnostics/test_quality.py on the held-out images (the shipped weights reach 0.982).
MIN_ACCURACY = 0.97


def train(seed: int = 0) -> tuple[DigitsClassifier, float]:
    """The trained network and its accuracy on the held-out images."""
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    digits = load_digits()
    X = torch.as_tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.as_tensor(digits.target)
    train_idx, test_idx = digits_split()
    X_train, y_train = X[train_idx], y[train_idx]
    net = DigitsClassifier().float()
    optimizer = torch.optim.Adam(net.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(EPOCHS):
        order = torch.randperm(len(X_train), generator=generator)
        for start in range(0, len(order), BATCH):
            batch = order[start:start + BATCH]
            loss = torch.nn.functional.cross_entropy(net(X_train[batch]), y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    net.eval()
    with torch.no_grad():
        accuracy = float((net(X[test_idx]).argmax(1) == y[test_idx]).double().mean())
    return net, accuracy


def main(args: argparse.Namespace) -> None:
    net, accuracy = train(args.seed)
    out = Path(args.out)
    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(out))
    size = out.stat().st_size
    print(f"test accuracy {accuracy:.4f} on {len(digits_split()[1])} held-out images; wrote {out} ({size} bytes)")
    print("sha256 of the weights:", hashlib.sha256(out.read_bytes()).hexdigest())
    if accuracy < MIN_ACCURACY:
        raise SystemExit(f"test accuracy {accuracy:.4f} is below {MIN_ACCURACY}, the threshold the tests assert")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent.parent / "latentkit" / "diagnostics" / WEIGHTS))
    parser.add_argument("--seed", type=int, default=0)
    main(parser.parse_args())
