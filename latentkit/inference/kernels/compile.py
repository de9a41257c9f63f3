"""Compile a function of tensors into one graph that runs without Python per operation.

The MCMC kernels call small functions tens of thousands of times (a potential and its gradient,
a NUTS leaf); issued from Python, each tensor operation costs a few microseconds of interpreter
and dispatch time, which on small models is most of the run.
"""

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from latentkit.inference.kernels.discrete_hmm import fused_kernels
from latentkit.inference.kernels.simplify import simplify

__all__ = ["Backend", "TensorPacking", "compile_function", "points_around"]

Backend = Literal["torchscript", "inductor"]

# Distances (in unconstrained units, standard normal directions) from a trace point of the points
# where a compiled potential or step must reproduce the eager one.
CHECK_SCALES = (0.0, 0.1, 1.0, 3.0)


def points_around(position: torch.Tensor) -> list[torch.Tensor]:
    """``position`` moved by each of ``CHECK_SCALES`` in fixed random directions (seed 0), for
    :func:`compile_function`'s probes.

    Example:
        >>> [tuple(point.shape) for point in points_around(torch.zeros(4, 2))]
        [(4, 2), (4, 2), (4, 2), (4, 2)]
    """
    generator = torch.Generator(device=position.device).manual_seed(0)
    return [position + scale * torch.randn(position.shape, generator=generator, dtype=position.dtype,
                                           device=position.device) for scale in CHECK_SCALES]


def compile_function(
    fn: Callable[..., tuple[torch.Tensor, ...]],
    example: tuple[torch.Tensor, ...],
    *,
    probes: Sequence[tuple[torch.Tensor, ...]] = (),
    backend: Backend = "torchscript",
    name: str = "the function",
) -> Callable[..., tuple[torch.Tensor, ...]] | None:
    """Compile ``fn`` for tensors shaped like ``example``, checked against ``fn`` itself.

    ``make_fx`` records the aten operations of one call of ``fn`` (autograd included: a
    gradient becomes plain operations; Python bookkeeping such as packing arguments into named
    tuples costs nothing at run time; Pyro's HMMs sum out their states with the fused kernel of
    :func:`~latentkit.inference.kernels.discrete_hmm.fused_kernels`), and ``backend``
    runs that graph:

    - ``"torchscript"``: ``torch.jit.trace`` + ``freeze``, run by TorchScript's Static Runtime
      (its interpreter where that cannot take the graph); compiles in about 0.1 s, then runs each
      operation for about 0.4 us (0.7 us in the interpreter) instead of 1-5 us from Python.
    - ``"inductor"``: ``torch.compile`` fuses the graph's operations into generated C++ loops
      (called from C++, ``cpp_wrapper``); a C++ compiler runs first, 6-50 s (1-5 s with
      inductor's on-disk cache), so it pays off for long runs of heavy functions only.

    A recording freezes Python control flow, so the compiled function must reproduce ``fn``
    on ``example`` and on every probe (outputs equal up to floating-point reassociation,
    infinities and NaNs in the same places, integer and boolean outputs exactly); otherwise, or
    when compilation fails (e.g. no C++ compiler for inductor), this warns and returns None:
    the caller then runs ``fn`` eagerly, slower and always correct.

    Args:
        fn: a function of tensors returning a tuple of tensors.
        example: the arguments to record with; the compiled function takes tensors of the same
            shapes and dtypes.
        probes: more arguments on which the compiled function is checked.
        backend: ``"torchscript"`` or ``"inductor"``.
        name: what ``fn`` is, for the warning.

    Returns:
        The compiled function, or None.

    Example:
        >>> def energy(z):
        ...     return 0.5 * z.square().sum(-1), z
        >>> compiled = compile_function(energy, (torch.zeros(4, 2),), probes=[(torch.ones(4, 2),)])
        >>> compiled(torch.full((4, 2), 2.0))[0]
        tensor([4., 4., 4., 4.])
    """
    # make_fx tells inputs apart by identity: a tensor passed twice would become one input.
    example = tuple(tensor.clone() for tensor in example)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            # torch.jit is deprecated in favour of torch.compile/export, but it is the one runtime
            # that runs a graph without per-operation Python overhead and without a compile step
            # of seconds; if a future torch drops it, the except below keeps us eager.
            warnings.simplefilter("ignore", DeprecationWarning)
            with _quick_recording():
                with fused_kernels():
                    graph = make_fx(lambda *args: fn(*args))(*example)  # any callable: a bound method too
                simplify(graph)
            _ = graph.code  # a lazy module's code, generated now: TorchScript and dynamo need the real one
            if backend == "inductor":
                compiled = torch.compile(graph, backend="inductor", dynamic=False, fullgraph=True,
                                         options={"cpp_wrapper": True})
            else:
                compiled = torch.jit.freeze(torch.jit.trace(_Interpreted(graph), example, check_trace=False).eval())
                if all(tensor.device.type == "cpu" for tensor in example):
                    compiled = _static_runtime(compiled)
            checks = [example, *probes]
            fast = [compiled(*args) for args in checks]  # inductor compiles here
        with fused_kernels():  # the recording is checked; the kernels, against Pyro, by their tests
            eager = [fn(*args) for args in checks]
    except Exception as error:  # noqa: BLE001 - any compilation failure means: stay eager
        warnings.warn(f"jit: tracing {name} failed ({backend}, {type(error).__name__}: {error}); running it "
                      "eagerly (slower, always correct).", stacklevel=3)
        return None
    if not all(_close(a, b) for outputs in zip(eager, fast, strict=True) for a, b in zip(*outputs, strict=True)):
        warnings.warn(f"jit: the traced version of {name} differs from the eager one (value-dependent Python "
                      "control flow?); running it eagerly (slower, always correct). Pass jit=False to skip tracing.",
                      stacklevel=3)
        return None
    return compiled


