"""The one exception type for bad user input."""


class UserError(Exception):
    """A problem with what the user gave us (config, data file, checkpoint).

    `run.py` prints the message as one paragraph, without a traceback, and exits with code 2.
    The message must name the offending file, key or value.
    """
