"""Sampling and latent manipulation: temperature grids, class grids, reconstructions,
interpolations, attribute manipulation (Glow, section 5) and class-to-class manipulation, and the
``--sample`` command that makes them from a checkpoint alone. Every picture is a PNG under the
output directory; its path is printed, and so is every sample grid's check report (samples that
were not finite or left the bound, redrawn; :meth:`glowflow.model.Glow.sample_with_report`). The
sheet of several temperatures labels each row (``T=0.5``, ...). ``--class`` and ``--manipulate``
on a model that is not class-conditional are refused before anything is made.
"""

from __future__ import annotations

import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from glowflow.checkpoint import Checkpoint, check_image_shape
from glowflow.config import OUTPUT_ROOT, GlowConfig, RunConfig
from glowflow.data import load_dataset
from glowflow.errors import GlowflowError
from glowflow.files import atomic_write, check_writable_folder
from glowflow.model import Glow
from glowflow.pixels import postprocess, preprocess, save_grid
from glowflow.runtime import resolve_device

MAX_CLASS_ROWS = 20


def _class_condition(model: Glow, cls: int, n: int, device) -> torch.Tensor:
    if not 0 <= cls < model.config.num_classes:
        raise GlowflowError(f"--class {cls} is outside 0..{model.config.num_classes - 1}")
    if model.config.y_multilabel:
        y = torch.zeros(n, model.config.num_classes, device=device)
        y[:, cls] = 1.0
        return y
    return torch.full((n,), cls, dtype=torch.long, device=device)


def checked_sample(model: Glow, n: int, temperature: float, y: Optional[torch.Tensor] = None, what: str = ""):
    """``model.sample`` with its default check and redraws, printing its report in one line
    (:meth:`glowflow.sampling.SampleReport.describe`). Returns the samples (n, C, H, W)."""
    x, report = model.sample_with_report(n, temperature, y)
    print(f"samples ({what}T={temperature:g}): {report.describe()}")
    return x


def _save(model: Glow, x: torch.Tensor, output_dir: str, name: str, nrow: int) -> str:
    return save_grid(x, model.config.n_bits, os.path.join(output_dir, name), nrow=nrow)


@torch.no_grad()
def sample_grids(
    model: Glow,
    output_dir: str,
    n_samples: int,
    temperatures: Sequence[float],
    sample_class: Optional[int] = None,
    device="cpu",
) -> List[str]:
    """One grid of ``n_samples`` per temperature, one sheet with a row per temperature, and (for a
    class-conditional model without ``sample_class``) one grid per temperature with a row per class."""
    if sample_class is not None and not model.config.y_condition:
        raise GlowflowError("--class needs a class-conditional model (trained with --y_condition)")
    y = _class_condition(model, sample_class, n_samples, device) if sample_class is not None else None
    suffix = f"_class{sample_class}" if sample_class is not None else ""
    nrow = max(1, int(math.ceil(math.sqrt(n_samples))))
    columns = min(n_samples, 10)
    written, sheet = [], []
    for t in temperatures:
        x = checked_sample(model, n_samples, t, y)
        written.append(_save(model, x, output_dir, f"samples_T{t:g}{suffix}.png", nrow))
        sheet.append(x[:columns])
    sheet_path = os.path.join(output_dir, f"samples_temperatures{suffix}.png")
    written.append(save_labelled_rows(sheet, [f"T={t:g}" for t in temperatures], model.config.n_bits, sheet_path))
    if model.config.y_condition and sample_class is None:
        written += _class_grids(model, output_dir, temperatures, columns, device)
    return written


def checkpoint_label(path: str, checkpoint: Checkpoint) -> str:
    """A short name for a row label: the file or folder name (``pretrained:NAME`` as it is), with
    its completed epochs and test bits/dim when the file records them."""
    name = path if path.startswith("pretrained:") else os.path.basename(os.path.normpath(path))
    payload = checkpoint.payload
    if "epoch" in payload and ("test_bpd_at_best" in payload or "best_test_bpd" in payload):
        bpd = checkpoint.best_test_bpd
        return f"{name} ({checkpoint.epoch} ep." + (f", {bpd:.2f} bpd)" if math.isfinite(bpd) else ")")
    return name


