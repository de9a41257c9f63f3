"""The adversarial engine: trains a :class:`~latentkit.models.GAN` by alternating discriminator and
generator updates, with checkpoints, resumption and graceful stops as the SVI engine has."""

import dataclasses
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from latentkit.checkpoint import compare_fingerprints, fork_host_rng, load_checkpoint, save_checkpoint
from latentkit.distributed import Minibatches
from latentkit.errors import ConfigError, InferenceError
from latentkit.inference.base import parse_options, register_engine, seeded, versions
from latentkit.inference.result import Result

# The SVI engine's checkpoint state, stop-signal polling, data digest and option serialisation serve
# this engine unchanged: one optimiser (here with a parameter group per player) and its loss history.
from latentkit.inference.run_state import TrainingState, digest, jsonable, stop_signal
from latentkit.interrupt import stopped
from latentkit.models.gan import GAN, averaged_generator

__all__ = ["AdversarialOptions", "AdversarialEngine", "LOSSES"]

LOSSES = ("non-saturating", "wgan-gp", "hinge")

#: Loss-dependent defaults of the options left at None, measured on the ring of 8 Gaussians
#: (tests/inference/test_adversarial.py: MLP players, batch 256, 500 to 1,000 generator steps).
#: non-saturating and hinge: Adam(β1 = 0.5, β2 = 0.999) as in DCGAN (Radford et al. 2016) but with a
#: learning rate of 1e-3 for both players (2e-4, DCGAN's, left every mode uncovered after 2,000 steps),
#: one discriminator step per generator step. wgan-gp: five critic steps, Adam(β1 = 0, β2 = 0.9) as in
#: Gulrajani et al. 2017, with two time scales (Heusel et al. 2017): 3e-3 for the critic, 1e-3 for the
#: generator (1e-4 for both, the paper's, stays near the origin for thousands of steps).
DEFAULTS: dict[str, dict[str, Any]] = {
    "non-saturating": {"discriminator_steps": 1, "generator_learning_rate": 1e-3,
                       "discriminator_learning_rate": 1e-3, "adam_beta1": 0.5, "adam_beta2": 0.999},
    "hinge": {"discriminator_steps": 1, "generator_learning_rate": 1e-3,
              "discriminator_learning_rate": 1e-3, "adam_beta1": 0.5, "adam_beta2": 0.999},
    "wgan-gp": {"discriminator_steps": 5, "generator_learning_rate": 1e-3,
                "discriminator_learning_rate": 3e-3, "adam_beta1": 0.0, "adam_beta2": 0.9},
}


