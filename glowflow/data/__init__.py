"""glowflow.data: every dataset glowflow trains on or tests against, ready for a model.

It owns finding, reading and preprocessing the 13 named datasets, the user's own image folders
and .npz files, and the development sets (class subsets, flips, synthetic sets); converting a
dataset to another image shape; and the DataLoader and training sampler that feed a model.

Every dataset yields ``(image, label)``: ``image`` a float32 tensor (C, H, W) in [0, 1] equal to
torchvision's ``ToTensor`` of the preprocessed uint8 pixels (so ``round(image * 255)`` gives the
pixels back exactly), ``label`` an int64 scalar (a float32 multi-hot vector for ChestMNIST).

Modules, imports running one way: ``resolve`` (load by name or path) imports ``specs`` (the 13
names), ``custom`` (the user's files) and ``devsets`` (development sets); ``specs`` imports
``readers`` (one per on-disk format); ``custom`` imports ``partition`` (the train/validation/test
cuts: the test split held out of data without one, the validation split carved from a training
split); all of them import ``datasets`` (the dataset classes, image crop and resize). ``loaders``
(DataLoader, training sampler) imports none of them.
"""

from glowflow.data.datasets import DatasetInfo, ImageFileDataset, ImageTensorDataset, match_shape
from glowflow.data.devsets import SYNTHETIC, is_derived
from glowflow.data.loaders import EpochSampler, make_loader
from glowflow.data.partition import resolve_val_size, split_validation, subset
from glowflow.data.resolve import SPLITS, dataset_info, load_dataset, load_scored_images
from glowflow.data.specs import DATASET_NAMES

__all__ = [
    "DATASET_NAMES",
    "SPLITS",
    "SYNTHETIC",
    "DatasetInfo",
    "EpochSampler",
    "ImageFileDataset",
    "ImageTensorDataset",
    "dataset_info",
    "is_derived",
    "load_dataset",
    "load_scored_images",
    "make_loader",
    "match_shape",
    "resolve_val_size",
    "split_validation",
    "subset",
]