@torch.no_grad()
def compare_samples(models: Sequence[Tuple[str, Glow]], output_dir: str, temperatures: Sequence[float]) -> str:
    """``samples_compared.png``: for each temperature, two rows of 10 samples of each (label, model),
    each model's first row labelled with its name and the temperature. The models must see images
    of one shape and bit depth."""
    kinds = {(tuple(model.config.image_shape), model.config.n_bits) for _, model in models}
    if len(kinds) > 1:
        seen = ", ".join(
            f"{label}: {'x'.join(map(str, model.config.image_shape))} at {model.config.n_bits} bits"
            for label, model in models
        )
        raise GlowflowError(f"--compare_with: the models see different images ({seen})")
    rows, labels = [], []
    for t in temperatures:
        for label, model in models:
            x = checked_sample(model, 20, t, what=f"{label}, ")
            rows += [x[:10], x[10:]]
            labels += [f"{label}, T={t:g}", ""]
    n_bits = models[0][1].config.n_bits
    return save_labelled_rows(rows, labels, n_bits, os.path.join(output_dir, "samples_compared.png"))


def save_labelled_rows(rows: Sequence[torch.Tensor], labels: Sequence[str], n_bits: int, path: str) -> str:
    """Save rows of model-space images (each (n, C, H, W), the same n) as one PNG: the grid
    ``save_grid`` would make of them, with ``labels[i]`` written left of row i (black on white,
    PIL's default font). Returns ``path``."""
    from PIL import Image, ImageDraw, ImageFont
    from torchvision.utils import make_grid

    columns = len(rows[0])
    images = postprocess(torch.cat(list(rows)).detach().float().cpu(), n_bits)
    grid = make_grid(images, nrow=columns, padding=2, pad_value=1.0)  # as torchvision's save_image
    pixels = grid.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to(torch.uint8).numpy()
    font = ImageFont.load_default()
    boxes = [font.getbbox(label) for label in labels]
    margin = max(box[2] for box in boxes) + 8
    sheet = Image.new("RGB", (margin + grid.shape[2], grid.shape[1]), "white")
    sheet.paste(Image.fromarray(pixels), (margin, 0))
    draw = ImageDraw.Draw(sheet)
    side = images.shape[2]
    for i, (label, box) in enumerate(zip(labels, boxes)):
        middle = 2 + i * (side + 2) + side / 2  # row i's images start at 2 + i * (side + padding)
        draw.text((4, middle - (box[1] + box[3]) / 2), label, fill="black", font=font)
    return atomic_write(path, lambda handle: sheet.save(handle, format="png"))


def _class_grids(model: Glow, output_dir: str, temperatures: Sequence[float], columns: int, device) -> List[str]:
    """One grid per temperature, a row of ``columns`` samples per class (the first MAX_CLASS_ROWS)."""
    rows = min(model.config.num_classes, MAX_CLASS_ROWS)
    written = []
    for t in temperatures:
        per_class = [
            checked_sample(model, columns, t, _class_condition(model, c, columns, device), f"class {c}, ")
            for c in range(rows)
        ]
        written.append(_save(model, torch.cat(per_class), output_dir, f"samples_by_class_T{t:g}.png", columns))
    if rows < model.config.num_classes:
        print(
            f"note: the class grid shows the first {rows} of {model.config.num_classes} classes; "
            f"use --class for the others"
        )
    return written


def _first_images(dataset, n: int) -> torch.Tensor:
    """The first ``n`` images of ``dataset`` as one (n, C, H, W) tensor."""
    n = min(n, len(dataset))
    if n < 1:
        raise GlowflowError("the test split has no images")
    return torch.stack([dataset[i][0] for i in range(n)])


@torch.no_grad()
def reconstruct(model: Glow, dataset, output_dir: str, n: int = 16, device="cpu") -> Tuple[str, float]:
    """Encode and decode ``n`` test images; a PNG with originals (top) and reconstructions (bottom).
    Returns (path, max absolute error in model space)."""
    images = _first_images(dataset, n)
    x = preprocess(images, model.config.n_bits).to(device)
    latents, _ = model.encode(x)
    x_rec = model.decode(latents)
    error = (x_rec - x).abs().max().item()
    path = save_grid(
        torch.cat([x, x_rec]), model.config.n_bits, os.path.join(output_dir, "reconstructions.png"), nrow=len(x)
    )
    return path, error


