"""The one exception type for bad user input (data, config, paths).

The CLI turns it into a one-line message and exit code 2; anything else is a bug.
"""


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception as one short line (MLflow's HTTP errors carry the whole request)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class FersearchError(Exception):
    """A problem the user can fix: bad data, an unknown name, a value out of range."""


class DivergedError(FersearchError):
    """Training produced a non-finite loss (diverged); the run cannot go on."""