@dataclass(frozen=True)
class AdversarialOptions:
    """Options of the ``"adversarial"`` engine (command-line flags are the kebab-case names).

    Options left at None take the loss's default from :data:`DEFAULTS`; the result's ``config``
    records the values used.
    """

    steps: int = field(default=2000, metadata={"min": 1, "help": "generator updates"})
    loss: str = field(default="non-saturating", metadata={
        "choices": LOSSES,
        "help": "non-saturating (Goodfellow et al. 2014: D minimises softplus(-D(x)) + softplus(D(G(z))), "
                "G minimises softplus(-D(G(z)))), wgan-gp (Gulrajani et al. 2017: critic D(G(z)) - D(x) "
                "plus a gradient penalty, G minimises -D(G(z))) or hinge (Miyato et al. 2018: "
                "relu(1 - D(x)) + relu(1 + D(G(z))), G minimises -D(G(z)))"})
    batch_size: int = field(default=256, metadata={
        "min": 1, "help": "real and generated points per update (capped at the data size); real minibatches "
                          "are reshuffled each epoch"})
    discriminator_steps: int | None = field(default=None, metadata={
        "min": 1, "help": "discriminator updates per generator update (default: 5 for wgan-gp, else 1)"})
    generator_learning_rate: float | None = field(default=None, metadata={
        "min": 0.0, "help": "Adam step size of the generator"})
    discriminator_learning_rate: float | None = field(default=None, metadata={
        "min": 0.0, "help": "Adam step size of the discriminator (two time scales: may differ from the "
                            "generator's, Heusel et al. 2017)"})
    adam_beta1: float | None = field(default=None, metadata={"min": 0.0, "help": "Adam's β1, both players"})
    adam_beta2: float | None = field(default=None, metadata={"min": 0.0, "help": "Adam's β2, both players"})
    gradient_penalty: float = field(default=10.0, metadata={
        "min": 0.0, "help": "wgan-gp: weight λ of (||∇D(x̂)|| - 1)² (Gulrajani et al. 2017)"})
    ema_decay: float = field(default=0.999, metadata={
        "min": 0.0, "help": "decay of the moving average of the generator's weights, warmed up as "
                            "min(ema_decay, (1 + t) / (10 + t)) at update t; 0: no averaging"})
    num_samples: int = field(default=1000, metadata={"min": 1, "help": "points generated into the result"})
    device: str | None = field(default=None, metadata={"help": "torch device, e.g. cuda"})
    checkpoint_every: int = field(default=500, metadata={
        "min": 1, "help": "with a run folder: write a checkpoint every this many steps"})
    checkpoint_seconds: float = field(default=300.0, metadata={
        "min": 0.0, "help": "with a run folder: and at least this often (seconds)"})


#: Options that may change when a run is resumed.
RESUMABLE = ("steps", "num_samples", "checkpoint_every", "checkpoint_seconds")