@torch.no_grad()
def interpolate(model: Glow, dataset, output_dir: str, n_pairs: int = 4, steps: int = 8, device="cpu") -> str:
    """Pairs of test images, a row each: linear interpolation of every level's latents."""
    images = _first_images(dataset, 2 * n_pairs)
    n_pairs = len(images) // 2
    if n_pairs < 1:
        raise GlowflowError("interpolation needs at least two test images")
    x = preprocess(images[: 2 * n_pairs], model.config.n_bits).to(device)
    latents, _ = model.encode(x)
    rows = []
    weights = torch.linspace(0, 1, steps, device=device)
    for pair in range(n_pairs):
        a, b = 2 * pair, 2 * pair + 1
        mixed = [torch.stack([(1 - w) * z[a] + w * z[b] for w in weights]) for z in latents]
        rows.append(model.decode(mixed))
    return save_grid(torch.cat(rows), model.config.n_bits, os.path.join(output_dir, "interpolations.png"), nrow=steps)


def _class_index(label) -> int:
    label = torch.as_tensor(label)
    return int(label.argmax()) if label.dim() > 0 else int(label)


@torch.no_grad()
def manipulate(
    model: Glow,
    dataset,
    output_dir: str,
    source: int,
    target: int,
    n_images: int = 4,
    steps: int = 8,
    max_per_class: int = 1000,
    device="cpu",
    batch_size: int = 256,
) -> str:
    """Class-attribute manipulation (Glow, section 5): move source-class test images along the
    difference of the class-mean latents (target minus source), scale 0 to 1.5, a row per image.

    The class means come from the first ``max_per_class`` test images of each class, encoded
    ``batch_size`` at a time."""
    if not model.config.y_condition:
        raise GlowflowError("--manipulate needs a class-conditional model (trained with --y_condition)")
    for cls in (source, target):
        if not 0 <= cls < model.config.num_classes:
            raise GlowflowError(f"class {cls} is outside 0..{model.config.num_classes - 1}")
    picked = _images_of_classes(dataset, (source, target), max_per_class)
    means = {cls: _mean_latents(model, images, batch_size, device) for cls, images in picked.items()}
    direction = [t - s for s, t in zip(means[source], means[target])]
    chosen = picked[source][:n_images]
    latents, _ = model.encode(preprocess(torch.stack(chosen), model.config.n_bits).to(device))
    scales = torch.linspace(0, 1.5, steps, device=device)
    rows = []
    for i in range(len(chosen)):
        moved = [torch.stack([z[i] + s * d for s in scales]) for z, d in zip(latents, direction)]
        rows.append(model.decode(moved))
    return _save(model, torch.cat(rows), output_dir, f"manipulation_{source}_to_{target}.png", steps)


DEFAULT_SCALES = (-1.0, -0.5, 0.0, 0.5, 1.0, 1.5)
"""The manipulation row's scales of the attribute direction (scale 0: the image itself)."""


def _all_labels(dataset) -> torch.Tensor:
    """Every label of ``dataset``: (N,) integer classes, or (N, K) multi-hot."""
    labels = getattr(dataset, "labels", None)
    if isinstance(labels, torch.Tensor) and len(labels) == len(dataset):
        return labels
    return torch.stack([torch.as_tensor(dataset[i][1]) for i in range(len(dataset))])


def has_attribute(labels: torch.Tensor, attribute: Sequence[int], num_classes: int) -> torch.Tensor:
    """(N,) bool: which images have the attribute. ``labels``: (N,) classes (the attribute is a
    class or a group of classes: the label is one of them) or (N, K) multi-hot (a finding or a
    group of findings: any of them present). ``attribute``: indices in 0..num_classes-1."""
    for index in attribute:
        if not 0 <= index < num_classes:
            raise GlowflowError(f"attribute {index} is outside 0..{num_classes - 1} (the dataset's classes)")
    index = torch.as_tensor(list(attribute), dtype=torch.long)
    if labels.dim() == 2:
        return labels[:, index].gt(0).any(dim=1)
    return torch.isin(labels.long(), index)


