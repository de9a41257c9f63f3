"""Inference engines behind ``lk.fit``: one protocol, a registry, one result type."""

from latentkit.inference.adversarial import AdversarialEngine, AdversarialOptions
from latentkit.inference.base import Engine, engine_names, fit, get_engine, register_engine
from latentkit.inference.diffusion_sampler import DiffusionSamplerEngine, DiffusionSamplerOptions, pixelwise_mean_std
from latentkit.inference.mcmc import MCMCEngine, MCMCOptions
from latentkit.inference.pyro_nuts import PyroNUTSEngine
from latentkit.inference.result import Result
from latentkit.inference.svi import SVIEngine, SVIOptions

__all__ = ["AdversarialEngine", "AdversarialOptions", "DiffusionSamplerEngine", "DiffusionSamplerOptions", "Engine",
           "MCMCEngine", "MCMCOptions", "PyroNUTSEngine", "Result", "SVIEngine", "SVIOptions", "engine_names", "fit",
           "get_engine", "pixelwise_mean_std", "register_engine"]