def _scores(discriminator: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return discriminator(x).reshape(x.shape[0])


def _gradient_penalty(discriminator: torch.nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """E (||∇D(x̂)||₂ - 1)² at x̂ uniformly between paired real and generated points (Gulrajani et al. 2017)."""
    mix = torch.rand((real.shape[0],) + (1,) * (real.dim() - 1), dtype=real.dtype, device=real.device)
    between = (mix * real + (1 - mix) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(_scores(discriminator, between).sum(), between, create_graph=True)
    return ((grad.reshape(grad.shape[0], -1).norm(dim=1) - 1) ** 2).mean()


def discriminator_loss(loss: str, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """The discriminator's loss from its scores (logits) of real and generated points, ``(B,)`` each;
    the wgan-gp penalty is added by the engine."""
    if loss == "non-saturating":
        return torch.nn.functional.softplus(-real).mean() + torch.nn.functional.softplus(fake).mean()
    if loss == "hinge":
        return torch.relu(1 - real).mean() + torch.relu(1 + fake).mean()
    return fake.mean() - real.mean()


def generator_loss(loss: str, fake: torch.Tensor) -> torch.Tensor:
    """The generator's loss from the discriminator's scores of generated points, ``(B,)``."""
    if loss == "non-saturating":
        return torch.nn.functional.softplus(-fake).mean()
    return -fake.mean()


def _discriminator_step(opts: AdversarialOptions, optimizer: torch.optim.Optimizer, model: GAN, real: torch.Tensor,
                        z: torch.Tensor) -> float:
    """One discriminator update on ``real`` points and G(z); returns its loss (wgan-gp: with the penalty)."""
    discriminator = model.discriminator
    with torch.no_grad():
        fake = model.generator(z)
    optimizer.zero_grad(set_to_none=True)
    scores = _scores(discriminator, torch.cat([real, fake]))  # one pass for both
    loss = discriminator_loss(opts.loss, scores[:len(real)], scores[len(real):])
    if opts.loss == "wgan-gp":
        loss = loss + opts.gradient_penalty * _gradient_penalty(discriminator, real, fake)
    loss.backward()
    optimizer.step()  # the generator has no gradients: only the discriminator moves
    return float(loss.detach())


def _generator_step(opts: AdversarialOptions, optimizer: torch.optim.Optimizer, model: GAN, z: torch.Tensor) -> float:
    """The generator's gradient at G(z) (the discriminator frozen meanwhile); returns its loss. The caller
    steps the optimiser after checking the losses."""
    optimizer.zero_grad(set_to_none=True)
    model.discriminator.requires_grad_(False)
    try:
        loss = generator_loss(opts.loss, _scores(model.discriminator, model.generator(z)))
        loss.backward()
    finally:
        model.discriminator.requires_grad_(True)
    return float(loss.detach())


class AdversarialEngine:
    """Trains a :class:`~latentkit.models.GAN`: ``discriminator_steps`` discriminator updates, then one
    generator update, ``steps`` times, with one Adam optimiser holding a parameter group per player
    (their own learning rates), and a moving average of the generator's weights.

    The result has one chain of ``num_samples`` draws: ``posterior["z"]`` (latent draws) and
    ``posterior_predictive["x"]`` (the averaged generator's points), ``losses`` the discriminator's loss
    per step (``metrics.csv``; wgan-gp: with the gradient penalty), ``params`` every network weight
    (``generator.*``, ``discriminator.*``, ``ema_generator.*``; :meth:`GAN.load_params
    <latentkit.models.GAN.load_params>` puts them back) and both players' loss per step
    (``losses.discriminator``, ``losses.generator``). A GAN has no likelihood: no ``log_likelihood``.

    Shapes:
        ``posterior["z"]`` ``(1, num_samples, latent_dim)``; ``posterior_predictive["x"]``
        ``(1, num_samples, *data_shape)``; ``losses`` ``(steps,)``.
    """

    name = "adversarial"

    def __init__(self, **options: Any) -> None:
        parsed = parse_options(AdversarialOptions, options, self.name)
        defaults = {k: v for k, v in DEFAULTS[parsed.loss].items() if getattr(parsed, k) is None}
        self.options = dataclasses.replace(parsed, **defaults)
        for name in ("adam_beta1", "adam_beta2"):
            if not getattr(self.options, name) < 1:
                raise ConfigError(f"{name}: must be in [0, 1), got {getattr(self.options, name)!r}.")
        if not self.options.ema_decay < 1:
            raise ConfigError(f"ema_decay: must be in [0, 1), got {self.options.ema_decay!r}; 0 turns averaging off.")

    def fit(self, model: Any, data: Any, *, seed: int = 0, progress: bool = True,
            run_dir: str | Path | None = None, resume: bool = False,
            should_stop: Callable[[int], bool] | None = None) -> Result:
        """Train ``model``'s networks in place; with ``run_dir``, checkpoint there (and continue from it if
        ``resume``). ``should_stop`` as in :meth:`SVIEngine.fit <latentkit.inference.SVIEngine.fit>`."""
        opts = self.options
        if not isinstance(model, GAN):
            raise ConfigError(f"model: the adversarial engine fits lk.models.GAN(generator, discriminator), got "
                              f"{type(model).__name__}.")
        folder = Path(run_dir) if run_dir is not None else None
        if resume and folder is None:
            raise ConfigError("resume: needs the run folder (run_dir) of the interrupted fit.")
        device = opts.device
        cuda = [torch.device(device).index or 0] if device and torch.device(device).type == "cuda" else []
        with seeded(seed, device), fork_host_rng():
            X = model.prepare(data)["X"]
            if device is not None:
                model.to(device)
                X = X.to(device)
            model.ema_generator = averaged_generator(model.generator, opts.ema_decay)
            model.train()
            optimizer = torch.optim.Adam(
                [{"params": list(model.generator.parameters()), "lr": opts.generator_learning_rate},
                 {"params": list(model.discriminator.parameters()), "lr": opts.discriminator_learning_rate}],
                betas=(opts.adam_beta1, opts.adam_beta2))
            named = {f"{name}.{key}": p for name in ("generator", "discriminator", "ema_generator")
                     for key, p in getattr(model, name).named_parameters()}
            losses = np.zeros((opts.steps, 2))
            state = TrainingState(named, model, optimizer, losses, cuda)
            fingerprint = {
                "model": model.config(),
                "engine": self.name,
                "options": {k: v for k, v in jsonable(opts).items() if k not in RESUMABLE},
                "seed": seed,
                "data": digest({"X": X}),
                "parameters": {name: list(p.shape) for name, p in named.items()},
            }
            start = 0
            if resume:
                assert folder is not None
                checkpoint = load_checkpoint(folder)
                compare_fingerprints(checkpoint.fingerprint, fingerprint, folder)
                if checkpoint.step > opts.steps:
                    raise ConfigError(f"steps: the checkpoint in {str(folder)!r} is at step {checkpoint.step}, "
                                      f"beyond steps={opts.steps}; pass steps >= {checkpoint.step}.")
                state.restore(checkpoint)
                start = checkpoint.step
            batch = min(opts.batch_size, X.shape[0])
            batches = Minibatches(X.shape[0], batch, seed=seed)

            def latent() -> torch.Tensor:
                return torch.randn(batch, model.latent_dim, dtype=X.dtype, device=X.device)

            last_write = time.monotonic()
            bar = tqdm(range(start, opts.steps), initial=start, total=opts.steps, desc="adversarial", unit="step",
                       disable=None if progress else True)
            for step in bar:
                d_value = sum(_discriminator_step(opts, optimizer, model, X[batches.indices(
                    step * opts.discriminator_steps + k)], latent()) for k in range(opts.discriminator_steps))
                d_value /= opts.discriminator_steps
                g_value = _generator_step(opts, optimizer, model, latent())
                if not (math.isfinite(d_value) and math.isfinite(g_value)):
                    raise InferenceError(
                        f"loss: became {d_value} (discriminator) / {g_value} (generator) at step {step}; lower "
                        f"generator_learning_rate ({opts.generator_learning_rate}) and discriminator_learning_rate "
                        f"({opts.discriminator_learning_rate}) or scale the data to about [-1, 1].")
                optimizer.step()
                model.ema_generator.update_parameters(model.generator)
                losses[step] = d_value, g_value
                done = step + 1
                if step % 25 == 0 or done == opts.steps:
                    bar.set_postfix(discriminator=f"{d_value:.4g}", generator=f"{g_value:.4g}")
                signum = stop_signal(should_stop, step)
                due = folder is not None and (done % opts.checkpoint_every == 0 or done == opts.steps
                                              or time.monotonic() - last_write >= opts.checkpoint_seconds)
                if folder is not None and (due or signum is not None):
                    save_checkpoint(folder, state.checkpoint(done, fingerprint))
                    last_write = time.monotonic()
                if signum is not None and done < opts.steps:
                    bar.close()
                    where = (f"checkpoint written to {str(folder)!r}; resume with lk.fit(..., resume={str(folder)!r})"
                             if folder is not None else "no run folder was given, so nothing was saved")
                    raise stopped(signum, f"{signal.Signals(signum).name}: stopped the adversarial fit after step "
                                  f"{done} of {opts.steps}; {where}.", run_dir=str(folder) if folder else None)
            z = torch.randn(opts.num_samples, model.latent_dim, dtype=X.dtype, device=X.device)
            x = model.generate(z)
        params = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        params.update({"losses.discriminator": torch.from_numpy(losses[:, 0].copy()),
                       "losses.generator": torch.from_numpy(losses[:, 1].copy())})
        return Result(
            posterior={"z": z.cpu().numpy()[None]},
            posterior_predictive={"x": x.cpu().numpy()[None]},
            dims={"z": ["latent"]},
            params=params,
            losses=losses[:, 0].copy(),
            config={"model": model.config(), "engine": {"name": self.name, "options": jsonable(opts)},
                    "seed": seed, "versions": versions()},
            model=model,
        )


register_engine("adversarial", AdversarialEngine)
