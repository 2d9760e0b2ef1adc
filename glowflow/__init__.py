"""glowflow: Glow (Kingma & Dhariwal, 2018) for PyTorch.

The public names load lazily (PEP 562): ``import glowflow`` and ``import glowflow.cli`` do not
import torch, so the command line starts fast and a Ctrl-C during start-up is handled by it.
``glowflow.Glow`` or ``from glowflow import Glow`` imports the module that defines the name.
"""

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "Glow": "glowflow.model",
    "GlowConfig": "glowflow.config",
    "RunConfig": "glowflow.config",
    "GlowflowError": "glowflow.errors",
    "bits_per_dim": "glowflow.pixels",
    "dequantize": "glowflow.pixels",
    "postprocess": "glowflow.pixels",
    "preprocess": "glowflow.pixels",
    "load_checkpoint": "glowflow.checkpoint",
    "from_pretrained": "glowflow.checkpoint",
    "save_pretrained": "glowflow.pretrained",
    "OutlierDetector": "glowflow.ood.detector",
}

__all__ = [
    "Glow",
    "GlowConfig",
    "RunConfig",
    "GlowflowError",
    "bits_per_dim",
    "dequantize",
    "postprocess",
    "preprocess",
    "load_checkpoint",
    "from_pretrained",
    "save_pretrained",
    "OutlierDetector",
]


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'glowflow' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
