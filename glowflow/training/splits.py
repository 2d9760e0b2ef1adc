"""The data a training run reads: its training, validation and test splits, checked against the
model (image shape, labels a class-conditional model can take), and their loaders.

The validation split (``--val_size`` images carved from the training split,
:func:`glowflow.data.split_validation`) alone chooses the best checkpoint; the test split is
evaluated every epoch for the report and never chooses anything.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch
from torch.utils.data import DataLoader

from glowflow import data as data_module
from glowflow.config import GlowConfig, RunConfig
from glowflow.data import EpochSampler
from glowflow.errors import GlowflowError
from glowflow.runtime import Distributed


def load_splits(run: RunConfig, model_config: GlowConfig, dataset_name: str):
    """(run, training split, validation split or None with --val_size 0, test split) of --dataset,
    checked against the model's image shape and labels. The validation split is carved from the
    training split (--val_size images drawn by --seed); the run returned records its size, hence
    every checkpoint's run_config does."""
    divisor = 2**model_config.L
    train_set = data_module.load_dataset(
        run.dataset, "train", data_root=run.data_root, image_size=run.image_size, divisor=divisor
    )
    test_set = data_module.load_dataset(
        run.dataset, "test", data_root=run.data_root, image_size=run.image_size, divisor=divisor
    )
    data_shape = tuple(train_set.info.image_shape)
    if tuple(model_config.image_shape) != data_shape:
        raise GlowflowError(f"model image shape {model_config.image_shape} does not match the data's {data_shape}")
    check_labels(train_set, model_config, "training")
    check_labels(test_set, model_config, "test")
    val_size = data_module.resolve_val_size(run.val_size, len(train_set), dataset_name)
    run = dataclasses.replace(run, val_size=val_size)
    train_set, val_set, _ = data_module.split_validation(train_set, val_size, run.seed)
    return run, train_set, val_set, test_set


def check_labels(dataset, config: GlowConfig, split: str) -> None:
    """GlowflowError (one line) unless every label of ``dataset`` fits a class-conditional model of
    ``config``: class indices below num_classes, or multi-hot rows num_classes wide. Nothing to
    check for a model without --y_condition, which never sees the labels."""
    if not config.y_condition:
        return
    info = dataset.info
    labels = getattr(dataset, "labels", None)
    if isinstance(labels, torch.Tensor) and labels.numel():
        multilabel = labels.dim() == 2
        width = labels.shape[1] if multilabel else None
        largest = None if multilabel else int(labels.max())
    else:  # read from files (or a subset of them): class indices below the dataset's number of classes
        multilabel, width, largest = info.multilabel, info.num_classes, info.num_classes - 1
    n = config.num_classes
    what = f"the {split} labels of {info.name}"
    if config.y_multilabel and not multilabel:
        raise GlowflowError(f"{what} are class indices, but the model takes multi-hot rows of {n} classes")
    if config.y_multilabel and width != n:
        raise GlowflowError(f"{what} are multi-hot rows of {width} classes, but the model has num_classes {n}")
    if not config.y_multilabel and multilabel:
        raise GlowflowError(f"{what} are multi-hot rows of {width} classes, but the model takes one class per image")
    if not config.y_multilabel and largest >= n:
        raise GlowflowError(
            f"{what} go up to {largest}, but the model has num_classes {n} (labels 0 to {n - 1}); "
            f"pass --num_classes {largest + 1} or more"
        )


def build_sampler(n_train: int, run: RunConfig, dist: Distributed) -> EpochSampler:
    """The sampler of the training batches: this process's share of each global batch."""
    sampler = EpochSampler(n_train, run.batch_size, run.seed, dist.rank, dist.world_size)
    if sampler.global_batch % dist.world_size:
        raise GlowflowError(f"batch size {sampler.global_batch} is not divisible by the {dist.world_size} processes")
    return sampler


def build_loaders(
    splits, sampler: EpochSampler, run: RunConfig, dist: Distributed, device
) -> Tuple[DataLoader, Optional[DataLoader], DataLoader]:
    """The training loader of ``splits`` (train, val, test) (batches from ``sampler``), and the
    validation (None without a validation split) and test loaders."""
    train_set, val_set, test_set = splits
    train_loader = data_module.make_loader(
        train_set,
        batch_size=sampler.global_batch // dist.world_size,
        shuffle=False,
        num_workers=run.num_workers,
        seed=run.seed,
        device=device,
        sampler=sampler,
    )
    val_loader = evaluation_loader(val_set, run, dist, device) if val_set is not None else None
    return train_loader, val_loader, evaluation_loader(test_set, run, dist, device)


def evaluation_loader(dataset, run: RunConfig, dist: Distributed, device) -> DataLoader:
    """A loader of ``dataset`` in order; under torchrun each process takes every world_size-th image."""
    sampler = list(range(len(dataset)))[dist.rank :: dist.world_size] if dist.enabled else None
    return data_module.make_loader(
        dataset,
        batch_size=run.eval_batch_size,
        shuffle=False,
        num_workers=run.num_workers,
        seed=run.seed,
        device=device,
        sampler=sampler,
    )
