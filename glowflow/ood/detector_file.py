"""Reading a saved :class:`glowflow.ood.OutlierDetector` (.npz of plain arrays, no pickle) and
checking all of it before it is used: the file (a regular file, its declared sizes, through
:func:`glowflow.data.npzfile.open_npz`), the reference (:func:`reference_from_arrays`), the
settings and the held-back scores (:mod:`glowflow.ood.checks`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np

from glowflow.data.npzfile import open_npz
from glowflow.errors import GlowflowError
from glowflow.ood import checks
from glowflow.ood.codecs import CODECS
from glowflow.ood.reference import Reference, reference_from_arrays

DETECTOR_FORMAT = "glowflow-ood-detector-v1"


@dataclass
class DetectorFile:
    """What a detector file holds, checked: the reference, the settings (keyword arguments of
    :class:`OutlierDetector`), the fingerprint of the model it was fitted for, and the held-back
    scores (n, len(names)) of every score in ``names``."""

    reference: Reference
    settings: dict
    model_sha256: str
    names: Tuple[str, ...]
    held: np.ndarray


def read_detector_file(path: str) -> DetectorFile:
    """The checked content of the detector file at ``path``; a one-line GlowflowError saying what is
    wrong otherwise (missing, not a regular file, too large, damaged, another format, or an entry
    that is not finite, of the wrong shape or type). Held-back scores may hold a NaN (an image with
    a non-finite statistic counts as the most outlying); the thresholds they give are checked by
    :meth:`OutlierDetector.load`."""
    with open_npz(path, "outlier detector", checks.DETECTOR_MAX_BYTES) as (data, _):
        if "detector_format" not in data.files or str(data["detector_format"]) != DETECTOR_FORMAT:
            raise GlowflowError(f"{path} is not a {DETECTOR_FORMAT} file (written by OutlierDetector.save)")
        reference = reference_from_arrays(data, path)
        settings = checks.settings(checks.text(data, "detector_settings", path), path, CODECS)
        fingerprint = checks.text(data, "model_sha256", path)
        names = checks.names(data, "threshold_score_names", path)
        held = checks.array(data, "threshold_scores", path, (None, len(names)), finite=False)
    return DetectorFile(reference, settings, fingerprint, names, held)
