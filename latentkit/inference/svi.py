"""Stochastic variational inference: any Pyro guide, enumeration handled automatically."""

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceEnum_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoDelta, AutoMultivariateNormal, AutoNormal
from pyro.poutine.util import prune_subsample_sites
from tqdm.auto import tqdm

from latentkit.errors import ConfigError, InferenceError
from latentkit.inference.base import parse_options, register_engine, seeded, versions
from latentkit.inference.initialization import init_with_values
from latentkit.inference.posterior import CHUNK, complete_result
from latentkit.inference.result import Result
from latentkit.inference.target import Target, bind, model_config
from latentkit.inference.vectorize import BatchedModel

__all__ = ["SVIOptions", "SVIEngine"]

GUIDES = {"normal": AutoNormal, "multivariate_normal": AutoMultivariateNormal, "delta": AutoDelta}


@dataclass(frozen=True)
class SVIOptions:
    """Options of the ``"svi"`` engine (command-line flags are the kebab-case names)."""

    steps: int = field(default=2000, metadata={"min": 1, "help": "optimisation steps"})
    learning_rate: float = field(default=0.01, metadata={"min": 0.0, "help": "Adam step size"})
    guide: Any = field(default="normal", metadata={
        "choices": tuple(GUIDES),
        "help": "normal (AutoNormal), multivariate_normal, delta (MAP), or a Pyro guide callable"})
    num_particles: int = field(default=1, metadata={"min": 1, "help": "ELBO particles per step"})
    batch_size: int | None = field(default=None, metadata={
        "min": 1, "help": "minibatch size (subsampled plate, ELBO scaled to the full data)"})
    num_samples: int = field(default=1000, metadata={"min": 1, "help": "posterior draws from the fitted guide"})
    init_scale: float = field(default=0.1, metadata={"min": 0.0, "help": "initial scale of normal guides"})
    elbo: str = field(default="auto", metadata={
        "choices": ("auto", "trace", "meanfield", "enum"),
        "help": "auto: TraceEnum_ELBO if the model enumerates, else Trace_ELBO"})
    device: str | None = field(default=None, metadata={"help": "torch device, e.g. cuda"})


def _hide_enumerated(msg: dict[str, Any]) -> bool:
    return msg["type"] == "sample" and msg["infer"].get("enumerate") == "parallel"


