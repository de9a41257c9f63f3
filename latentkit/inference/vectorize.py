"""Run a Pyro model for many values of its latent sites at once.

Every engine needs the model evaluated at many parameter values: a potential energy for each
MCMC chain at every leapfrog step, and log-likelihoods, discrete states and predictive draws for
each posterior draw afterwards. :class:`BatchedModel` does this in one model call by wrapping the
model in a plate over the values (``dim = -max_plate_nesting - 1``), exactly as Pyro's
``Predictive(parallel=True)`` does, with enumeration dimensions further left. Models whose code
does not broadcast over an extra batch dimension (e.g. ``X @ beta``) are detected once; their
potential is then recorded one value at a time (compiled, that is the fastest form), and the
posterior's log-likelihoods, discrete sites and predictive draws are computed with
``torch.func.vmap`` where it gives the same log density as the model run one value at a time,
else one value at a time.
"""

import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.infer import infer_discrete
from pyro.ops import packed
from pyro.ops.contract import contract_to_tensor
from pyro.poutine.messenger import Messenger

from latentkit.inference.log_einsum import BroadcastLogRing
from latentkit.inference.target import Target

__all__ = ["BatchedModel"]

Values = dict[str, torch.Tensor]
Run = Callable[[Values, int | None], dict[str, torch.Tensor]]
BATCH_PLATE = "_batch"
# Values per vmap call times the size of the largest observed site. vmap's tensors are that many
# times larger than one value's; past a few MB, first touches of fresh memory cost more than the
# Python overhead vmap saves (logistic regression, 10,000 points: 500 values per call 0.21 s,
# 26 per call 0.10 s, one at a time 0.18 s; 100 points, 500 per call: 0.004 s against 0.10 s).
VMAP_ELEMENTS = 2**18


def _common_scale(scales: list[Any]) -> Any:
    # Enumerated factors share one subsampling scale (TraceEnum_ELBO requires the same).
    return scales[0] if scales else 1.0


def log_marginal(trace: poutine.Trace, keep: Iterable[str], include: Callable[[str], bool]) -> torch.Tensor:
    """Log density of the included sites of an enumerated trace, discrete sites summed out.

    Mirrors ``TraceEnum_ELBO``'s factor bookkeeping: sites that depend on enumerated values are
    contracted by tensor variable elimination down to the plates in ``keep``; all other included
    sites are summed over every dimension but those plates.

    Args:
        trace: a model trace run under ``poutine.enum`` (or without enumerated sites).
        keep: names of plates whose dimensions are kept in the result.
        include: which non-enumerated sample sites contribute.

    Returns:
        An unpacked tensor whose non-singleton dimensions are the kept plates' dimensions.
    """
    trace.compute_log_prob()
    trace.pack_tensors()
    keep = set(keep)
    sample_sites = [s for s in trace.nodes.values() if s["type"] == "sample"]
    enum_sites = [s for s in sample_sites if s["infer"].get("_enumerate_dim") is not None]
    plate_symbols = set(trace.plate_to_symbol.values())
    enum_dims = set().union(*(s["packed"]["log_prob"]._pyro_dims for s in enum_sites)) - plate_symbols

    def ordinal(site: dict[str, Any]) -> frozenset[str]:
        return frozenset(
            trace.plate_to_symbol[f.name] for f in site["cond_indep_stack"] if f.vectorized
        )

    factors: OrderedDict[frozenset[str], list[torch.Tensor]] = OrderedDict()
    scales = []
    total: torch.Tensor | float = 0.0
    kept_dims = {f.dim for s in sample_sites for f in s["cond_indep_stack"] if f.name in keep}
    for site in sample_sites:
        if site["infer"].get("_enumerate_dim") is not None or not include(site["name"]):
            continue
        log_prob = site["packed"]["log_prob"]
        if enum_dims.isdisjoint(log_prob._pyro_dims):
            term = site["log_prob"]
            drop = [d for d in range(-term.dim(), 0) if d not in kept_dims and term.shape[d] > 1]
            total = total + (term.sum(drop, keepdim=True) if drop else term)
        else:
            factors.setdefault(ordinal(site), []).append(
                packed.scale_and_mask(site["packed"]["unscaled_log_prob"], mask=site["packed"]["mask"])
            )
            scales.append(site["scale"])
    if factors:
        for site in enum_sites:
            factors.setdefault(ordinal(site), []).append(site["packed"]["unscaled_log_prob"])
            scales.append(site["scale"])
        target = frozenset(trace.plate_to_symbol[name] for name in keep if name in trace.plate_to_symbol)
        if len(factors) == 1 and len(enum_dims) == 1:
            contracted = _logsumexp_one_site(next(iter(factors.values())), next(iter(enum_dims)), target)
        else:
            contracted = contract_to_tensor(factors, enum_dims, target_ordinal=target, ring=BroadcastLogRing())
        contracted = packed.unpack(packed.scale_and_mask(contracted, scale=_common_scale(scales)),
                                   trace.symbol_to_dim)
        total = total + contracted
    return torch.as_tensor(total)