@torch.no_grad()
def attribute_direction(
    model: Glow,
    dataset,
    attribute: Sequence[int],
    max_per_group: int = 1000,
    batch_size: int = 256,
    device="cpu",
) -> Tuple[List[torch.Tensor], int, int]:
    """The paper's attribute direction (Glow, section 5): per level, the mean latent of the images
    with the attribute minus the mean latent of those without, each (C_i, H_i, W_i). The means use
    the first ``max_per_group`` images of each group in dataset order (normally the training
    split), encoded ``batch_size`` at a time. Returns (direction, images with, images without)."""
    labels = _all_labels(dataset)
    num_classes = getattr(getattr(dataset, "info", None), "num_classes", None)
    if not num_classes:  # a dataset without its info: the classes its labels show
        num_classes = labels.shape[1] if labels.dim() == 2 else int(labels.max()) + 1
    with_it = has_attribute(labels, attribute, num_classes)
    means, counts = [], []
    for mask, name in ((with_it, "with"), (~with_it, "without")):
        indices = mask.nonzero().squeeze(1)[:max_per_group].tolist()
        if not indices:
            raise GlowflowError(
                f"no images {name} attribute {','.join(map(str, attribute))} to estimate its mean latent"
            )
        means.append(_mean_latents(model, [dataset[i][0] for i in indices], batch_size, device))
        counts.append(len(indices))
    return [a - b for a, b in zip(*means)], counts[0], counts[1]


@torch.no_grad()
def attribute_rows(
    model: Glow, x: torch.Tensor, direction: Sequence[torch.Tensor], scales: Sequence[float]
) -> torch.Tensor:
    """Model-space images ``x`` (n, C, H, W) moved along ``direction``: every level's latent
    z + s * d for each scale s. Returns (n * len(scales), C, H, W), a row of scales per image."""
    latents, _ = model.encode(x)
    scales = torch.as_tensor(list(scales), dtype=x.dtype, device=x.device)
    rows = []
    for i in range(len(x)):
        moved = [z[i] + scales.view(-1, 1, 1, 1) * d.to(z.dtype) for z, d in zip(latents, direction)]
        rows.append(model.decode(moved))
    return torch.cat(rows)


@torch.no_grad()
def manipulate_attribute(
    model: Glow,
    train_set,
    test_set,
    output_dir: str,
    attribute: Sequence[int],
    scales: Sequence[float] = DEFAULT_SCALES,
    n_images: int = 6,
    max_per_group: int = 1000,
    batch_size: int = 256,
    device="cpu",
) -> str:
    """Attribute manipulation as in the Glow paper (section 5), for any model (unconditional or
    conditional; the latents do not depend on the label) and single- or multi-label data: the
    direction is :func:`attribute_direction` on ``train_set``; the first ``n_images`` test images
    move along it, a row each, one column per scale. Prints the group sizes; returns the PNG path."""
    direction, n_with, n_without = attribute_direction(model, train_set, attribute, max_per_group, batch_size, device)
    name = "_".join(map(str, attribute))
    print(
        f"attribute {','.join(map(str, attribute))}: mean latent of {n_with} training images with it "
        f"minus that of {n_without} without"
    )
    x = preprocess(_first_images(test_set, n_images), model.config.n_bits).to(device)
    rows = attribute_rows(model, x, direction, scales)
    bad = ~torch.isfinite(rows).flatten(1).all(dim=1).view(len(x), len(scales))
    if bool(bad.any()):  # the reverse pass left the floats: said, not silently saved black
        per_scale = ", ".join(f"{s:g}: {int(k)}" for s, k in zip(scales, bad.sum(0).tolist()) if k)
        print(
            f"warning: {int(bad.sum())} of {bad.numel()} manipulated images are not finite (saved black); "
            f"per scale {per_scale} (docs/sampling.md)"
        )
    return _save(model, rows, output_dir, f"manipulation_attribute_{name}.png", len(scales))


def _images_of_classes(dataset, classes: Sequence[int], max_per_class: int) -> Dict[int, List[torch.Tensor]]:
    """The first ``max_per_class`` images of each class in ``classes``, in dataset order."""
    picked: Dict[int, List[torch.Tensor]] = {cls: [] for cls in classes}
    for index in range(len(dataset)):
        if all(len(images) >= max_per_class for images in picked.values()):
            break
        image, label = dataset[index]
        cls = _class_index(label)
        if cls in picked and len(picked[cls]) < max_per_class:
            picked[cls].append(image)
    missing = [cls for cls, images in picked.items() if not images]
    if missing:
        raise GlowflowError(f"no test images of class {missing[0]} to estimate its mean latent")
    return picked


