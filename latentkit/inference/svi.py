"""Stochastic variational inference: any Pyro guide, enumeration handled automatically."""

import dataclasses
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceEnum_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoDelta, AutoMultivariateNormal, AutoNormal
from pyro.poutine.util import prune_subsample_sites
from tqdm.auto import tqdm

from latentkit import distributed
from latentkit.checkpoint import (
    compare_fingerprints,
    fork_host_rng,
    load_checkpoint,
    save_checkpoint,
)
from latentkit.errors import ConfigError, InferenceError, LatentkitError
from latentkit.inference.base import parse_options, register_engine, seeded, versions
from latentkit.inference.initialization import init_with_values
from latentkit.inference.posterior import CHUNK, complete_result
from latentkit.inference.result import Result
from latentkit.inference.run_state import TrainingState, digest, jsonable, stop_signal
from latentkit.inference.target import Target, bind, model_config
from latentkit.inference.training import EpochRecord, LatentScale, evaluate, warmup_factor
from latentkit.inference.vectorize import BatchedModel
from latentkit.interrupt import stopped

__all__ = ["SVIOptions", "SVIEngine"]

GUIDES = {"normal": AutoNormal, "multivariate_normal": AutoMultivariateNormal, "delta": AutoDelta}


@dataclass(frozen=True)
class SVIOptions:
    """Options of the ``"svi"`` engine (command-line flags are the kebab-case names)."""

    steps: int | None = field(default=None, metadata={
        "min": 1, "help": "optimisation steps (default 2000 unless epochs is given)"})
    epochs: int | None = field(default=None, metadata={
        "min": 1, "help": "passes over the data instead of steps: N // batch_size steps each with "
                          "minibatches (reshuffled every epoch), one step each without"})
    learning_rate: float = field(default=0.01, metadata={"min": 0.0, "help": "Adam step size"})
    guide: Any = field(default="auto", metadata={
        "choices": ("auto", *GUIDES),
        "help": "auto (the model's own guide if it has one, e.g. a VAE's encoder, else normal), "
                "normal (AutoNormal), multivariate_normal, delta (MAP), or a Pyro guide callable"})
    num_particles: int = field(default=1, metadata={"min": 1, "help": "ELBO particles per step"})
    batch_size: int | None = field(default=None, metadata={
        "min": 1, "help": "global minibatch size: reshuffled each epoch, shared out among distributed processes; "
                          "subsampled plate, ELBO scaled to the full data"})
    num_samples: int = field(default=1000, metadata={"min": 1, "help": "posterior draws from the fitted guide"})
    init_scale: float = field(default=0.1, metadata={"min": 0.0, "help": "initial scale of normal guides"})
    elbo: str = field(default="auto", metadata={
        "choices": ("auto", "trace", "meanfield", "enum"),
        "help": "auto: TraceEnum_ELBO if the model enumerates, else the model's default_elbo if it has one, "
                "else Trace_ELBO"})
    device: str | None = field(default=None, metadata={"help": "torch device, e.g. cuda"})
    kl_warmup: int = field(default=0, metadata={
        "min": 0, "help": "KL warm-up: epochs over which the continuous latent sites' log-density (model "
                          "and guide) is scaled linearly from kl_warmup_start up to 1 (0: none)"})
    kl_warmup_start: float = field(default=0.0, metadata={
        "min": 0.0, "help": "the KL warm-up's first scale factor, in [0, 1]"})
    validation: Any = field(default=None, metadata={
        "help": "held-out data in the form of the training data (on the command line: a file read like --data): "
                "its ELBO is recorded after every epoch"})
    patience: int | None = field(default=None, metadata={
        "min": 1, "help": "with validation: stop after this many epochs without a better validation ELBO "
                          "and restore the parameters of the best epoch"})
    # A GMM step takes ~2 ms and a checkpoint ~5 ms: 500 steps keep checkpoints under 1% of the run
    # (benchmarks/distributed.py); the time limit bounds the work lost to a crash.
    checkpoint_every: int = field(default=500, metadata={
        "min": 1, "help": "with a run folder: write a checkpoint every this many steps"})
    checkpoint_seconds: float = field(default=300.0, metadata={
        "min": 0.0, "help": "with a run folder: and at least this often (seconds)"})
    distributed: bool = field(default=False, metadata={
        "help": "data-parallel over the processes started by torchrun (automatic under torchrun)"})


