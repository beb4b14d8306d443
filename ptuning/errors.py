"""One exception type for user mistakes, so the CLI can print one line instead of a traceback."""


class UserError(ValueError):
    """A problem with the user's input (file, row, flag, checkpoint), reported as a single line."""

    exit_code = 2
