"""The one exception type that means "the user asked for something we cannot do".

The command line prints its message as a single line and exits with status 2;
anything else is a bug and keeps its traceback.
"""


class UsageError(Exception):
    """Bad input from the user: a wrong option, a missing file, an unreachable hub."""
