"""User-facing errors.

Everything a user can cause (a wrong path, a bad prompt, an unsupported dtype) raises a
subclass of :class:`BespokeError` with a one-line message naming the problem. Front ends
(CLI, demo) print the message and no traceback; anything else is a bug and keeps its trace.
"""


class BespokeError(Exception):
    """Base class for errors caused by user input rather than by a bug."""


class BaseLoadError(BespokeError):
    """The requested base model cannot be found, read or used."""


class InvalidRequest(BespokeError):
    """A generation request (prompt, size, dtype, scheduler, ...) is not valid."""


class EvaluationError(BespokeError):
    """An evaluation cannot run as asked (no images, no evaluator for this base, a model path that is not there)."""
