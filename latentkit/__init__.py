"""latentkit: latent-variable generative models on Pyro and PyTorch.

One call fits any model with any engine, and every engine returns the same
:class:`~latentkit.inference.Result`, convertible to ArviZ.
"""

import importlib.metadata
import warnings

with warnings.catch_warnings():
    # ArviZ 0.23 announces its coming refactor with a FutureWarning at import.
    warnings.simplefilter("ignore", FutureWarning)
    import arviz  # noqa: F401

from latentkit import datasets, diagnostics, inference, models, nn
from latentkit.inference import Result, fit
from latentkit.runs import load

__version__ = importlib.metadata.version("latentkit")

__all__ = ["Result", "datasets", "diagnostics", "fit", "inference", "load", "models", "nn", "__version__"]
