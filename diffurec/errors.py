"""The one exception type the project raises for user errors (bad input, bad config)."""


class DiffuRecError(ValueError):
    """A user-facing error: the message names the file, key or column at fault.

    CLIs print it on one line and exit non-zero without a traceback.
    """
