"""The one exception type that reaches a user as a one-line message, and that line.

Anything the user can fix (a bad flag, a missing file, a checkpoint for another
model) is raised as :class:`GlowflowError`; the command line prints :func:`one_line_message`
of it and exits with status 2. Every other exception is a bug in glowflow. :func:`one_line` puts
another exception's text on one short line inside such a message.
"""

import re

# What torch's DataLoader puts around an exception it re-raises from a worker process:
# "Caught GlowflowError in DataLoader worker process 0.\nOriginal Traceback ...\n<Type>: <message>"
_WORKER_WRAPPER = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback", re.DOTALL)
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*: (.*)$")


class GlowflowError(Exception):
    """A problem with the user's input or environment, stated in one line."""


def one_line_message(err: BaseException) -> str:
    """The message of ``err`` as the command line prints it: for an error a DataLoader worker
    raised, the worker's own message without the traceback the DataLoader wraps it in."""
    message = str(err)
    if _WORKER_WRAPPER.match(message):
        last = message.rstrip().splitlines()[-1]
        found = _EXCEPTION_LINE.match(last)
        message = found.group(1) if found else last
    return message


def one_line(e: BaseException, limit: int = 300) -> str:
    """An exception's text on one line of at most ``limit`` characters, for error messages."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
