"""Test-session settings.

One intra-op thread for the test process and every process it starts, whatever the shell sets:
the tests run many tiny operations, where OpenMP's spinning threads only cost time, and on a busy
machine oversubscribed OpenMP barriers slowed the suite down a hundredfold; and a training run in a
child process must round as the test process does, since the resume tests compare their weights
bit for bit (with OMP_NUM_THREADS=2 in the shell, the SIGTERM resume test failed). Speed is
measured in benchmarks/, not here.
"""

import os

os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.helpers import write_tiny_datasets  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The command-line tests' tiny datasets (tests/helpers.py's write_tiny_datasets), once per module."""
    return write_tiny_datasets(tmp_path_factory.mktemp("data"))
