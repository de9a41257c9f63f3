"""Built-in models: Pyro model/guide pairs with data handling."""

from latentkit.models.base import LatentModel
from latentkit.models.diffusion import Diffusion, DiffusionPrior
from latentkit.models.gan import GAN
from latentkit.models.gan_prior import GANPrior
from latentkit.models.gaussian_mixture import GaussianMixture
from latentkit.models.hmm import CategoricalHMM, GaussianHMM, PoissonHMM
from latentkit.models.inverse_problem import InverseProblem
from latentkit.models.semi_supervised_vae import SemiSupervisedVAE
from latentkit.models.vae import VAE, ConditionalVAE

__all__ = ["LatentModel", "GaussianMixture", "GaussianHMM", "CategoricalHMM", "PoissonHMM", "VAE", "ConditionalVAE",
           "SemiSupervisedVAE", "GAN", "GANPrior", "Diffusion", "DiffusionPrior", "InverseProblem", "MODELS"]

#: Built-in model classes by name, used to rebuild models from a run folder's config.json.
MODELS: dict[str, type[LatentModel]] = {
    "GaussianMixture": GaussianMixture,
    "GaussianHMM": GaussianHMM,
    "CategoricalHMM": CategoricalHMM,
    "PoissonHMM": PoissonHMM,
    "VAE": VAE,
    "ConditionalVAE": ConditionalVAE,
    "SemiSupervisedVAE": SemiSupervisedVAE,
    "GANPrior": GANPrior,
    "Diffusion": Diffusion,
}
