"""The sizes of the validation and test splits a dataset is cut into when no flag says otherwise,
and the seed of the fixed partition of data that comes without a test split."""

VAL_FRACTION = 0.1
VAL_MAX = 5000
"""The default validation split (``--val_size`` not given): ``min(VAL_MAX, round(VAL_FRACTION * n))``
images of the ``n`` training images (:func:`default_val_size`), drawn by ``--seed``; it chooses the
best checkpoint, and the training split keeps the rest."""
TEST_FRACTION = 0.1
PARTITION_SEED = 0
"""Data without its own test split (a flat folder, an .npz with only ``images``) holds out
``max(1, round(TEST_FRACTION * n))`` images as its test split, drawn by a generator seeded
PARTITION_SEED (not ``--seed``: every command that reads the test split gets the same images);
the validation split is then carved from the rest like any training split's (81/9/10 in all)."""


def default_val_size(n_train: int) -> int:
    """Images the default validation split takes from ``n_train`` training images."""
    return min(VAL_MAX, int(round(VAL_FRACTION * n_train)))


def default_test_size(n: int) -> int:
    """Images held out as the test split of ``n`` images that come without one (at least 1)."""
    return max(1, int(round(TEST_FRACTION * n)))
