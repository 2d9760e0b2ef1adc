"""glowflow: Glow (Kingma & Dhariwal, 2018) for PyTorch."""

from glowflow.checkpoint import load_model
from glowflow.config import GlowConfig, RunConfig
from glowflow.errors import GlowflowError
from glowflow.model import Glow
from glowflow.pixels import bits_per_dim, dequantize, postprocess, preprocess

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
]
__version__ = "0.1.0"


def load_checkpoint(path, map_location="cpu"):
    """Rebuild a model from a glowflow checkpoint alone (see :mod:`glowflow.checkpoint`)."""
    return load_model(path, map_location=map_location)
