"""Graceful stops: SIGINT and SIGTERM end a fit at the next step boundary instead of mid-step.

:class:`StopRequests` turns the signals into a flag that engines poll between steps; the engine
then writes its checkpoint (or keeps its completed draws) and :func:`stopped` builds the
exception that ends the run: :class:`Interrupted` (a ``KeyboardInterrupt``, exit code 130)
for SIGINT, :class:`Terminated` (a ``SystemExit`` with code 143) for SIGTERM. Both derive from
:class:`RunStopped`.
"""

import signal
import threading
from types import FrameType, TracebackType
from typing import Any

__all__ = ["RunStopped", "Interrupted", "Terminated", "StopRequests", "stopped"]


class RunStopped(BaseException):
    """A fit stopped by a signal after saving its state.

    Attributes:
        signum: the signal number.
        exit_code: ``128 + signum``, the shell's convention (130 for SIGINT, 143 for SIGTERM).
        run_dir: the run folder holding the checkpoint or the partial result, if any.
        result: a partial :class:`~latentkit.inference.Result` (MCMC draws completed so far), if any.
    """

    signum: int = signal.SIGINT
    run_dir: str | None = None
    result: Any = None

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)


class Interrupted(RunStopped, KeyboardInterrupt):
    """SIGINT (Ctrl-C) stopped the fit; exit code 130."""


class Terminated(RunStopped, SystemExit):
    """SIGTERM stopped the fit; exit code 143 when uncaught."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.code = 128 + signal.SIGTERM


def stopped(signum: int, message: str, *, run_dir: str | None = None, result: Any = None) -> RunStopped:
    """The exception for a run stopped by ``signum``, carrying ``message`` and what was kept."""
    error: RunStopped = Terminated(message) if signum == signal.SIGTERM else Interrupted(message)
    error.signum, error.run_dir, error.result = signum, run_dir, result
    return error


class StopRequests:
    """Context manager: while active, SIGINT/SIGTERM set :attr:`signum` instead of stopping.

    A second signal stops at once (``KeyboardInterrupt``), for a step that hangs. The previous
    handlers are restored on exit. Outside the main thread (where Python cannot install signal
    handlers) it does nothing, and :attr:`signum` stays None.

    Example:
        >>> with StopRequests() as stop:
        ...     for step in range(3):
        ...         if stop():
        ...             break
        >>> stop.signum is None
        True
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __call__(self, *_: Any) -> bool:
        """Whether a stop was requested (arguments, e.g. an iteration, are ignored)."""
        return self.signum is not None

    def request(self, signum: int) -> None:
        """Ask for a stop as if ``signum`` had arrived (used by distributed runs to agree)."""
        if self.signum is None:
            self.signum = signum

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt(f"second signal {signal.Signals(signum).name}: stopping at once")
        self.signum = signum

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
