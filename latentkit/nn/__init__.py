"""Neural components: plain ``torch.nn.Module``s that also work outside latentkit.

Each documents its input and output shapes; :class:`MADE` also defines a Pyro distribution.
"""

from latentkit.nn.conv import ConvDecoder, ConvEncoder
from latentkit.nn.made import MADE, MADEDistribution, MaskedLinear
from latentkit.nn.mlp import MLP

__all__ = ["MLP", "ConvEncoder", "ConvDecoder", "MADE", "MADEDistribution", "MaskedLinear"]
