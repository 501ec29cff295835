"""Error types raised on bad user input."""


class EMOInputError(ValueError):
    """A user-supplied input (file, tensor, argument) is unusable.

    The message names the input, says what was expected and how to fix it. Raised instead of silently
    "correcting" the input, so a bad run fails early and loudly.
    """
