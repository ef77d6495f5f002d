"""The one exception type users see. Its message is one line that names the file or module and the problem."""


class B4MError(Exception):
    """A problem with the user's input or files, reported as one line (the CLI prints it without a traceback)."""


class DivergedError(B4MError):
    """A training run's loss became NaN or Inf (the settings, not the input, are usually to blame)."""
