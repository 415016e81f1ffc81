"""The one error type a user sees.

Every problem caused by what the user passed (a missing file, a mask of the wrong size, an unknown
scheduler) raises `UserError` with a one-line message that says what was wrong and how to fix it. The
CLI prints the message and exits with code 2; library callers catch it like any other exception.
"""


class UserError(ValueError):
    """Bad input from the user: a one-line, actionable message."""

    exit_code = 2

    def __init__(self, message: str):
        # One line only: the CLI prints it as is, without a traceback.
        super().__init__(" ".join(str(message).split()))
