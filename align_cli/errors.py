"""The one base class of every error a user can fix: the CLI prints its message as one red line (exit 2).

Anything else is a bug in align or a library and keeps its traceback."""


class AlignError(Exception):
    """Bad input or a known fault; the message names what is wrong and where (file, line, key)."""