@contextlib.contextmanager
def _quick_recording() -> Iterator[None]:
    """Spare a recording two costs that grow with its length (private PyTorch API; where it is
    missing, recordings are slower, not different).

    - ``make_fx`` notes each result's shape as a fake tensor, made under a new
      ``FakeTensorMode`` per operation where none is ambient, and each new mode saves the Python
      stack (deep under Pyro's handlers); an ambient tracing context's one mode is used instead.
    - Every rewrite of :func:`~latentkit.inference.kernels.simplify.simplify` regenerates the
      graph's Python code; lazy graph modules generate it once, when it first runs.

    A ``pyro.markov`` HMM of T = 100 (11,000 operations recorded): compiling its potential took
    8.5 s, 5.9 s with the first, 4.7 s with both.
    """
    try:
        from torch._guards import TracingContext, tracing
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx._lazy_graph_module import _use_lazy_graph_module
    except ImportError:
        yield
        return
    with tracing(TracingContext(FakeTensorMode(allow_fallback_kernels=True))), _use_lazy_graph_module(True):
        yield


class _Interpreted(torch.nn.Module):
    """A recorded graph run node by node by ``torch.fx.Interpreter``, for ``torch.jit.trace``.

    The tracer notes the Python source line of every operation it records, reading it from the
    code of the calling frame. A graph's generated ``forward`` has a line per operation, so each
    note read a function as long as the graph: quadratic in its length (a ``pyro.markov`` HMM of
    T = 300, 17,600 operations: 7.3 s to trace). Run from the interpreter's few lines, the same
    recording takes 1.1 s and gives the same TorchScript graph.
    """

    def __init__(self, graph: torch.fx.GraphModule) -> None:
        super().__init__()
        self.graph = graph

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.fx.Interpreter(self.graph).run(*args)


def _static_runtime(module: torch.jit.ScriptModule) -> Callable[..., tuple[torch.Tensor, ...]]:
    """The frozen ``module`` run by TorchScript's Static Runtime, else the module itself.

    Static Runtime plans memory and calls operators with much less overhead per operation than
    the TorchScript interpreter: a NUTS step of eight schools (about 440 small operations) takes
    0.20 ms instead of 0.33 ms. It is reached through ``torch._C`` (PyTorch ships it for
    serving, without a public Python API), so any failure to convert keeps the interpreter. It
    runs on CPU only.
    """
    try:
        return torch._C._jit_to_static_module(module._c)
    except Exception:  # noqa: BLE001 - an unsupported graph or a torch without Static Runtime
        return module


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to floating-point reassociation, infinities and NaNs in the same places."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point():
        return bool(torch.equal(a, b))
    tol = 1e-9 if a.dtype == torch.float64 else 1e-4
    return bool(torch.allclose(a, b, rtol=tol, atol=tol, equal_nan=True))


class TensorPacking:
    """Stack many small tensors into one tensor per (dtype, shape) group, and back.

    A compiled graph pays about a microsecond per input and per output tensor, as much as an
    operation: a NUTS step that carries 45 per-chain tensors from one call to the next carries
    five stacks instead.

    Args:
        tensors: examples of the tensors to pack, in order.

    Example:
        >>> packing = TensorPacking([torch.zeros(2), torch.ones(2), torch.zeros(2, dtype=torch.bool)])
        >>> [tuple(group.shape) for group in packing.pack([torch.zeros(2), torch.ones(2), torch.ones(2) > 0])]
        [(2, 2), (1, 2)]
    """

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        keys = [(tensor.dtype, tuple(tensor.shape)) for tensor in tensors]
        self.groups = list(dict.fromkeys(keys))
        self.members = [[i for i, key in enumerate(keys) if key == group] for group in self.groups]
        # Where each tensor lies: (group, position in the group).
        self.slots = [(self.groups.index(key), self.members[self.groups.index(key)].index(i))
                      for i, key in enumerate(keys)]

    def pack(self, tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """One stacked tensor per group, ``(group size, *shape)``."""
        return tuple(torch.stack([tensors[i] for i in members]) for members in self.members)

    def unpack(self, packed: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The tensors, in their original order."""
        unbound = [group.unbind(0) for group in packed]
        return [unbound[group][position] for group, position in self.slots]