def _mean_latents(model: Glow, images: List[torch.Tensor], batch_size: int, device) -> List[torch.Tensor]:
    """The mean latent of each level over ``images``, each (C_i, H_i, W_i), encoded ``batch_size`` at a time."""
    sums = None
    for start in range(0, len(images), batch_size):
        x = preprocess(torch.stack(images[start : start + batch_size]), model.config.n_bits).to(device)
        latents, _ = model.encode(x)
        batch_sums = [z.sum(0) for z in latents]
        sums = batch_sums if sums is None else [s + z for s, z in zip(sums, batch_sums)]
    return [s / len(images) for s in sums]


def check_class_flags(config: GlowConfig, run: RunConfig) -> None:
    """GlowflowError, before any work, for ``--class`` or ``--manipulate`` on a model that is not
    class-conditional, or for a class outside the model's classes."""
    wanted = [("--class", run.sample_class), ("--manipulate", run.manipulate)]
    for flag, value in wanted:
        if value is None:
            continue
        if not config.y_condition:
            other = "; --manipulate_attribute works with any model" if flag == "--manipulate" else ""
            raise GlowflowError(f"{flag} needs a class-conditional model (trained with --y_condition){other}")
        for cls in value if isinstance(value, tuple) else (value,):
            if not 0 <= cls < config.num_classes:
                raise GlowflowError(f"{flag}: class {cls} is outside 0..{config.num_classes - 1}")


def run_sampling(run: RunConfig, dataset: Optional[str] = None) -> List[str]:
    """--sample: everything the flags ask for, from --checkpoint alone. Returns the written paths.

    ``dataset`` (``--dataset``) names the test images of ``--reconstruct``, ``--interpolate`` and
    ``--manipulate`` (and the training images of ``--manipulate_attribute``'s means); by default
    the checkpoint's own dataset (at its own ``--image_size``)."""
    check_writable_folder(run.output_dir or OUTPUT_ROOT)  # before any work; creates nothing
    device = resolve_device(run.device)
    checkpoint = Checkpoint.read(run.checkpoint)
    check_class_flags(checkpoint.model_config, run)  # before anything is made
    model = checkpoint.load_model(device)
    dataset_name, image_size = checkpoint.data_to_read(dataset, run.dataset)
    output_dir = run.output_dir
    if output_dir is None:  # made by the first picture written; pretrained:NAME's own, not its dataset's training run's
        defaults = RunConfig(dataset=checkpoint.dataset or dataset_name, checkpoint=run.checkpoint)
        output_dir = defaults.resolved_output_dir()
        print(f"writing into {output_dir} (--output_dir chooses another folder)")
    torch.manual_seed(run.seed)
    written = sample_grids(model, output_dir, run.n_samples, run.temperature, run.sample_class, device)
    if run.compare_with is not None:
        other = Checkpoint.read(run.compare_with)
        models = [(checkpoint_label(run.checkpoint, checkpoint), model)]
        models.append((checkpoint_label(run.compare_with, other), other.load_model(device)))
        written.append(compare_samples(models, output_dir, run.temperature))
    if run.reconstruct or run.interpolate or run.manipulate is not None or run.manipulate_attribute is not None:
        test_set = load_dataset(
            dataset_name, "test", data_root=run.data_root, image_size=image_size, divisor=2**model.config.L
        )
        check_image_shape(model, test_set.info.image_shape, run.checkpoint, dataset_name)
        if run.reconstruct:
            path, error = reconstruct(model, test_set, output_dir, device=device)
            print(f"reconstruction: max |x - decode(encode(x))| = {error:.3e} (model space)")
            written.append(path)
        if run.interpolate:
            written.append(interpolate(model, test_set, output_dir, steps=run.n_interpolation_steps, device=device))
        if run.manipulate is not None:
            source, target = run.manipulate
            written.append(
                manipulate(model, test_set, output_dir, source, target, steps=run.n_interpolation_steps, device=device)
            )
        if run.manipulate_attribute is not None:
            train_set = load_dataset(
                dataset_name, "train", data_root=run.data_root, image_size=image_size, divisor=2**model.config.L
            )
            written.append(
                manipulate_attribute(
                    model,
                    train_set,
                    test_set,
                    output_dir,
                    run.manipulate_attribute,
                    scales=run.manipulate_scales,
                    device=device,
                )
            )
    for path in written:
        print(f"saved {path}")
    return written