class SVIEngine:
    """Fits a guide by maximising the ELBO with Adam, then draws ``num_samples`` from it."""

    name = "svi"

    def __init__(self, **options: Any) -> None:
        self.options = parse_options(SVIOptions, options, self.name)

    def _guide(self, target: Target, model: Any, fn: Callable[..., Any], seed: int) -> Callable[..., Any]:
        choice = self.options.guide
        if callable(choice) and not isinstance(choice, str):
            return choice
        values = model.initial_values(target.kwargs, seed) if hasattr(model, "initial_values") else {}
        init = init_with_values(values, fallback="median")
        exposed = poutine.block(fn, hide_fn=_hide_enumerated)
        if choice == "delta":
            return AutoDelta(exposed, init_loc_fn=init)
        return GUIDES[choice](exposed, init_loc_fn=init, init_scale=self.options.init_scale)

    def _elbo(self, target: Target) -> pyro.infer.ELBO:
        kind = self.options.elbo
        if kind == "auto":
            kind = "enum" if target.has_enumeration else "trace"
        if target.has_enumeration and kind != "enum":
            raise ConfigError("elbo: the model has enumerated sites; use elbo='enum' or 'auto'.")
        cls = {"trace": Trace_ELBO, "meanfield": TraceMeanField_ELBO, "enum": TraceEnum_ELBO}[kind]
        return cls(num_particles=self.options.num_particles,
                   max_plate_nesting=target.max_plate_nesting)

    def fit(self, model: Any, data: Any, *, seed: int = 0, progress: bool = True) -> Result:
        opts = self.options
        device = opts.device
        losses = np.empty(opts.steps)
        with seeded(seed, device), pyro.get_param_store().scope():
            target = bind(model, data, device)
            train_kwargs = dict(target.kwargs)
            if opts.batch_size is not None:
                if "subsample_size" not in _parameters(target.fn):
                    raise ConfigError(
                        "batch_size: this model takes no 'subsample_size' argument; write its data "
                        "plate as pyro.plate('data', N, subsample_size=subsample_size) or drop batch_size."
                    )
                train_kwargs["subsample_size"] = opts.batch_size
            guide = self._guide(target, model, target.fn, seed)
            elbo = self._elbo(target)
            with poutine.trace(param_only=True) as capture:
                elbo.differentiable_loss(target.fn, guide, **train_kwargs)
            params = [site["value"].unconstrained() for site in capture.trace.nodes.values()]
            if isinstance(model, torch.nn.Module):
                params += [p for p in model.parameters() if p.requires_grad]
            params = list({id(p): p for p in params}.values())
            if not params:
                raise ConfigError("guide: has no parameters to optimise.")
            optimizer = torch.optim.Adam(params, lr=opts.learning_rate)
            bar = tqdm(range(opts.steps), disable=None if progress else True, desc="svi", unit="step")
            for step in bar:
                optimizer.zero_grad()
                loss = elbo.differentiable_loss(target.fn, guide, **train_kwargs)
                if not torch.isfinite(loss):
                    raise InferenceError(
                        f"loss: became {loss.item()} at step {step}; lower learning_rate "
                        f"(now {opts.learning_rate}) or check the model's priors and data."
                    )
                loss.backward()
                optimizer.step()
                losses[step] = loss.item()
                if step % 25 == 0 or step == opts.steps - 1:
                    bar.set_postfix(loss=f"{losses[step]:.4g}")
            samples, log_q = _guide_draws(guide, target, opts.num_samples)
            fitted = {name: value.detach().clone() for name, value in pyro.get_param_store().items()}
            if isinstance(model, torch.nn.Module):
                fitted.update({f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()})
            batched = BatchedModel(target)
            stats = _importance_stats(batched, samples, log_q)
            config = {
                "model": model_config(model),
                "engine": {"name": self.name, "options": _jsonable(opts)},
                "seed": seed,
                "versions": versions(),
            }
            return complete_result(target, batched, samples, model=model, sample_stats=stats, params=fitted,
                                   losses=losses, config=config, seed=seed)


def _parameters(fn: Callable[..., Any]) -> set[str]:
    import inspect

    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


def _guide_draws(
    guide: Callable[..., Any], target: Target, num_samples: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``num_samples`` draws of the continuous latent sites from the guide, as one chain, and the
    guide's log density of each draw, ``(num_samples,)``."""
    latent = target.of_kind("latent")
    draws: dict[str, list[torch.Tensor]] = {k: [] for k in latent}
    log_q = []
    with torch.no_grad():
        for _ in range(num_samples):
            trace = poutine.trace(guide).get_trace(**target.kwargs)
            for name in latent:
                if name not in trace.nodes:
                    raise ConfigError(f"guide: has no sample site {name!r} of the model.")
                draws[name].append(trace.nodes[name]["value"].reshape(latent[name].shape))
            log_q.append(torch.as_tensor(prune_subsample_sites(trace).log_prob_sum()))
    return {k: torch.stack(v).unsqueeze(0) for k, v in draws.items()}, torch.stack(log_q)


def _importance_stats(
    batched: BatchedModel, samples: dict[str, torch.Tensor], log_q: torch.Tensor
) -> dict[str, np.ndarray]:
    """Per-draw ``log_joint`` (model log density, discrete sites summed out) and ``log_q``
    (guide log density), shape (1, num_samples): the importance ratios p/q behind the Pareto
    k-hat check of the guide (Yao et al. 2018)."""
    flat = {k: v[0] for k, v in samples.items()}
    size = log_q.shape[0]
    with torch.no_grad(), pyro.validation_enabled(False):
        log_joint = torch.cat([batched.log_density({k: v[i:i + CHUNK] for k, v in flat.items()})
                               for i in range(0, size, CHUNK)])
    return {"log_joint": log_joint.detach().cpu().numpy()[None], "log_q": log_q.detach().cpu().numpy()[None]}


def _jsonable(options: Any) -> dict[str, Any]:
    out = {}
    for key, value in dataclasses.asdict(options).items():
        if callable(value) and not isinstance(value, str):
            value = f"<callable {getattr(value, '__qualname__', type(value).__name__)}>"
        elif isinstance(value, float) and not math.isfinite(value):
            value = str(value)
        out[key] = value
    return out


register_engine("svi", SVIEngine)
