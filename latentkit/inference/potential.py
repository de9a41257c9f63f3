"""The potential energy of a target in unconstrained space, batched over chains."""

import math

import torch
from pyro.distributions.transforms import biject_to

from latentkit.inference.target import Target
from latentkit.inference.vectorize import BatchedModel

__all__ = ["Potential"]


class Potential:
    """U(z) = -log p(constrain(z), data) - log|det J| for z of shape (C, D).

    The latent continuous sites are laid out one after the other in unconstrained space
    (``biject_to(support)``, as Pyro's HMC does); enumerated sites are summed out inside
    :meth:`BatchedModel.log_density`.
    """

    def __init__(self, target: Target, batched: BatchedModel) -> None:
        self.target = target
        self.batched = batched
        self.layout = []
        for name, site in target.of_kind("latent").items():
            transform = biject_to(site.support)
            shape = tuple(transform.inverse_shape(torch.Size(site.shape)))
            self.layout.append((name, shape, transform, math.prod(shape)))
        self.dim = sum(size for *_, size in self.layout)

    def constrain(self, z: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Constrained values ``{site: (C, *site.shape)}`` and log|det J| of shape (C,)."""
        values, logdet, start = {}, torch.zeros(z.shape[0], dtype=z.dtype, device=z.device), 0
        for name, shape, transform, size in self.layout:
            u = z[:, start:start + size].reshape((z.shape[0],) + shape)
            x = transform(u)
            values[name] = x
            jac = transform.log_abs_det_jacobian(u, x)
            logdet = logdet + jac.reshape(z.shape[0], -1).sum(-1)
            start += size
        return values, logdet

    def unconstrain(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """Inverse of :meth:`constrain` for values of shape (C, *site.shape)."""
        parts = [transform.inv(values[name]).reshape(values[name].shape[0], -1)
                 for name, _, transform, _ in self.layout]
        return torch.cat(parts, dim=-1)

    def __call__(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Potential (C,) and its gradient (C, D); non-finite potentials become +inf."""
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            values, logdet = self.constrain(z)
            potential = -(self.batched.log_density(values) + logdet)
            finite = torch.isfinite(potential)
            (grad,) = torch.autograd.grad(torch.where(finite, potential, 0.0).sum(), z)
        potential = torch.where(finite, potential.detach(), math.inf)
        grad = torch.where(finite.unsqueeze(-1) & torch.isfinite(grad), grad, 0.0)
        return potential, grad
