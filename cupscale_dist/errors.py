"""User-facing errors: one type, shown by the CLI as one line, no traceback, non-zero exit."""

# A user's value echoed in an error is cut to this many characters: a 10 KB path or JSON value must not turn the
# one-line error into a page (issue 35).
SHOWN_CHARS = 40


class UserError(Exception):
    """A problem with what the user asked for; the message names the problem and the fix."""


def shown(value, limit: int = SHOWN_CHARS) -> str:
    """``repr(value)`` for an error message, cut to ``limit`` characters (an ellipsis marks the cut)."""
    if isinstance(value, str):
        text = repr(value[: limit + 1])  # cut before repr: a value may be megabytes
    else:
        try:
            text = repr(value)
        except ValueError:  # an int of over 4300 digits has no repr
            text = f"<{type(value).__name__} too long to show>"
    text = " ".join(text.split())  # one line: a tensor's repr has line breaks
    return text if len(text) <= limit else text[: limit - 3] + "..."