def _logsumexp_one_site(factors: list[torch.Tensor], enum_symbol: str, target: frozenset[str]) -> torch.Tensor:
    """``contract_to_tensor`` for one enumerated site whose dependent factors all lie in its plates.

    Then the contraction is a log-sum-exp over the site's values of the summed factors, summed over
    the plates not in ``target``. Written out because Pyro's general contraction runs the
    log-space sum as ``exp``, ``bmm`` and ``log`` (``pyro.ops.einsum.torch_log``), which for a
    mixture's (chains, K, N) factors costs about three times the direct form, gradient included
    (a 3-component mixture of 1,000 points: 0.52 ms per potential and gradient evaluation).

    Shapes:
        packed tensors (``_pyro_dims``), as ``contract_to_tensor`` takes and returns them.
    """
    values = packed.broadcast_all(*factors)
    dims = values[0]._pyro_dims
    total = logsumexp_reusing_exp(sum(values[1:], values[0]), dims.index(enum_symbol))
    dims = dims.replace(enum_symbol, "")
    dropped = [i for i, symbol in enumerate(dims) if symbol not in target]
    if dropped:
        total = total.sum(dropped)
    total._pyro_dims = "".join(symbol for symbol in dims if symbol in target)
    return total


def logsumexp_reusing_exp(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x.logsumexp(dim)``, written so that its gradient reuses the forward pass's exponentials.

    ``torch.logsumexp``'s backward computes ``exp(x - result)`` afresh; here autograd's gradient
    is ``exp(x - m) * (grad / sum)``, one multiplication of saved values. Where a potential is
    evaluated tens of thousands of times this saves one ``exp`` and one subtraction over the
    whole of ``x`` (a mixture's (chains, K, N) factors: 281 -> 258 us per potential and gradient).
    ``m``, the maximum, is held constant (``detach``): the result does not depend on it.
    """
    finfo = torch.finfo(x.dtype)
    # Clamped: where the maximum is infinite, x - m stays -inf (all -inf along dim) or +inf.
    m = x.detach().amax(dim, keepdim=True).clamp(finfo.min, finfo.max)
    return (x - m).exp().sum(dim).log() + m.squeeze(dim)


def _same_log_density(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    """Equal shapes and values up to float32 rounding of the largest finite magnitude; NaNs alike."""
    scale = 1 + torch.nan_to_num(expected, nan=0.0, posinf=0.0, neginf=0.0).abs().max().item()
    return actual.shape == expected.shape and bool(
        torch.allclose(actual, expected, rtol=1e-5, atol=1e-5 * scale, equal_nan=True))


class _Resample(Messenger):
    """Sample the named observed sites afresh.

    Written here because ``poutine.uncondition`` also resamples ``pyro.deterministic`` sites
    (observed Delta sites), which breaks their shapes under a batch plate.
    """

    def __init__(self, names: Iterable[str]) -> None:
        super().__init__()
        self.names = set(names)

    def _pyro_sample(self, msg: dict[str, Any]) -> None:
        if msg["name"] in self.names and msg["is_observed"]:
            msg["is_observed"] = False
            msg["value"] = None
            msg["done"] = False


class BatchedModel:
    """A target's model evaluated at B values of its latent sites per call.

    Values are dicts ``{site: Tensor (B, *site.shape)}``; results have a leading B dimension.

    Args:
        target: the model bound to its data.
        vectorized: run all B values in one model call (a plate over values); when None it is
            decided by :meth:`check_vectorization` on first use.
    """

    def __init__(self, target: Target, vectorized: bool | None = None) -> None:
        self.target = target
        self.nesting = target.max_plate_nesting
        self.vectorized = vectorized
        # Whether torch.func.vmap reproduces the one-at-a-time log density (None: not yet tried),
        # and the runs where it failed anyway.
        self.vmaps: bool | None = None
        self._vmap_failed: set[str] = set()

    # -- shapes ------------------------------------------------------------------------------
    def _batch_shape(self, name: str, size: int) -> tuple[int, ...]:
        site = self.target.sites[name]
        return (size,) + (1,) * (self.nesting - len(site.batch_shape)) + site.shape

    def _expand(self, values: Values) -> Values:
        return {k: v.reshape(self._batch_shape(k, v.shape[0])) for k, v in values.items()}

    def _collapse(self, name: str, value: torch.Tensor, size: int) -> torch.Tensor:
        full = self._batch_shape(name, size)
        while value.dim() > len(full) and value.shape[0] == 1:  # left by enumeration
            value = value.squeeze(0)
        return value.expand(full).reshape((size,) + self.target.sites[name].shape)

    # -- model runs ----------------------------------------------------------------------------
    def _model(self, size: int | None) -> Callable[..., Any]:
        fn = self.target.fn
        if size is None:
            return fn

        def batched(**kwargs: Any) -> Any:
            with pyro.plate(BATCH_PLATE, size, dim=-self.nesting - 1):
                return fn(**kwargs)

        return batched

    def _map(self, values: Values, run: Run, vmap: str | None = None) -> dict[str, torch.Tensor]:
        """Apply ``run`` to all values at once, or, when the model does not broadcast over them,
        through ``torch.func.vmap`` (``vmap`` names the run; None: never) or to each in turn."""
        size = next(iter(values.values())).shape[0] if values else 1
        if self.vectorized is None:
            self.check_vectorization(values)
        # A batch plate of size 1 is broadcast away in enumerated terms; one value needs no plate.
        if self.vectorized and size > 1:
            return run(self._expand(values), size)
        if vmap is not None and size > 1 and vmap not in self._vmap_failed and self.check_vmap(values):
            try:
                return self._vmapped(values, run)
            except Exception:  # noqa: BLE001 - an operation vmap cannot batch: one value at a time
                self._vmap_failed.add(vmap)
        return self._one_at_a_time(values, run)

    @staticmethod
    def _one_at_a_time(values: Values, run: Run) -> dict[str, torch.Tensor]:
        size = next(iter(values.values())).shape[0] if values else 1
        parts = [run({k: v[i] for k, v in values.items()}, None) for i in range(size)]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def _vmapped(self, values: Values, run: Run) -> dict[str, torch.Tensor]:
        """``run`` of one value, vectorized by ``torch.func.vmap`` (random draws independent per
        value) in calls of at most ``VMAP_ELEMENTS`` / (largest observed site's size) values."""
        size = next(iter(values.values())).shape[0]
        largest = max((value.numel() for value in self.target.observed.values()), default=1)
        step = max(1, VMAP_ELEMENTS // max(largest, 1))
        batched = torch.func.vmap(lambda vals: run(vals, None), randomness="different")
        pieces = []
        for start in range(0, size, step):
            with warnings.catch_warnings():
                # vmap runs an operation without a batching rule value by value: still correct.
                warnings.filterwarnings("ignore", message="There is a performance drop")
                out = batched({k: v[start:start + step] for k, v in values.items()})
            pieces.append({k: v.flatten(0, 1) for k, v in out.items()})  # (values, 1, ...) -> (values, ...)
        return {k: torch.cat([piece[k] for piece in pieces]) for k in pieces[0]}

    def _enum(self, model: Callable[..., Any]) -> Callable[..., Any]:
        if not self.target.has_enumeration:
            return model
        return poutine.enum(model, first_available_dim=-self.nesting - 2)

    # -- what engines ask for ----------------------------------------------------------------------
    def log_density(self, values: Values) -> torch.Tensor:
        """Log joint density of latent values and data, discrete sites summed out. Shape (B,)."""
        return self._map(values, self._log_density)["lp"]

    def _log_density(self, vals: Values, size: int | None) -> dict[str, torch.Tensor]:
        model = self._enum(poutine.condition(self._model(size), vals))
        trace = poutine.trace(model).get_trace(**self.target.kwargs)
        keep = [BATCH_PLATE] if size is not None else []
        lp = log_marginal(trace, keep, include=lambda name: not name.startswith("_"))
        return {"lp": lp.reshape(-1).expand(size or 1)}

    def discrete_and_deterministic(self, values: Values, temperature: int = 1) -> Values:
        """Sample (temperature=1) or maximise (0) the enumerated sites given the latent values,
        with ``infer_discrete``, and record deterministic sites. Shapes (B, *site.shape)."""
        wanted = self.target.of_kind("discrete", "deterministic")

        def run(vals: Values, size: int | None) -> dict[str, torch.Tensor]:
            model = poutine.condition(self._model(size), vals)
            if self.target.has_enumeration:
                # A one-category site is not enumerated by Pyro; nothing to warn about.
                model = infer_discrete(model, first_available_dim=-self.nesting - 2,
                                       temperature=temperature, strict_enumeration_warning=False)
            trace = poutine.trace(model).get_trace(**self.target.kwargs)
            return {k: self._collapse(k, trace.nodes[k]["value"], size or 1) for k in wanted}

        return self._map(values, run, vmap="discrete") if wanted else {}

    def pointwise_log_likelihood(self, values: Values) -> Values:
        """Log-likelihood of each observation given the latent values, discrete sites summed out.

        Shapes: ``{obs_site: (B, *obs_site.batch_shape)}``. Masked observations contribute 0,
        ``poutine.scale`` factors are applied.
        """
        observed = self.target.of_kind("observed")

        def run(vals: Values, size: int | None) -> dict[str, torch.Tensor]:
            model = self._enum(poutine.condition(self._model(size), vals))
            trace = poutine.trace(model).get_trace(**self.target.kwargs)
            out = {}
            for name in observed:
                plates = [f.name for f in trace.nodes[name]["cond_indep_stack"] if f.vectorized]
                lp = log_marginal(trace, plates, include=lambda n, name=name: n == name)
                site = self.target.sites[name]
                full = (size or 1,) + (1,) * (self.nesting - len(site.batch_shape)) + site.batch_shape
                while lp.dim() > len(full):
                    lp = lp.squeeze(0)
                out[name] = lp.expand(full).reshape((size or 1,) + site.batch_shape)
            return out

        return self._map(values, run, vmap="log_likelihood")

    def predictive(self, values: Values) -> Values:
        """New draws of the observed sites given all latent values (continuous and discrete)."""
        observed = self.target.of_kind("observed")

        def run(vals: Values, size: int | None) -> dict[str, torch.Tensor]:
            model = poutine.condition(_Resample(observed)(self._model(size)), vals)
            trace = poutine.trace(model).get_trace(**self.target.kwargs)
            return {k: self._collapse(k, trace.nodes[k]["value"], size or 1) for k in observed}

        return self._map(values, run, vmap="predictive")

    # -- choosing the mode ---------------------------------------------------------------------------
    def check_vectorization(self, values: Values) -> bool:
        """Decide whether the model broadcasts over a batch plate by comparing the batched log
        density with one-at-a-time evaluation on ``values`` (B >= 2 recommended)."""
        self.vectorized = False
        sequential = self.log_density(values)
        try:
            self.vectorized = True
            batched = self.log_density(values)
            ok = _same_log_density(batched, sequential)
        except Exception:  # noqa: BLE001 - any failure means the model does not broadcast
            ok = False
        self.vectorized = bool(ok)
        return self.vectorized

    def check_vmap(self, values: Values) -> bool:
        """Whether ``torch.func.vmap`` of the model run one value at a time gives the same log
        density on the first two of ``values``; decided once."""
        if self.vmaps is None:
            probe = {k: v[:2] for k, v in values.items()}
            expected = self._one_at_a_time(probe, self._log_density)["lp"]
            try:
                self.vmaps = _same_log_density(self._vmapped(probe, self._log_density)["lp"], expected)
            except Exception:  # noqa: BLE001 - any failure means: one value at a time
                self.vmaps = False
        return self.vmaps
