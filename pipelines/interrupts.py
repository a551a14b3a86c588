"""Ctrl-C and SIGTERM stop a run the same way: what is stored stays, the MLflow run is marked KILLED, and a rerun
resumes.

SIGTERM is what Slurm (at the time limit, or ``scancel``), Kubernetes and ``kill`` send. Python's default is to
die at once, skipping every ``finally``; :func:`install_sigterm_handler` turns it into :class:`Terminated`, a
``KeyboardInterrupt``, so the code paths that already handle Ctrl-C handle it too. ``ray.init`` installs its own
SIGTERM handler (``sys.exit``), so :func:`pipelines.execution.init_ray` installs ours again after it.
"""

from __future__ import annotations

import signal
import threading


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM (handled like Ctrl-C)."""


#: set when SIGTERM arrived: Ray's blocking calls turn any KeyboardInterrupt raised inside them into a new, plain
#: KeyboardInterrupt, so the exception's type alone cannot tell SIGTERM from Ctrl-C
_received: dict[str, bool] = {"sigterm": False}


def _raise_terminated(signum, frame) -> None:
    _received["sigterm"] = True
    raise Terminated(f"received signal {signal.Signals(signum).name}")


def was_terminated(exc: BaseException) -> bool:
    """True when ``exc`` (a KeyboardInterrupt) was caused by SIGTERM rather than Ctrl-C."""
    return isinstance(exc, Terminated) or _received["sigterm"]


def install_sigterm_handler() -> bool:
    """Make SIGTERM raise :class:`Terminated` in the main thread. Returns False (nothing done) outside the main
    thread, where Python cannot install signal handlers (e.g. a notebook kernel's worker thread)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(signal.SIGTERM, _raise_terminated)
    return True


def sigterm_handler_installed() -> bool:
    """True when SIGTERM currently raises :class:`Terminated` (the ``semidisc`` command installs it)."""
    return signal.getsignal(signal.SIGTERM) is _raise_terminated
