"""The one exception type users see. Its message is one line that names the file or module and the problem."""


class B4MError(Exception):
    """A problem with the user's input or files, reported as one line (the CLI prints it without a traceback)."""


class Interrupted(B4MError):
    """A run stopped by a signal (SIGINT, SIGTERM); ``signum`` says which (the CLI exits with 128 + signum)."""

    def __init__(self, message: str, signum: int = 2):
        super().__init__(message)
        self.signum = signum


class DivergedError(B4MError):
    """A training run's loss became NaN or Inf (the settings, not the input, are usually to blame)."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (or its type's name): what a one-line error quotes of a library's
    multi-line one."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
