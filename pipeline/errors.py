"""The one exception type a stage turns into a one-line message instead of a traceback."""


class UserError(Exception):
    """Bad input, params or environment that the user can fix; ``str()`` is one line."""
