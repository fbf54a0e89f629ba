"""The one exception type for bad user input (data, config, paths).

The CLI turns it into a one-line message and exit code 2; anything else is a bug.
"""


class FersearchError(Exception):
    """A problem the user can fix: bad data, an unknown name, a value out of range."""


class DivergedError(FersearchError):
    """Training produced a non-finite loss (diverged); the run cannot go on."""
