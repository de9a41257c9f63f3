"""MLP and convolutional encoder/decoder: shapes, batch dimensions, argument checks."""

import pytest
import torch

from latentkit.errors import ConfigError
from latentkit.nn import MLP, ConvDecoder, ConvEncoder


def test_mlp_shapes_and_activation():
    net = MLP([4, 8, 8, 3], activation="tanh", output_activation="softplus")
    out = net(torch.randn(2, 5, 4))
    assert out.shape == (2, 5, 3) and (out > 0).all()
    assert sum(isinstance(m, torch.nn.Tanh) for m in net) == 2
    assert len(MLP([4, 3])) == 1


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 16, 12)])
def test_conv_round_trip_shapes(shape):
    enc = ConvEncoder(shape, 10, channels=(4, 8))
    dec = ConvDecoder(5, shape, channels=(8, 4))
    x = torch.randn(7, 2, *shape)
    assert enc(x).shape == (7, 2, 10)
    assert dec(torch.randn(7, 2, 5)).shape == (7, 2) + shape


def test_bad_arguments():
    with pytest.raises(ConfigError, match="activation"):
        MLP([2, 2, 2], activation="swish-ish")
    with pytest.raises(ConfigError, match="sizes"):
        MLP([3])
    with pytest.raises(ConfigError, match="divisible"):
        ConvEncoder((1, 6, 6), 4, channels=(4, 4))
    with pytest.raises(ConfigError, match="output_shape"):
        ConvDecoder(2, (8, 8), channels=(4,))
