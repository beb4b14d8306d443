"""One exception type for user mistakes, so the CLI can print one line instead of a traceback."""


class UserError(ValueError):
    """A problem with the user's input (file, row, flag, checkpoint), reported as a single line."""

    exit_code = 2

    def __init__(self, message: str = "", exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


def model_source_error(name: str, error: Exception) -> UserError:
    """One line for a ``--model_name_or_path`` whose config would not load.

    A path that does not exist is named as a mistyped local directory, not judged by the hub's repo-id rules (which
    transformers reports for anything that is not a directory).
    """
    import os

    from huggingface_hub.utils import HFValidationError, validate_repo_id

    first = (str(error).strip() or type(error).__name__).splitlines()[0]
    if os.path.exists(os.path.expanduser(name)):
        return UserError(f"--model_name_or_path {name!r}: cannot load a model config ({first})")
    if name.startswith(("/", "./", "../", "~")):
        return UserError(f"--model_name_or_path {name!r}: no such directory")
    try:
        validate_repo_id(name)
    except HFValidationError:
        return UserError(f"--model_name_or_path {name!r}: not a local directory (and not a valid hub id)")
    return UserError(f"--model_name_or_path {name!r}: not a local directory, and the hub could not give it ({first})")
