"""The exception for input the user can fix (library.io.errors, the scripts' error boundary, re-exports it)."""


class InputError(ValueError):
    """Input the user can fix. The message names the input (flag and/or path) and what was expected."""
