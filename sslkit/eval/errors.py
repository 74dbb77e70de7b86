"""The error of the evaluation package."""

from ..errors import SslkitError


class EvalError(SslkitError):
    """An evaluation that cannot run as asked (one line)."""
