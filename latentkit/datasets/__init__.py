"""Small real data sets shipped with latentkit, and synthetic generators."""

from latentkit.datasets.earthquakes import load_earthquakes
from latentkit.datasets.old_faithful import load_old_faithful
from latentkit.datasets.synthetic import make_gaussian_mixture, make_markov_chain

__all__ = ["load_earthquakes", "load_old_faithful", "make_gaussian_mixture", "make_markov_chain"]
