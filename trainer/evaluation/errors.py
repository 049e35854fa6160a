"""The one error type for unusable evaluation data."""


class EvalDataError(ValueError):
    """Evaluation data that cannot be used. The message names the file and the record."""
