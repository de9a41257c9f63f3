"""PixelCNN: masked convolutions are autoregressive over pixel order; log_prob normalises; sampling
matches it; conditioning reaches every pixel."""

import itertools

import pytest
import torch

from latentkit.errors import ConfigError
from latentkit.nn import MaskedConv2d, PixelCNN


@pytest.mark.parametrize(("likelihood", "context_dim", "num_layers"), [
    ("bernoulli", 0, 2), ("gaussian", 3, 1), ("bernoulli", 2, 0)])
def test_outputs_depend_only_on_earlier_pixels(likelihood, context_dim, num_layers):
    C, H, W = 2, 4, 5
    # tanh: no unit is switched off at the test point, so the dependencies that exist show
    net = PixelCNN((C, H, W), channels=6, num_layers=num_layers, context_dim=context_dim, likelihood=likelihood,
                   activation="tanh")
    context = torch.randn(context_dim) if context_dim else None
    x = torch.randn(C, H, W)
    base = net(x, context)
    for c, i, j in itertools.product(range(C), range(H), range(W)):  # numerical Jacobian, one input at a time
        moved = x.clone()
        moved[c, i, j] += 0.5
        changed = (net(moved, context) - base).abs().reshape(-1, C, H, W).amax((0, 1)) > 1e-12  # (H, W)
        up_to = (torch.arange(H)[:, None] * W + torch.arange(W)) <= i * W + j
        assert not changed[up_to].any()  # outputs at or before pixel (i, j) ignore it: zero Jacobian
        if j + 1 < W:
            assert changed[i, j + 1]  # the next pixel in the row sees it
        if i + 1 < H:
            assert changed[i + 1, j]  # and so does the pixel below


def test_mask_types():
    a, b = MaskedConv2d(1, 1, 3, "A").mask[0, 0], MaskedConv2d(1, 1, 3, "B").mask[0, 0]
    assert a.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    assert b.tolist() == [[1, 1, 1], [1, 1, 0], [0, 0, 0]]


def test_log_prob_normalises_and_sampling_matches_it():
    net = PixelCNN((1, 2, 2), channels=8, num_layers=1)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(3.0)  # sharper conditionals than at initialisation
    states = torch.tensor(list(itertools.product([0.0, 1.0], repeat=4))).reshape(16, 1, 2, 2)
    probs = net.distribution(batch_shape=(16,)).log_prob(states).exp().detach()
    assert torch.allclose(probs.sum(), torch.tensor(1.0), atol=1e-12)
    n = 40000
    draws = net.distribution().sample((n,))
    assert draws.shape == (n, 1, 2, 2)
    codes = (draws.reshape(n, 4) * torch.tensor([8.0, 4.0, 2.0, 1.0])).sum(-1).long()
    freq = torch.bincount(codes, minlength=16).double() / n
    # binomial standard error of each frequency; 5 SE is a generous bound for 16 cells
    assert ((freq - probs).abs() <= 5 * (probs * (1 - probs) / n).sqrt() + 1e-3).all()


def test_context_reaches_every_pixel_and_batches_broadcast():
    net = PixelCNN((1, 3, 3), channels=4, num_layers=1, context_dim=2)
    x = torch.randn(1, 3, 3)
    assert ((net(x, torch.zeros(2)) - net(x, torch.ones(2))).abs() > 1e-12).all()
    assert net(torch.randn(5, 1, 3, 3), torch.randn(4, 1, 2)).shape == (4, 5, 1, 3, 3)
    d = net.distribution(torch.randn(6, 2))
    assert d.sample((2,)).shape == (2, 6, 1, 3, 3) and d.expand((3, 6)).batch_shape == (3, 6)


def test_bad_arguments():
    with pytest.raises(ConfigError, match="kernel_size"):
        MaskedConv2d(1, 1, 4, "A")
    with pytest.raises(ConfigError, match="input_shape"):
        PixelCNN((8, 8))
    with pytest.raises(ConfigError, match="context"):
        PixelCNN((1, 4, 4), context_dim=2).distribution()
