"""The one exception type for user mistakes.

The CLI prints ``str(error)`` on one line (no traceback) and exits with status 2. Messages name the
offending value and say what would be accepted.
"""


class MimkitError(Exception):
    """A user-facing error: bad config, bad data, bad checkpoint."""
