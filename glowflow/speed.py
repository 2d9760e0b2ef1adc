"""Old home of the speed switches, kept so that ``glowflow.speed.eager(model)`` and the other
names keep working: they live in :mod:`glowflow.runtime`."""

from glowflow.runtime import autocast_context, compile_model, eager

__all__ = ["autocast_context", "compile_model", "eager"]
