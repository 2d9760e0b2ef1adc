"""Old home of training, kept so that ``from glowflow.train import train, Trainer, evaluate_bpd``
and the other names keep working: they live in the package :mod:`glowflow.training`, one concern
per module. Nothing in glowflow imports this module."""

from glowflow.training import *  # noqa: F401,F403
from glowflow.training import __all__  # noqa: F401
