"""A small Fashion-MNIST classifier whose penultimate features stand in for FID's Inception
features when benchmarks/time_to_quality.py compares a model's samples with the test split (a
Fréchet distance, benchmarks/frechet.py). It is trained here, on the training split at 1x32x32
(the 28x28 images as glowflow reads them), so nothing is downloaded:

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/fid_classifier.py --out fid_classifier.safetensors

It prints its test accuracy, which the weights file keeps in its metadata (with the settings it
was trained with). Three 3x3 convolutions (16, 32, 64 channels, each followed by ReLU and 2x2 max
pooling), a 128-unit ReLU layer (the features) and a 10-way linear layer; inputs are images in
[0, 1], (N, 1, 32, 32).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

FEATURES = 128
FORMAT = "glowflow-benchmarks fid_classifier v1"


class GarmentNet(nn.Module):
    """Three conv + ReLU + max-pool blocks, a 128-unit ReLU layer (:meth:`features`), 10 logits."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.hidden = nn.Linear(64 * 4 * 4, FEATURES)
        self.head = nn.Linear(FEATURES, 10)

    def features(self, images01: torch.Tensor) -> torch.Tensor:
        """The penultimate features (N, 128) of images in [0, 1] (N, 1, 32, 32)."""
        h = (images01 - 0.5) * 2.0
        for conv in (self.conv1, self.conv2, self.conv3):
            h = F.max_pool2d(F.relu(conv(h)), 2)
        return F.relu(self.hidden(h.flatten(1)))

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images01))


@torch.inference_mode()
def features_of(model: GarmentNet, images01: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Penultimate features (N, 128), float64, of images in [0, 1] (N, 1, 32, 32)."""
    model.eval()
    parts = [model.features(images01[i : i + batch_size].float()) for i in range(0, len(images01), batch_size)]
    return torch.cat(parts).double()


@torch.inference_mode()
def accuracy(model: GarmentNet, images01: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    """Share of ``images01`` whose predicted class is ``labels``."""
    model.eval()
    right = 0
    for i in range(0, len(images01), batch_size):
        right += int((model(images01[i : i + batch_size].float()).argmax(1) == labels[i : i + batch_size]).sum())
    return right / len(images01)


def load_classifier(path: str) -> Tuple[GarmentNet, Dict[str, str]]:
    """(the classifier in eval mode, its metadata) from a file :func:`main` wrote."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(path, framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
    if metadata.get("format") != FORMAT:
        found = metadata.get("format")
        raise ValueError(f"{path} is not a weights file of benchmarks/fid_classifier.py (format {found!r})")
    model = GarmentNet()
    model.load_state_dict(load_file(path))
    return model.eval(), metadata


def load_split(split: str, data_root: str = "./data") -> Tuple[torch.Tensor, torch.Tensor]:
    """(images in [0, 1] (N, 1, 32, 32) float32, labels (N,)) of Fashion-MNIST's ``split``, as
    glowflow reads it (28x28 padded to 32x32; no download)."""
    from glowflow.data.resolve import load_dataset

    dataset = load_dataset("fashionmnist", split, data_root=data_root, image_size=32, download=False)
    return dataset.images.float() / 255.0, dataset.labels.long()


def train(epochs: int, batch_size: int, lr: float, seed: int, data_root: str) -> Tuple[GarmentNet, Dict[str, str]]:
    """Train on the training split with Adam; (model, metadata with the test accuracy)."""
    torch.manual_seed(seed)
    images, labels = load_split("train", data_root)
    test_images, test_labels = load_split("test", data_root)
    model = GarmentNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    order_generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(images), generator=order_generator)
        total, seen = 0.0, 0
        for i in range(0, len(order) - batch_size + 1, batch_size):
            index = order[i : i + batch_size]
            loss = F.cross_entropy(model(images[index]), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, seen = total + float(loss.detach()) * len(index), seen + len(index)
        test_acc = accuracy(model, test_images, test_labels)
        print(
            f"epoch {epoch + 1}/{epochs}: training loss {total / seen:.4f}, test accuracy {test_acc:.4f} "
            f"({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
    metadata = {
        "format": FORMAT,
        "test_accuracy": f"{test_acc:.4f}",
        "epochs": str(epochs),
        "batch_size": str(batch_size),
        "lr": str(lr),
        "seed": str(seed),
        "train_seconds": f"{time.perf_counter() - start:.1f}",
        "threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
    }
    return model, metadata


def save(model: GarmentNet, metadata: Dict[str, str], path: str) -> None:
    """Write the weights and metadata (safetensors) atomically: a temporary file, then a rename."""
    from safetensors.torch import save_file

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    temporary = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, temporary, metadata=metadata)
    os.replace(temporary, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="weights file to write (.safetensors)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--data_root", default="./data")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, metadata = train(args.epochs, args.batch_size, args.lr, args.seed, args.data_root)
    save(model, metadata, args.out)
    print(f"wrote {args.out}: test accuracy {metadata['test_accuracy']} ({metadata['train_seconds']} s of training)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
