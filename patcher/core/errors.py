"""One exception type for every failure a user can fix.

The CLI prints its message as a single line and exits with status 2; the message always says what
was wrong and what to do about it."""


class PatcherError(Exception):
    """A user-facing error: one line naming the problem and the fix."""