#: Options that may change when a run is resumed.
RESUMABLE = ("steps", "epochs", "num_samples", "checkpoint_every", "checkpoint_seconds")
#: Steps of a fit given neither steps nor epochs.
DEFAULT_STEPS = 2000


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
        if choice == "auto":
            if callable(getattr(model, "guide", None)):
                return model.guide
            choice = "normal"
        values = model.initial_values(target.kwargs, seed) if hasattr(model, "initial_values") else {}
        init = init_with_values(values, fallback="median")
        exposed = poutine.block(fn, hide_fn=_hide_enumerated)
        if choice == "delta":
            return AutoDelta(exposed, init_loc_fn=init)
        return GUIDES[choice](exposed, init_loc_fn=init, init_scale=self.options.init_scale)

    def _elbo(self, target: Target, model: Any) -> pyro.infer.ELBO:
        kind = self.options.elbo
        if kind == "auto":
            # A model may name the estimator it is meant for (a diffusion model: "meanfield").
            kind = "enum" if target.has_enumeration else getattr(model, "default_elbo", "trace")
        if target.has_enumeration and kind != "enum":
            raise ConfigError("elbo: the model has enumerated sites; use elbo='enum' or 'auto'.")
        cls = {"trace": Trace_ELBO, "meanfield": TraceMeanField_ELBO, "enum": TraceEnum_ELBO}[kind]
        return cls(num_particles=self.options.num_particles,
                   max_plate_nesting=target.max_plate_nesting)

    def _check_options(self) -> None:
        opts = self.options
        if opts.steps is not None and opts.epochs is not None:
            raise ConfigError(f"steps: give steps or epochs, not both (got steps={opts.steps}, "
                              f"epochs={opts.epochs}); an epoch is N // batch_size steps.")
        if not 0.0 <= opts.kl_warmup_start <= 1.0:
            raise ConfigError(f"kl_warmup_start: must lie in [0, 1], got {opts.kl_warmup_start!r}.")
        if opts.patience is not None and opts.validation is None:
            raise ConfigError("patience: early stopping watches the validation ELBO; pass validation= "
                              "(held-out data) or drop patience.")
        if isinstance(opts.validation, (str, Path)):
            raise ConfigError("validation: give the held-out data itself (array, tensor, DataFrame, or a dict "
                              "of the model's arguments), not a file name.")

    def _fast_loss(self, model: Any, target: Target) -> Callable[..., torch.Tensor] | None:
        """The model's own ``elbo_loss`` where it equals this engine's loss: the model's guide,
        ``Trace_ELBO`` with one particle, no enumeration."""
        opts = self.options
        fast = getattr(model, "elbo_loss", None)
        if (callable(fast) and opts.guide == "auto" and callable(getattr(model, "guide", None))
                and opts.elbo in ("auto", "trace") and opts.num_particles == 1 and not target.has_enumeration):
            return fast
        return None

    def fit(self, model: Any, data: Any, *, seed: int = 0, progress: bool = True,
            run_dir: str | Path | None = None, resume: bool = False,
            should_stop: Callable[[int], bool] | None = None) -> Result:
        """Fit the guide; with ``run_dir``, checkpoint there (and continue from it if ``resume``).

        ``should_stop(step)`` is asked after each step; when True the run writes a checkpoint
        and raises :class:`~latentkit.interrupt.RunStopped` (for the signal in
        ``should_stop.signum`` if it has one, as :class:`~latentkit.interrupt.StopRequests` does).

        After every epoch (see :mod:`latentkit.inference.training`) the result's ``epoch_metrics``
        get the mean training ``elbo``, with ``validation=`` the ``validation_elbo`` of the held-out
        data (one ELBO estimate on fixed random numbers, nats summed over the held-out data), and
        whatever the model's ``monitor(kwargs)`` returns (a VAE: ``kl_per_dim``, ``active_units``),
        evaluated on the held-out data if given, else on the training data. They are recorded when
        training by ``epochs``, with ``validation=``, or for a model with ``monitor``.

        A model may define ``elbo_loss(kwargs, index, latent_scale)``: the one-particle
        ``Trace_ELBO`` loss of its own guide on the points ``index`` (None: all), computed without
        Pyro's per-step tracing. It is used when it equals the loss the engine would compute
        (``guide="auto"``, ``elbo`` ``"auto"``/``"trace"``, ``num_particles=1``).
        """
        self._check_options()
        opts = self.options
        context = distributed.setup(opts.device) if opts.distributed else None
        device = context.device if context is not None else opts.device
        rank, world = (context.rank, context.world_size) if context is not None else (0, 1)
        folder = Path(run_dir) if run_dir is not None else None
        if resume and folder is None:
            raise ConfigError("resume: needs the run folder (run_dir) of the interrupted fit.")
        with seeded(seed, device), fork_host_rng(), pyro.get_param_store().scope():
            target = bind(model, data, device)
            train_kwargs = dict(target.kwargs)
            batches = None
            if opts.batch_size is not None or context is not None:
                batches = _minibatches(target, opts.batch_size, seed, rank, world)
                train_kwargs["subsample_size"] = batches.local_size
            per_epoch = batches.size // batches.batch_size if batches is not None and batches.batch_size else 1
            total = opts.steps if opts.steps is not None else (
                opts.epochs * per_epoch if opts.epochs is not None else DEFAULT_STEPS)
            losses = np.empty(total)
            guide = self._guide(target, model, target.fn, seed)
            elbo = self._elbo(target, model)
            fast = self._fast_loss(model, target)
            warmup_steps = opts.kl_warmup * per_epoch

            def loss_at(step: int) -> torch.Tensor:
                factor = warmup_factor(step, warmup_steps, opts.kl_warmup_start)
                if fast is not None:
                    return fast(target.kwargs, batches.indices(step) if batches is not None else None, factor)
                fn, q = (target.fn, guide) if factor == 1.0 else (LatentScale(factor)(target.fn),
                                                                  LatentScale(factor)(guide))
                if batches is None:
                    return elbo.differentiable_loss(fn, q, **train_kwargs)
                with distributed.fixed_subsample(batches, step):
                    return elbo.differentiable_loss(fn, q, **train_kwargs)

            cuda = [torch.device(device).index or 0] if device and torch.device(device).type == "cuda" else []
            # Setting up the guide traces the model, drawing the local latent variables of the batch;
            # their number depends on the shard size, so keep them out of the random stream.
            with poutine.trace(param_only=True) as capture, torch.random.fork_rng(devices=cuda):
                loss_at(0)
            named = _named_parameters(capture.trace, model)
            params = list(named.values())
            if not params:
                raise ConfigError("guide: has no parameters to optimise.")
            if context is not None:
                distributed.broadcast_parameters(params)
            optimizer = torch.optim.Adam(params, lr=opts.learning_rate)
            state = TrainingState(named, model, optimizer, losses, cuda, rank)
            monitor = getattr(model, "monitor", None)
            record_epochs = opts.epochs is not None or opts.validation is not None or callable(monitor)
            validation = bind(model, opts.validation, device) if opts.validation is not None else None
            watched = validation.kwargs if validation is not None else target.kwargs

            def epoch_metrics(first: int, done: int) -> dict[str, Any]:
                values: dict[str, Any] = {"elbo": -float(losses[first:done].mean())}
                if validation is not None:
                    held_out = validation
                    values["validation_elbo"] = -evaluate(
                        (lambda: fast(held_out.kwargs, None, 1.0)) if fast is not None else
                        (lambda: elbo.loss(held_out.fn, guide, **held_out.kwargs)), seed, cuda)
                if callable(monitor):
                    with torch.no_grad():
                        values.update(monitor(watched))
                return values

            if validation is not None:
                try:
                    epoch_metrics(0, 1)
                except LatentkitError:
                    raise
                except Exception as error:  # noqa: BLE001 - any failure of the user's guide is reported as such
                    raise ConfigError(
                        f"validation: the guide cannot evaluate the held-out data ({type(error).__name__}: {error}); "
                        "validation needs a guide without per-point parameters (global latents, or an amortised "
                        "encoder) and data in the form of the training data.") from error
            record = state.record = EpochRecord(state.tracked(), opts.patience)
            fingerprint = {
                "model": model_config(model),
                "engine": self.name,
                "options": {k: v for k, v in jsonable(opts).items() if k not in RESUMABLE},
                "seed": seed,
                "world_size": world,
                "data": digest(target.kwargs),
                "parameters": {name: list(p.shape) for name, p in named.items()},
            }
            if validation is not None:
                fingerprint["validation"] = digest(validation.kwargs)
            start = 0
            if resume:
                assert folder is not None
                checkpoint = load_checkpoint(folder)
                compare_fingerprints(checkpoint.fingerprint, fingerprint, folder)
                if checkpoint.step > total:
                    raise ConfigError(f"steps: the checkpoint in {str(folder)!r} is at step {checkpoint.step}, "
                                      f"beyond {total} steps; pass steps (or epochs) that reach {checkpoint.step}.")
                state.restore(checkpoint)
                start = checkpoint.step
            writes = folder is not None and rank == 0
            last_write = time.monotonic()
            # A resumed run whose last checkpoint came when early stopping ended it does not go on.
            end = start if record.should_stop() else total
            bar = tqdm(range(start, end), initial=start, total=total, desc="svi", unit="step",
                       disable=None if progress and rank == 0 else True)
            done = start
            for step in bar:
                optimizer.zero_grad()
                loss = loss_at(step)
                loss.backward()
                value = float(loss.detach())
                signum = stop_signal(should_stop, step)
                done = step + 1
                due = writes and (done % opts.checkpoint_every == 0 or done == total
                                  or time.monotonic() - last_write >= opts.checkpoint_seconds)
                if context is not None and batches is not None:  # one all-reduce: gradients, loss, decisions
                    sums = distributed.average_gradients(params, batches.weight, [
                        value * batches.weight, signum == signal.SIGINT, signum == signal.SIGTERM, due])
                    value, due = float(sums[0]), bool(sums[3] > 0)
                    signum = signal.SIGTERM if sums[2] > 0 else signal.SIGINT if sums[1] > 0 else None
                if not math.isfinite(value):
                    raise InferenceError(
                        f"loss: became {value} at step {step}; lower learning_rate "
                        f"(now {opts.learning_rate}) or check the model's priors and data."
                    )
                optimizer.step()
                losses[step] = value
                stop_early = False
                epoch_end = record_epochs and done % per_epoch == 0
                if epoch_end:
                    record.add(epoch_metrics(done - per_epoch, done))
                    stop_early = record.should_stop()
                if not bar.disable:  # the postfix is formatted only for a bar that is drawn
                    if epoch_end:
                        shown = [name for name in ("validation_elbo", "active_units") if name in record.metrics]
                        bar.set_postfix(loss=f"{value:.4g}", refresh=False,  # drawn at tqdm's own pace
                                        **{name: f"{record.metrics[name][-1]:.4g}" for name in shown})
                    elif step % 25 == 0 or done == total:
                        bar.set_postfix(loss=f"{value:.4g}")
                if folder is not None and (due or signum is not None or stop_early):
                    ranks = distributed.gather_rng(cuda) if context is not None else None
                    if writes:
                        save_checkpoint(folder, state.checkpoint(done, fingerprint, ranks))
                    last_write = time.monotonic()
                if stop_early:
                    break
                if signum is not None and done < total:
                    bar.close()
                    where = (f"checkpoint written to {str(folder)!r}; resume with lk.fit(..., resume={str(folder)!r}) "
                             f"or the same `latentkit fit` command with --resume {folder}"
                             if folder is not None else "no run folder was given, so nothing was saved")
                    raise stopped(signum, f"{signal.Signals(signum).name}: stopped SVI after step {done} of "
                                  f"{total}; {where}.", run_dir=str(folder) if folder else None)
            bar.close()
            extra_config: dict[str, Any] = {}
            if record.best:
                record.restore_best()
                extra_config["early_stopping"] = {
                    "best_epoch": int(record.best_epoch) + 1, "epochs_run": record.epochs,
                    "stopped_early": done < total, "restored_best": True}
            samples, log_q = _guide_draws(guide, target, opts.num_samples)
            fitted = {name: value.detach().clone() for name, value in pyro.get_param_store().items()}
            if isinstance(model, torch.nn.Module):
                fitted.update({f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()})
            batched = BatchedModel(target)
            stats = _importance_stats(batched, samples, log_q)
            config = {
                "model": model_config(model),
                "engine": {"name": self.name, "options": jsonable(opts)},
                "seed": seed,
                "versions": versions(),
                **extra_config,
            }
            result = complete_result(target, batched, samples, model=model, sample_stats=stats, params=fitted,
                                     losses=losses[:done].copy(), config=config, seed=seed)
            return dataclasses.replace(result, epoch_metrics=record.arrays())


