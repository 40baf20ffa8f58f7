"""One error type for everything a user can fix: bad input, missing tools, clashes."""


class BottleError(Exception):
    """An error whose message is complete: it names the file, key or resource and says what to do.

    Task actions turn it into a doit TaskFailed, so users see the message, never a traceback.
    """
