"""The one error type for unusable evaluation data."""

from xling.api.errors import InputError


class EvalDataError(InputError):
    """Evaluation data that cannot be used: names the file (and line) and the record."""
