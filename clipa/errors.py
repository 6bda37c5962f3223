"""User-facing errors. The CLI turns these into a one-line message and exit code 2."""


class ClipaError(Exception):
    """A problem with the user's input (recipe, path, name) that they can fix.

    The message names the key, path or value and says how to fix it.
    """
