"""The label-using part of the outlier detector: a small convolutional classifier trained on the
fit images' class labels when they have some, whose penultimate features carry what the flow's
density does not (what kind of thing the image shows). Its class Gaussians (fitted in
glowflow/ood/reference.py) give the ``classifier`` score, the Mahalanobis-style distance to the
nearest class (Lee et al., 2018), and ``combined`` adds it to the label-free score (see
:func:`combined_score`). Without labels there is no classifier and ``combined`` is the label-free
score itself.

This module owns the network, its training, its features, its standardisation and its plain-array
form (no pickle) in a detector file."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, Mapping, Optional

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from glowflow.errors import GlowflowError
from glowflow.ood import checks
from glowflow.ood.orientation import pair_standardisation
from glowflow.ood.statistics import NO_LABEL

CLASSIFIER_EPOCHS = 4
"""Passes over the reference's fit images when training the classifier (7.4 s for 8000 32x32 grey
images on 2 CPU cores; docs/outlier_detection.md, "Near outliers with labels", has the cost)."""
CLASSIFIER_FEATURES = 128
"""Size of the penultimate features the class Gaussians are fitted on."""
CLASSIFIER_BATCH = 128
CLASSIFIER_LR = 1e-3
CLASSIFIER_WEIGHT = 0.5
"""The standardised ``classifier`` score's weight in ``combined`` (the label-free score's is 1);
chosen on the development sets (held-out classes 8,9, vflip, digits, mnist5k): 1 lowers vflip
and digits (0.967 and 0.989 on the 8,9 model), 0.5 keeps them (docs/outlier_detection.md)."""
MIN_LABELLED_IMAGES = 2
"""A classifier is trained only when every fit image has a class label and at least two classes
have this many images."""


class LabelClassifier(nn.Module):
    """Images (N, C, H, W) in [0, 1] -> class logits (N, n_classes); :meth:`features` gives the
    (N, :data:`CLASSIFIER_FEATURES`) penultimate activations. Three 3x3 convolutions (16, 32, 64
    channels, ReLU, 2x2 max-pooling after the first two), average-pooled to 4x4, then a hidden
    layer of :data:`CLASSIFIER_FEATURES` and the linear head: any image size of at least 4x4."""

    def __init__(self, in_channels: int, n_classes: int):
        super().__init__()
        self.in_channels, self.n_classes = int(in_channels), int(n_classes)
        self.conv1 = nn.Conv2d(self.in_channels, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.hidden = nn.Linear(64 * 4 * 4, CLASSIFIER_FEATURES)
        self.head = nn.Linear(CLASSIFIER_FEATURES, self.n_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(images - 0.5)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.adaptive_avg_pool2d(F.relu(self.conv3(x)), 4)
        return F.relu(self.hidden(x.flatten(1)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


@dataclass
class Classifier:
    """A trained :class:`LabelClassifier` (``net``, in eval mode), the class label of each of its
    outputs (``classes`` (c,) int64), and the mean and standard deviation (2,) of the label-free
    score and the ``classifier`` score over held-back inlier images (``combined_mean``,
    ``combined_std``), which :func:`combined_score` standardises with."""

    net: LabelClassifier
    classes: np.ndarray
    combined_mean: np.ndarray
    combined_std: np.ndarray


def labels_for_classifier(labels: Optional[np.ndarray]) -> Optional[np.ndarray]:
    """``labels`` (N,) if a classifier can be trained on them (every image labelled, at least
    two classes with :data:`MIN_LABELLED_IMAGES` images), else None."""
    if labels is None:
        return None
    labels = np.asarray(labels).reshape(-1)
    if labels.size == 0 or (labels == NO_LABEL).any():
        return None
    _, counts = np.unique(labels, return_counts=True)
    return labels if (counts >= MIN_LABELLED_IMAGES).sum() >= 2 else None


def train_classifier(
    images: np.ndarray,
    labels: np.ndarray,
    seed: int = 0,
    device=None,
    epochs: int = CLASSIFIER_EPOCHS,
) -> Classifier:
    """A :class:`LabelClassifier` trained with cross-entropy (Adam, lr :data:`CLASSIFIER_LR`,
    batches of :data:`CLASSIFIER_BATCH`, ``epochs`` passes) on ``images`` (N, C, H, W) uint8 and
    their ``labels`` (N,); initialisation and shuffling seeded with ``seed`` (the global random
    state is left as it was). Its standardisation is the identity until :func:`calibrated`."""
    classes, targets = np.unique(np.asarray(labels).reshape(-1), return_inverse=True)
    if len(classes) < 2 or len(targets) != len(images):
        raise GlowflowError(f"training the classifier needs images of at least 2 classes, got {len(classes)}")
    device = torch.device("cpu" if device is None else device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = LabelClassifier(images.shape[1], len(classes)).to(device)
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.from_numpy(np.ascontiguousarray(images))
    targets = torch.from_numpy(targets.astype(np.int64))
    optimizer = torch.optim.Adam(net.parameters(), lr=CLASSIFIER_LR)
    net.train()
    with torch.enable_grad():
        for _ in range(int(epochs)):
            order = torch.randperm(len(pixels), generator=generator)
            for start in range(0, len(order), CLASSIFIER_BATCH):
                rows = order[start : start + CLASSIFIER_BATCH]
                batch = pixels[rows].to(device=device, dtype=torch.float32) / 255.0
                loss = F.cross_entropy(net(batch), targets[rows].to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    net.eval().requires_grad_(False)
    return Classifier(net, classes.astype(np.int64), np.zeros(2), np.ones(2))


def classifier_for(train_stats: Mapping, threshold_stats: Mapping, seed: int = 0, device=None):
    """``(classifier, train_stats, threshold_stats)``: a classifier trained on the training images'
    labels, and both statistics with its ``classifier_features`` added, when both hold the
    ``images`` and every training image is labelled (:func:`labels_for_classifier`); else
    ``(None, train_stats, threshold_stats)`` unchanged."""
    labels = labels_for_classifier(train_stats.get("labels"))
    if labels is None or "images" not in train_stats or "images" not in threshold_stats:
        return None, train_stats, threshold_stats
    classifier = train_classifier(train_stats["images"], labels, seed, device)
    train_stats, threshold_stats = (
        {**stats, "classifier_features": images_features(classifier.net, stats["images"])}
        for stats in (train_stats, threshold_stats)
    )
    return classifier, train_stats, threshold_stats


@torch.inference_mode()
def classifier_features(net: LabelClassifier, images: torch.Tensor) -> np.ndarray:
    """(N, :data:`CLASSIFIER_FEATURES`) float32 features of ``images`` (N, C, H, W) in [0, 1]
    (moved to the network's device)."""
    param = next(net.parameters())
    return net.features(images.to(device=param.device, dtype=param.dtype)).float().cpu().numpy()


def images_features(net: LabelClassifier, images: np.ndarray, batch: int = 1000) -> np.ndarray:
    """:func:`classifier_features` of uint8 ``images`` (N, C, H, W), ``batch`` at a time."""
    return np.concatenate(
        [
            classifier_features(net, torch.from_numpy(np.ascontiguousarray(images[i : i + batch])).float() / 255.0)
            for i in range(0, len(images), batch)
        ]
    )


def calibrated(classifier: Classifier, base: np.ndarray, score: np.ndarray) -> Classifier:
    """``classifier`` with :func:`combined_score`'s standardisation fitted on held-back inliers
    whose label-free scores are ``base`` and ``classifier`` scores ``score`` (non-finite ones left
    out; a constant score keeps std 1)."""
    mean, std = pair_standardisation(base, score, "combined")
    return replace(classifier, combined_mean=mean, combined_std=std)


def combined_score(classifier: Optional[Classifier], base: np.ndarray, score: Optional[np.ndarray]) -> np.ndarray:
    """(N,) ``combined``: the label-free score ``base`` (``dos_orientation``, or ``dos`` without the
    orientation score) and the ``classifier`` score ``score``, each standardised with its mean and
    standard deviation on held-back inliers, added with the weights 1 and :data:`CLASSIFIER_WEIGHT`;
    ``base`` itself when there is no classifier."""
    if classifier is None:
        return np.asarray(base, dtype=np.float64)
    mean, std = classifier.combined_mean, classifier.combined_std
    return (np.asarray(base) - mean[0]) / std[0] + CLASSIFIER_WEIGHT * (np.asarray(score) - mean[1]) / std[1]


PREFIX = "classifier_param_"


def classifier_arrays(classifier: Optional[Classifier]) -> Dict[str, np.ndarray]:
    """``classifier`` as plain arrays for a detector file (none when there is no classifier):
    its classes, input channels, standardisation and every weight (float32)."""
    if classifier is None:
        return {}
    arrays = {
        "classifier_classes": classifier.classes,
        "classifier_in_channels": np.array(classifier.net.in_channels, dtype=np.int64),
        "classifier_combined_mean": classifier.combined_mean,
        "classifier_combined_std": classifier.combined_std,
    }
    for name, tensor in classifier.net.state_dict().items():
        arrays[PREFIX + name] = tensor.detach().cpu().float().numpy()
    return arrays


def classifier_from_arrays(data: Mapping[str, np.ndarray], path: str) -> Optional[Classifier]:
    """The :class:`Classifier` stored by :func:`classifier_arrays` (None when absent), every array
    checked (:mod:`glowflow.ood.checks`: present, of the network's shape, finite)."""
    if "classifier_classes" not in data:
        return None
    classes = checks.array(data, "classifier_classes", path, (None,), np.int64)
    if len(classes) < 2 or len(set(classes.tolist())) != len(classes):
        raise checks.bad(path, f"classifier_classes must name at least 2 distinct classes, got {classes.tolist()[:5]}")
    in_channels = checks.number(data, "classifier_in_channels", path, integer=True)
    if in_channels < 1:
        raise checks.bad(path, f"classifier_in_channels must be at least 1, got {in_channels}")
    net = LabelClassifier(in_channels, len(classes))
    weights = {
        name: torch.from_numpy(checks.array(data, PREFIX + name, path, tuple(tensor.shape), np.float32))
        for name, tensor in net.state_dict().items()
    }
    net.load_state_dict(weights)
    std = checks.array(data, "classifier_combined_std", path, (2,))
    checks.positive(std, "classifier_combined_std", path)
    mean = checks.array(data, "classifier_combined_mean", path, (2,))
    return Classifier(net.eval().requires_grad_(False), classes, mean, std)
