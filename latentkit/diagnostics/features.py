"""Feature spaces for sample quality: a small classifier trained on scikit-learn's digits.

:func:`digits_features` is the network behind ``sample_quality(..., features="digits")``: its
penultimate layer (64 ReLU units) gives the feature space in which the Fréchet distance of digit
images is computed, as Inception features give the FID of natural images (Heusel et al. 2017). The
weights ship with the package (``diagnostics/data/digits_classifier.safetensors``, float32, ~150 KB)
and are trained by ``scripts/train_digits_classifier.py`` on the training part of
:func:`digits_split`; the held-out part is the reference test set.
"""

import functools
from importlib import resources

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from latentkit.errors import DataError

__all__ = ["DigitsClassifier", "digits_classifier", "digits_features", "digits_split", "WEIGHTS", "NUM_TEST"]

#: The shipped weights, inside the package.
WEIGHTS = "data/digits_classifier.safetensors"
#: Images of scikit-learn's 1,797 digits held out from the classifier's training.
NUM_TEST = 450


def digits_split(n: int = 1797, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the training and test parts of scikit-learn's digits: a permutation drawn by
    ``numpy.random.default_rng(seed)``, the last :data:`NUM_TEST` held out (the file is ordered by writer,
    so a permutation is needed).

    Shapes:
        returns ``(n - NUM_TEST,)`` and ``(NUM_TEST,)`` integer arrays.

    Example:
        >>> train, test = digits_split()
        >>> len(train), len(test), len(set(train) | set(test))
        (1347, 450, 1797)
    """
    order = np.random.default_rng(seed).permutation(n)
    return order[:n - NUM_TEST], order[n - NUM_TEST:]


class DigitsClassifier(nn.Module):
    """A small convolutional classifier of 8 × 8 digit images with values in [0, 1] (scikit-learn's
    ``load_digits().data / 16``): two 3 × 3 convolutions (16 channels, then 32 with stride 2), a
    64-unit ReLU layer (the features) and 10 logits.

    Shapes:
        input ``(N, 64)``, ``(N, 8, 8)`` or ``(N, 1, 8, 8)``; :meth:`forward` → logits ``(N, 10)``;
        :meth:`features` → ``(N, 64)``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(),
        )
        self.head = nn.Linear(64, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x[0].numel() != 64:
            raise DataError(f"x: the digits classifier takes 8 x 8 images, (N, 64) or (N, 1, 8, 8); got "
                            f"{tuple(x.shape)}.")
        weight = self.head.weight
        return self.body(x.reshape(-1, 1, 8, 8).to(weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@functools.cache
def _shipped() -> DigitsClassifier:
    net = DigitsClassifier()
    with resources.as_file(resources.files("latentkit.diagnostics") / WEIGHTS) as path:
        net.load_state_dict(load_file(str(path)))
    return net.float().eval().requires_grad_(False)


def digits_classifier() -> DigitsClassifier:
    """The trained classifier (float32, evaluation mode, frozen), loaded once per process."""
    return _shipped()


def digits_features(x: torch.Tensor) -> torch.Tensor:
    """Penultimate-layer features of the shipped digits classifier, float64.

    Shapes:
        ``(N, 64)`` or ``(N, 1, 8, 8)`` images with values in [0, 1] → ``(N, 64)``.
    """
    with torch.no_grad():
        return digits_classifier().features(x).double()
