"""Configuration: the one place where defaults live, one module per concern.

* :mod:`.architecture` -- :class:`GlowConfig`, a model (architecture, image shape, n_bits), and
  its limits;
* :mod:`.run` -- the run's flags, one section per command (:class:`TrainConfig`,
  :class:`SampleConfig`, :class:`OutlierConfig`, the detector's :class:`DetectorConfig`, over
  :class:`CommonConfig`), and :class:`RunConfig`, all of them as the command line fills them;
* :mod:`.recipe` -- the paper's recipe: ``--augment``'s shift range, ``--preset``;
* :mod:`.splits` -- the default validation and test split sizes, the fixed partition's seed;
* :mod:`.paths` -- the default output folders and :func:`dataset_slug`;
* :mod:`.reproduce` -- :func:`training_command`, the ``glowflow --train`` that reproduces a run;
* :mod:`.fields` -- strict field types (:func:`check_field_types`, :func:`is_int`).

The command line builds its flags from these fields and choices, so a default changed here
changes everywhere. Every dataclass validates every field strictly, because values also come
from checkpoints, which may be corrupt or crafted: a bad value is a one-line
:class:`~glowflow.errors.GlowflowError` naming the field, raised before anything is built or written.
"""

from glowflow.config.architecture import (
    FLOW_COUPLINGS,
    FLOW_PERMUTATIONS,
    FULL_COVARIANCE_MAX_DIMS,
    MAX_IMAGE_DIMS,
    MAX_IMAGE_SIZE,
    MAX_K,
    MAX_L,
    MAX_PARAMETERS,
    PRIOR_FIT_BEFORE_ITS_FIELD,
    PRIOR_FITS,
    GlowConfig,
)
from glowflow.config.fields import check_field_types, check_int_range, is_int, is_number
from glowflow.config.paths import OUTPUT_ROOT, SLUG_LENGTH, dataset_slug
from glowflow.config.recipe import AUGMENT_SHIFT_FRACTION, PRESETS
from glowflow.config.reproduce import TRAINING_COMMAND_FIELDS, training_command
from glowflow.config.run import (
    AMP_CHOICES,
    EVAL_BATCH_SIZE,
    IMAGE_TRANSFORMS,
    OOD_PRECISIONS,
    SEED_LIMIT,
    SEED_STRIDE,
    CommonConfig,
    DetectorConfig,
    OutlierConfig,
    RunConfig,
    SampleConfig,
    TrainConfig,
)
from glowflow.config.splits import (
    PARTITION_SEED,
    TEST_FRACTION,
    VAL_FRACTION,
    VAL_MAX,
    default_test_size,
    default_val_size,
)

__all__ = [
    "AMP_CHOICES",
    "OOD_PRECISIONS",
    "AUGMENT_SHIFT_FRACTION",
    "EVAL_BATCH_SIZE",
    "FLOW_COUPLINGS",
    "FLOW_PERMUTATIONS",
    "FULL_COVARIANCE_MAX_DIMS",
    "PRIOR_FITS",
    "PRIOR_FIT_BEFORE_ITS_FIELD",
    "MAX_IMAGE_DIMS",
    "MAX_IMAGE_SIZE",
    "MAX_K",
    "MAX_L",
    "MAX_PARAMETERS",
    "OUTPUT_ROOT",
    "PARTITION_SEED",
    "PRESETS",
    "SEED_LIMIT",
    "SEED_STRIDE",
    "SLUG_LENGTH",
    "TEST_FRACTION",
    "TRAINING_COMMAND_FIELDS",
    "VAL_FRACTION",
    "VAL_MAX",
    "CommonConfig",
    "DetectorConfig",
    "IMAGE_TRANSFORMS",
    "GlowConfig",
    "OutlierConfig",
    "RunConfig",
    "SampleConfig",
    "TrainConfig",
    "check_field_types",
    "check_int_range",
    "dataset_slug",
    "default_test_size",
    "default_val_size",
    "is_int",
    "is_number",
    "training_command",
]
