"""The recipe of the Glow paper as openai/glow trains it: ``--augment``'s shift range and the
``--preset`` configurations."""

from typing import Any, Dict

AUGMENT_SHIFT_FRACTION = 0.1
"""``--augment`` shifts each image by a whole number of pixels drawn uniformly from
``-s..s`` in each direction, ``s = max(1, floor(AUGMENT_SHIFT_FRACTION * side))`` (3 at 32
pixels), after openai/glow's width/height shift range of 0.1; the pixels shifted in repeat the
edge (Keras' 'nearest' fill). RGB images are also flipped left-right with probability 1/2."""
PRESETS: Dict[str, Dict[str, Any]] = {
    # Kingma & Dhariwal (2018), CIFAR-10, as openai/glow trains it: depth 32, 3 levels, width 512,
    # affine coupling, learnt top prior, batch 64, Adamax at 1e-3 warmed up over 10 epochs
    # (--epochs_warmup), Polyak averaging (0.999: its 1 - 1/steps-per-epoch at batch 64), shifts.
    "cifar10": {
        "dataset": "cifar10",
        "K": 32,
        "L": 3,
        "hidden_channels": 512,
        "flow_coupling": "affine",
        "learn_top": True,
        "batch_size": 64,
        "lr": 1e-3,
        "warmup": 10,
        "ema": 0.999,
        "augment": True,
    },
}
"""``--preset NAME``: flag values set where the command line does not set the flag itself."""
