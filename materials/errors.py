"""The errors semidisc raises on purpose, under one base class.

Every error a user can meet derives from :class:`SemidiscError`, so a notebook can catch them all with one
``except SemidiscError``, and the command line maps them to an exit code without a traceback:

* :class:`InputError` (exit code 2): something the user gave is wrong (a config key, a file, a column, a model
  name, an output folder that holds another run). The message names the item and the fix. It is also a
  ``ValueError``, as the errors it replaces were.
* :class:`RunError` (exit code 1): the inputs were valid but the work failed (a DFT reference that did not
  converge, a training process that crashed). It is also a ``RuntimeError``.

Errors that are neither (a bug) keep their own type and show a traceback.
"""

from __future__ import annotations


class SemidiscError(Exception):
    """Base class of semidisc's errors. ``exit_code``: what the ``semidisc`` command exits with (2: fix the input,
    1: the run failed)."""

    exit_code: int = 1


class InputError(SemidiscError, ValueError):
    """A user input is invalid; the message names it and says how to fix it (exit code 2)."""

    exit_code = 2


class RunError(SemidiscError, RuntimeError):
    """Valid inputs, failed work (exit code 1)."""

    exit_code = 1