def _minibatches(target: Target, batch_size: int | None, seed: int, rank: int, world: int) -> distributed.Minibatches:
    """The minibatch (and, across processes, shard) indices of the model's subsampled data plate."""
    if "subsample_size" not in _parameters(target.fn):
        raise ConfigError(
            "batch_size: this model takes no 'subsample_size' argument; write its data plate as "
            "pyro.plate('data', N, subsample_size=subsample_size) or drop batch_size (and distributed)."
        )
    sizes = distributed.subsample_sizes(target.fn, target.kwargs)
    if len(sizes) != 1:
        raise ConfigError(
            f"batch_size: the model subsamples {len(sizes)} plates of sizes {sorted(sizes)}; minibatches and "
            "distributed SVI need exactly one data plate taking subsample_size."
        )
    return distributed.Minibatches(sizes.pop(), batch_size, seed=seed, rank=rank, world_size=world)


def _named_parameters(trace: Any, model: Any) -> dict[str, torch.Tensor]:
    """The optimised tensors by name: guide params (unconstrained) and the model's own weights."""
    named = {f"param.{name}": site["value"].unconstrained() for name, site in trace.nodes.items()}
    if isinstance(model, torch.nn.Module):
        named.update({f"module.{name}": p for name, p in model.named_parameters() if p.requires_grad})
    unique: dict[int, str] = {}
    for name, tensor in named.items():
        unique.setdefault(id(tensor), name)
    return {name: named[name] for name in unique.values()}


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


register_engine("svi", SVIEngine)
