"""MLP generator and discriminator: shapes, spectral normalisation, use as a GANPrior."""

import pytest
import torch
from torch.nn.utils import parametrize

import latentkit as lk
from latentkit.errors import ConfigError, DataError
from latentkit.nn import ConvDiscriminator, ConvGenerator, Discriminator, Generator


def test_shapes():
    generator = Generator(3, (1, 8, 8), hidden=(16, 16), output_activation="tanh")
    x = generator(torch.randn(4, 2, 3))
    assert x.shape == (4, 2, 1, 8, 8) and x.abs().max() <= 1
    assert Generator(3, 5, hidden=())(torch.randn(7, 3)).shape == (7, 5)  # one linear layer
    critic = Discriminator((1, 8, 8), hidden=(16,))
    assert critic(x).shape == (4, 2) and critic(x[0, 0]).shape == ()
    assert Discriminator(5)(torch.randn(7, 5)).shape == (7,)


def test_spectral_norm_bounds_each_layer():
    critic = Discriminator(10, hidden=(32, 32), spectral_norm=True)
    for layer in critic.net:
        if isinstance(layer, torch.nn.Linear):
            with torch.no_grad():  # scale the raw weights up: normalisation must undo it
                layer.parametrizations.weight.original.mul_(10.0)
    for _ in range(30):  # one power iteration per training-mode forward pass
        critic(torch.randn(8, 10))
    critic.eval()
    linear = [layer for layer in critic.net if isinstance(layer, torch.nn.Linear)]
    with torch.no_grad():
        sigmas = [float(torch.linalg.matrix_norm(layer.weight, ord=2)) for layer in linear]
    assert len(sigmas) == 3 and all(abs(s - 1.0) < 1e-2 for s in sigmas), sigmas
    assert all(parametrize.is_parametrized(layer) for layer in linear)
    assert not parametrize.is_parametrized(Discriminator(10).net[0])  # off by default


def test_generator_as_gan_prior():
    generator = Generator(2, 6, hidden=(8,), spectral_norm=True)
    prior = lk.models.GANPrior(generator, noise_scale=0.3)
    assert prior.latent_dim == 2 and prior.output_shape == (6,) and not list(prior.parameters())
    assert prior.generate(torch.zeros(3, 4, 2)).shape == (3, 4, 6)


def test_bad_arguments():
    with pytest.raises(ConfigError, match="latent_dim"):
        Generator(0, 5)
    with pytest.raises(ConfigError, match="output_shape"):
        Generator(2, (1, 0))
    with pytest.raises(ConfigError, match="hidden"):
        Discriminator(5, hidden=(8, -1))
    with pytest.raises(DataError, match=r"z: expected shape \(\.\.\., 2\)"):
        Generator(2, 5)(torch.zeros(4, 3))
    with pytest.raises(DataError, match="x: expected shape"):
        Discriminator((1, 8, 8))(torch.zeros(4, 64))


def test_convolutional_players():
    generator = ConvGenerator(5, (1, 8, 8), channels=(16, 8), output_activation="tanh")
    x = generator(torch.randn(3, 4, 5))
    assert x.shape == (3, 4, 1, 8, 8) and x.abs().max() <= 1 and generator.latent_dim == 5
    assert ConvGenerator(2, (3, 16, 8), channels=(4, 4, 4))(torch.randn(2, 2)).shape == (2, 3, 16, 8)
    critic = ConvDiscriminator((1, 8, 8), channels=(8, 16), spectral_norm=True)
    assert critic(x).shape == (3, 4) and critic(x[0, 0]).shape == ()
    layers = [m for m in critic.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert len(layers) == 3 and all(parametrize.is_parametrized(m) for m in layers)
    transposed = [m for m in ConvGenerator(2, (1, 8, 8), spectral_norm=True).modules()
                  if isinstance(m, torch.nn.ConvTranspose2d)]
    assert len(transposed) == 2 and all(parametrize.is_parametrized(m) for m in transposed)
    gan = lk.models.GAN(generator, critic)
    assert gan.data_shape == (1, 8, 8) and gan.sample(6, seed=0).shape == (6, 1, 8, 8)
    with pytest.raises(ConfigError, match=r"divisible by 2\*\*len\(channels\) = 8"):
        ConvGenerator(2, (1, 12, 12), channels=(4, 4, 4))
    with pytest.raises(DataError, match=r"x: expected shape \(\.\.\., \*\(1, 8, 8\)\)"):
        critic(torch.zeros(2, 64))
    with pytest.raises(DataError, match="z: expected shape"):
        generator(torch.zeros(2, 4))
