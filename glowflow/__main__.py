"""``python -m glowflow``: the same program as the ``glowflow`` command.

A Ctrl-C while the command line module loads ends the program with one line and status 130
(the handler below); from then on ``glowflow.cli.main`` handles it (torch loads inside it).
"""

import os
import signal


def _interrupted_while_loading(signum, frame):
    os.write(2, b"glowflow: interrupted\n")
    os._exit(130)


signal.signal(signal.SIGINT, _interrupted_while_loading)
from glowflow.cli import run  # noqa: E402 -- after the handler, so that a Ctrl-C here is one line

signal.signal(signal.SIGINT, signal.default_int_handler)

if __name__ == "__main__":
    run()
