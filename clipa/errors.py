"""User-facing errors. The CLI turns these into a one-line message and exit code 2."""


import difflib
import unicodedata


class ClipaError(Exception):
    """A problem with the user's input (recipe, path, name) that they can fix.

    The message names the key, path or value and says how to fix it.
    """


def first_line(message: object, limit: int | None = None) -> str:
    """The first line of a library's error message (torch and open_clip append paragraphs of advice
    that do not apply to a clipa user), at most `limit` characters; "" for an empty message."""
    lines = str(message).strip().splitlines()
    return lines[0][:limit] if lines else ""


def did_you_mean(value: str, allowed, n: int = 1, cutoff: float = 0.6, quote: str = '"', prefix: str = "") -> str:
    """'; did you mean "x"?' naming the (up to `n`) closest allowed names, or "" when none is close.
    `prefix` goes before each name (a key's table: 'optim.'), `quote` around it."""
    close = difflib.get_close_matches(value, list(allowed), n=n, cutoff=cutoff)
    return f"; did you mean {', '.join(f'{quote}{prefix}{c}{quote}' for c in close)}?" if close else ""


def check_one_of(value: str, allowed, what: str, key: str = "--dataset") -> None:
    """`value` is one of `allowed`, or a one-line error naming `key` and suggesting the closest."""
    if value not in allowed:
        raise ClipaError(f"{key}: unknown {what} \"{value}\"{did_you_mean(value, allowed)} (available: {', '.join(allowed)})")


def shown(value: object) -> str:
    """A value as an error message quotes it: strings in double quotes, anything else as its repr."""
    return f'"{value}"' if isinstance(value, str) else repr(value)


def printable(text: str) -> str:
    """`text` with every control or format character (ESC, CR, bidi overrides, ...) written as its escape:
    a recipe value echoed to a terminal cannot rewrite or hide what is shown around it."""
    return "".join(c if c in "\t" or unicodedata.category(c)[0] != "C" else repr(c)[1:-1] for c in text)
