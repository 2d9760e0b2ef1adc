"""Test-session settings.

One intra-op thread for the test process and every process it starts: the tests run many tiny
operations, where OpenMP's spinning threads only cost time, and on a busy machine oversubscribed
OpenMP barriers slowed the suite down a hundredfold. Speed is measured in benchmarks/, not here.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
