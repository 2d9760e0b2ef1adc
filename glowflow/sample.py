"""Sampling and latent manipulation from a checkpoint: temperature grids, class grids,
reconstructions, interpolations and class-attribute manipulation. Every picture is a PNG
under the output directory; its path is printed.
"""
from __future__ import annotations

import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torchvision.utils import save_image

from glowflow.checkpoint import check_image_shape, model_from_payload, read_checkpoint
from glowflow.config import RunConfig
from glowflow.errors import GlowflowError
from glowflow.model import Glow, postprocess, preprocess

MAX_CLASS_ROWS = 20


def save_grid(x: torch.Tensor, n_bits: int, path: str, nrow: int = 8) -> str:
    """Save model-space images (N, C, H, W) as one PNG grid with ``nrow`` images per row."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_image(postprocess(x.detach().float().cpu(), n_bits), path, nrow=nrow, padding=2, pad_value=1.0)
    return path


def load_for_inference(path: str, device: torch.device) -> Tuple[Glow, Dict]:
    """(model in eval mode on ``device``, the checkpoint dict) from the checkpoint alone."""
    payload = read_checkpoint(path, map_location="cpu")
    model = model_from_payload(payload, path).to(device).eval()
    return model, payload


def checkpoint_n_bits(payload: Dict) -> int:
    return int(payload.get("run_config", {}).get("n_bits", 8))


def checkpoint_dataset(payload: Dict) -> Optional[str]:
    return payload.get("run_config", {}).get("dataset")


def _class_condition(model: Glow, cls: int, n: int, device) -> torch.Tensor:
    if not 0 <= cls < model.config.num_classes:
        raise GlowflowError(f"--class {cls} is outside 0..{model.config.num_classes - 1}")
    if model.config.y_multilabel:
        y = torch.zeros(n, model.config.num_classes, device=device)
        y[:, cls] = 1.0
        return y
    return torch.full((n,), cls, dtype=torch.long, device=device)


@torch.no_grad()
def sample_grids(model: Glow, n_bits: int, output_dir: str, n_samples: int, temperatures: Sequence[float],
                 sample_class: Optional[int] = None, device="cpu") -> List[str]:
    """One grid of ``n_samples`` per temperature, one sheet with a row per temperature, and (for a
    class-conditional model without ``sample_class``) one grid per temperature with a row per class."""
    written = []
    nrow = max(1, int(math.ceil(math.sqrt(n_samples))))
    if sample_class is not None and not model.config.y_condition:
        raise GlowflowError("--class needs a class-conditional model (trained with --y_condition)")
    y = _class_condition(model, sample_class, n_samples, device) if sample_class is not None else None
    suffix = f"_class{sample_class}" if sample_class is not None else ""
    columns = min(n_samples, 10)
    sheet = []
    for t in temperatures:
        x = model.sample(n_samples, temperature=t, y=y)
        written.append(save_grid(x, n_bits, os.path.join(output_dir, f"samples_T{t:g}{suffix}.png"), nrow=nrow))
        sheet.append(x[:columns])
    written.append(save_grid(torch.cat(sheet), n_bits, os.path.join(output_dir, f"samples_temperatures{suffix}.png"),
                             nrow=columns))
    if model.config.y_condition and sample_class is None:
        rows = min(model.config.num_classes, MAX_CLASS_ROWS)
        for t in temperatures:
            per_class = [model.sample(columns, temperature=t, y=_class_condition(model, c, columns, device))
                         for c in range(rows)]
            written.append(save_grid(torch.cat(per_class), n_bits,
                                     os.path.join(output_dir, f"samples_by_class_T{t:g}.png"), nrow=columns))
        if rows < model.config.num_classes:
            print(f"note: the class grid shows the first {rows} of {model.config.num_classes} classes; "
                  f"use --class for the others")
    return written


def _first_images(dataset, n: int) -> torch.Tensor:
    """The first ``n`` images of ``dataset`` as one (n, C, H, W) tensor."""
    n = min(n, len(dataset))
    if n < 1:
        raise GlowflowError("the test split has no images")
    return torch.stack([dataset[i][0] for i in range(n)])


@torch.no_grad()
def reconstruct(model: Glow, dataset, n_bits: int, output_dir: str, n: int = 16, device="cpu") -> Tuple[str, float]:
    """Encode and decode ``n`` test images; a PNG with originals (top) and reconstructions (bottom).
    Returns (path, max absolute error in model space)."""
    images = _first_images(dataset, n)
    x = preprocess(images, n_bits).to(device)
    latents, _ = model.encode(x)
    x_rec = model.decode(latents)
    error = (x_rec - x).abs().max().item()
    path = save_grid(torch.cat([x, x_rec]), n_bits, os.path.join(output_dir, "reconstructions.png"), nrow=len(x))
    return path, error


@torch.no_grad()
def interpolate(model: Glow, dataset, n_bits: int, output_dir: str, n_pairs: int = 4, steps: int = 8,
                device="cpu") -> str:
    """Pairs of test images, a row each: linear interpolation of every level's latents."""
    images = _first_images(dataset, 2 * n_pairs)
    n_pairs = len(images) // 2
    if n_pairs < 1:
        raise GlowflowError("interpolation needs at least two test images")
    x = preprocess(images[: 2 * n_pairs], n_bits).to(device)
    latents, _ = model.encode(x)
    rows = []
    weights = torch.linspace(0, 1, steps, device=device)
    for pair in range(n_pairs):
        a, b = 2 * pair, 2 * pair + 1
        mixed = [torch.stack([(1 - w) * z[a] + w * z[b] for w in weights]) for z in latents]
        rows.append(model.decode(mixed))
    return save_grid(torch.cat(rows), n_bits, os.path.join(output_dir, "interpolations.png"), nrow=steps)


