"""User-facing errors. The CLI turns these into a one-line message and exit code 2."""


class ClipaError(Exception):
    """A problem with the user's input (recipe, path, name) that they can fix.

    The message names the key, path or value and says how to fix it.
    """


def first_line(message: object, limit: int | None = None) -> str:
    """The first line of a library's error message (torch and open_clip append paragraphs of advice
    that do not apply to a clipa user), at most `limit` characters; "" for an empty message."""
    lines = str(message).strip().splitlines()
    return lines[0][:limit] if lines else ""
