"""Neural components: plain ``torch.nn.Module``s that also work outside latentkit.

Each documents its input and output shapes; the autoregressive networks (:class:`MADE`,
:class:`PixelCNN`) also define a Pyro distribution, :class:`AutoregressiveDistribution`.
"""

from latentkit.nn.autoregressive import AutoregressiveDistribution
from latentkit.nn.conv import ConvDecoder, ConvEncoder
from latentkit.nn.gan import ConvDiscriminator, ConvGenerator, Discriminator, Generator
from latentkit.nn.made import MADE, MaskedLinear
from latentkit.nn.mlp import MLP
from latentkit.nn.pixelcnn import MaskedConv2d, PixelCNN
from latentkit.nn.score import GaussianNoisePredictor, ScoreMLP, ScoreUNet, TimeEmbedding

__all__ = ["MLP", "ConvEncoder", "ConvDecoder", "MADE", "MaskedLinear", "PixelCNN", "MaskedConv2d",
           "AutoregressiveDistribution", "Generator", "Discriminator",
           "ConvGenerator", "ConvDiscriminator", "ScoreMLP", "ScoreUNet", "TimeEmbedding", "GaussianNoisePredictor"]
