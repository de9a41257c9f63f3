"""The base class of built-in models."""

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from pyro.nn import PyroModule

__all__ = ["LatentModel"]


class LatentModel(PyroModule):
    """A Pyro model with its data handling, fitted by any engine through ``lk.fit``.

    Subclasses implement:

    * :meth:`prepare` — validate user data and return the keyword arguments of :meth:`model`
      (raising :class:`~latentkit.errors.DataError` on bad input);
    * :meth:`model` — the Pyro model, taking ``subsample_size`` for minibatch SVI;
    * :attr:`init_args` — the constructor arguments, JSON-serialisable, so that a run folder
      can rebuild the model without unpickling anything.

    They may override :meth:`dims`, :meth:`coords` (ArviZ names), :meth:`initial_values`
    (robust starting points for optimisers and samplers) and :meth:`relabel` (making labels of
    exchangeable components consistent across draws and chains).
    """

    init_args: dict[str, Any]

    def prepare(self, data: Any) -> dict[str, Any]:
        raise NotImplementedError  # abstract

    def model(self, **kwargs: Any) -> Any:
        raise NotImplementedError  # abstract

    def forward(self, **kwargs: Any) -> Any:
        return self.model(**kwargs)

    def dims(self, kwargs: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
        """Dimension names per site (after chain and draw)."""
        return {}

    def coords(self, data: Any) -> dict[str, list[Any]]:
        """Coordinate values per dimension name."""
        return {}

    def initial_values(self, kwargs: Mapping[str, Any], seed: int) -> dict[str, torch.Tensor]:
        """Starting values of latent sites; empty to let the engine choose."""
        return {}

    def recover_latents(
        self, kwargs: Mapping[str, Any], posterior: dict[str, np.ndarray], seed: int
    ) -> dict[str, np.ndarray]:
        """Draws ``(chain, draw, ...)`` of latent variables that the model marginalises inside a
        distribution (no sample site to enumerate, e.g. HMM states under ``DiscreteHMM``), given
        the posterior draws of everything else. Empty by default."""
        return {}

    def relabel(self, posterior: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Return the posterior with component labels made consistent; identity by default."""
        return posterior

    def config(self) -> dict[str, Any]:
        return {"name": type(self).__name__, "class": type(self).__name__,
                "args": dict(self.init_args)}