def _class_index(label) -> int:
    label = torch.as_tensor(label)
    return int(label.argmax()) if label.dim() > 0 else int(label)


@torch.no_grad()
def manipulate(model: Glow, dataset, n_bits: int, output_dir: str, source: int, target: int, n_images: int = 4,
               steps: int = 8, max_per_class: int = 1000, device="cpu", batch_size: int = 256) -> str:
    """Class-attribute manipulation (Glow, section 5): move source-class test images along the
    difference of the class-mean latents (target minus source), scale 0 to 1.5, a row per image.

    The class means come from the first ``max_per_class`` test images of each class, encoded
    ``batch_size`` at a time."""
    if not model.config.y_condition:
        raise GlowflowError("--manipulate needs a class-conditional model (trained with --y_condition)")
    for cls in (source, target):
        if not 0 <= cls < model.config.num_classes:
            raise GlowflowError(f"class {cls} is outside 0..{model.config.num_classes - 1}")
    picked: Dict[int, List[torch.Tensor]] = {source: [], target: []}
    for index in range(len(dataset)):
        image, label = dataset[index]
        cls = _class_index(label)
        if cls in picked and len(picked[cls]) < max_per_class:
            picked[cls].append(image)
        elif all(len(images) >= max_per_class for images in picked.values()):
            break
    missing = [c for c in (source, target) if not picked[c]]
    if missing:
        raise GlowflowError(f"no test images of class {missing[0]} to estimate its mean latent")
    counts = {cls: len(images) for cls, images in picked.items()}
    sums: Dict[int, List[torch.Tensor]] = {}
    for cls, images in picked.items():
        for start in range(0, len(images), batch_size):  # encoded in batches, summed per level
            latents, _ = model.encode(preprocess(torch.stack(images[start:start + batch_size]), n_bits).to(device))
            batch_sums = [z.sum(0, keepdim=True) for z in latents]
            sums[cls] = batch_sums if cls not in sums else [s + z for s, z in zip(sums[cls], batch_sums)]
    chosen = picked[source][:n_images]
    direction = [t / counts[target] - s / counts[source] for s, t in zip(sums[source], sums[target])]
    x = preprocess(torch.stack(chosen), n_bits).to(device)
    latents, _ = model.encode(x)
    rows = []
    for i in range(len(chosen)):
        scales = torch.linspace(0, 1.5, steps, device=device)
        moved = [torch.stack([z[i] + s * d[0] for s in scales]) for z, d in zip(latents, direction)]
        rows.append(model.decode(moved))
    name = f"manipulation_{source}_to_{target}.png"
    return save_grid(torch.cat(rows), n_bits, os.path.join(output_dir, name), nrow=steps)


def run_sampling(run: RunConfig) -> List[str]:
    """--sample: everything the flags ask for, from --checkpoint alone. Returns the written paths."""
    from glowflow.train import resolve_device

    device = resolve_device(run.device)
    model, payload = load_for_inference(run.checkpoint, device)
    n_bits = checkpoint_n_bits(payload)
    dataset_name = checkpoint_dataset(payload) or run.dataset
    output_dir = run.output_dir or RunConfig(dataset=dataset_name).resolved_output_dir()
    os.makedirs(output_dir, exist_ok=True)
    torch.manual_seed(run.seed)
    written = sample_grids(model, n_bits, output_dir, run.n_samples, run.temperature, run.sample_class, device)
    needs_data = run.reconstruct or run.interpolate or run.manipulate is not None
    if needs_data:
        from glowflow.data import load_dataset

        stored = payload.get("run_config", {})
        test_set = load_dataset(dataset_name, "test", data_root=run.data_root,
                                image_size=stored.get("image_size"), divisor=2 ** model.config.L)
        check_image_shape(model, test_set.info.image_shape, run.checkpoint, dataset_name)
        if run.reconstruct:
            path, error = reconstruct(model, test_set, n_bits, output_dir, device=device)
            print(f"reconstruction: max |x - decode(encode(x))| = {error:.3e} (model space)")
            written.append(path)
        if run.interpolate:
            written.append(interpolate(model, test_set, n_bits, output_dir, steps=run.n_interpolation_steps,
                                       device=device))
        if run.manipulate is not None:
            source, target = run.manipulate
            written.append(manipulate(model, test_set, n_bits, output_dir, source, target,
                                      steps=run.n_interpolation_steps, device=device))
    for path in written:
        print(f"saved {path}")
    return written
