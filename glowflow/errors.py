"""The one exception type that reaches a user as a one-line message.

Anything the user can fix (a bad flag, a missing file, a checkpoint for another
model) is raised as :class:`GlowflowError`; the command line prints its message
and exits with status 2. Every other exception is a bug in glowflow.
"""


class GlowflowError(Exception):
    """A problem with the user's input or environment, stated in one line."""
