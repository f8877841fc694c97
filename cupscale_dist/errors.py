"""User-facing errors: one type, shown by the CLI as one line, no traceback, non-zero exit."""


class UserError(Exception):
    """A problem with what the user asked for; the message names the problem and the fix."""
