"""The one exception type users see.

Library code raises `SeqgenError` with a message a user can act on (file, line, numbers, what to do);
the CLI prints it as one line `seqgen: error: ...` and exits with status 2. Tracebacks only with --debug.
"""


class SeqgenError(Exception):
    """A user-facing error: the message is one line naming the file/argument and what to do."""
