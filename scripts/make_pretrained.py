"""Write a model folder that ships inside the package, glowflow/pretrained_models/NAME/, from a
training checkpoint (``pretrained:NAME``; glowflow/names.py's SHIPPED lists the names):

    OMP_NUM_THREADS=1 python3 scripts/make_pretrained.py outputs/Glow_fashionmnist/last.pt fashionmnist
    python3 scripts/make_pretrained.py - fashionmnist --detector_only --val_size 5000 --seed 0

It writes, into a fresh folder that replaces the old one only when everything is done:

- ``config.json``, ``model.safetensors`` and ``README.md``: the checkpoint's model (its ``model``
  weights: the Polyak-averaged ones of a run with ``--ema``) through ``Glow.save_pretrained``; the
  card states the training command the checkpoint records, the bits/dim measured now on the whole
  test split (and on the run's validation split, when it had one), the checkpoint's epoch and
  step, the files and the date;
- ``ood_detector_<dataset>_<n_bits>bit.npz``: the outlier detector ``glowflow --outlier_detection``
  would fit for the folder, built the way that command builds it (``OutlierDetectionSettings``
  from the command's defaults, ``detector_for`` under ``detector_cache_path_for``'s name, on the
  model read back from the folder), so its cache key matches and ``--outlier_detection`` and
  ``--score`` with ``--checkpoint pretrained:NAME`` reuse it instead of reading the training set;
- ``expected.json``: the mean bits/dim on a fixed slice of the test split (the first 256 images,
  dequantisation seed 0, one batch, on the CPU) and how it was computed, which
  tests/test_shipped_model.py reproduces; also the whole-split numbers and the model's fingerprint.

Only public APIs are used (no field of the detector's file is named here), so a change of the
detector's format on main needs no change here: run the script again. Data are read through
glowflow's own loaders (Fashion-MNIST from /usr/share/datasets/fashion-mnist, Debian's
dataset-fashion-mnist, or ``--data_root``). The glowflow of this checkout is imported, whatever
is installed, and the folder is written into this checkout.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import sys
import tempfile

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from glowflow import Glow, __version__, data  # noqa: E402
from glowflow.checkpoint import Checkpoint  # noqa: E402
from glowflow.config import RunConfig, training_command  # noqa: E402
from glowflow.errors import GlowflowError  # noqa: E402
from glowflow.files import atomic_write_text  # noqa: E402
from glowflow.names import SHIPPED  # noqa: E402
from glowflow.ood import OutlierDetectionSettings  # noqa: E402
from glowflow.ood.cache import detector_cache_path_for, detector_for  # noqa: E402
from glowflow.ood.command import FitSets  # noqa: E402
from glowflow.ood.reference import model_fingerprint  # noqa: E402
from glowflow.ood.statistics import StatisticsSettings  # noqa: E402
from glowflow.pretrained import card_provenance, writing_shipped_models  # noqa: E402
from glowflow.runtime import resolve_device  # noqa: E402
from glowflow.training import evaluate_bpd  # noqa: E402

MODELS = os.path.join(REPO, "glowflow", "pretrained_models")
EXPECTED_NAME = "expected.json"
SLICE = dict(split="test", first=256, dequantization_seed=0, batch_size=256, device="cpu")
"""The fixed test slice of expected.json: the first ``first`` images of the split, in one batch of
``batch_size``, noise seeded ``dequantization_seed``, float32 on the CPU."""


def slice_bpd(model: Glow, dataset: str, data_root: str, image_size, how: dict) -> float:
    """Mean bits/dim of ``model`` (on the CPU) on the slice ``how`` (:data:`SLICE`) of ``dataset``:
    ``glowflow.training.evaluate_bpd`` over the first ``how["first"]`` images of the split."""
    split = data.load_dataset(dataset, how["split"], data_root, image_size, divisor=2**model.config.L)
    images = data.subset(split, range(how["first"]))
    loader = data.make_loader(images, batch_size=how["batch_size"], shuffle=False)
    device = torch.device(how["device"])
    use_labels = model.config.y_condition
    return evaluate_bpd(model, loader, device, how["dequantization_seed"], use_labels=use_labels, desc="test slice")


def measure(model: Glow, images, run: RunConfig, device: torch.device, desc: str) -> float:
    """Mean bits/dim of ``model`` (on ``device``) on every image of ``images``, as training
    evaluates a split: seed ``--eval_seed``, the evaluation batch size, labels for a class-conditional model."""
    loader = data.make_loader(images, batch_size=run.eval_batch_size, shuffle=False, device=device)
    return evaluate_bpd(model, loader, device, run.eval_seed, use_labels=model.config.y_condition, desc=desc)


def card_notes(name: str, detector_file: str, expected: dict) -> str:
    """The model card's last part: the run's length, the shipped detector and expected.json."""
    how = expected["test_slice"]
    trained = expected["checkpoint"]
    return "\n".join(
        [
            f"Shipped with glowflow as `pretrained:{name}` (`glowflow --sample --checkpoint pretrained:{name}`,",
            f'`glowflow.Glow.from_pretrained("{name}")`).',
            "",
            f"- Trained for {trained['epoch']} epochs ({trained['step']} optimizer steps); "
            f"bits/dim measured on {expected['test_images']} test images"
            + (f" and {expected['validation_images']} validation images" if expected["validation_images"] else "")
            + f", dequantisation seed {expected['eval_seed']}.",
            f"- `{detector_file}`: the outlier detector `glowflow --outlier_detection` fits (score "
            f"`{expected['detector']['score']}`, threshold {expected['detector']['threshold']:.4f}, which keeps "
            f"{100 * expected['detector']['tpr']:g}% of {expected['detector']['threshold_images']} "
            f"{expected['detector']['threshold_split']}; reference on {expected['detector']['reference_images']} "
            f"training images), so that `--outlier_detection` and `--score` need no pass over the training set.",
            f"- `{EXPECTED_NAME}`: mean bits/dim {how['mean_bpd']:.6f} on the first {how['first']} "
            f"{expected['dataset']} {how['split']} images (dequantisation seed {how['dequantization_seed']}, "
            f"one batch, {how['device']}), which the tests reproduce.",
        ]
    )


def make_pretrained(checkpoint_path: str, name: str, data_root: str, device_name: str) -> str:
    """Write glowflow/pretrained_models/``name``/ from ``checkpoint_path`` (see the module
    docstring); returns the folder."""
    checkpoint = Checkpoint.read(checkpoint_path)
    if checkpoint.is_folder or not checkpoint.run_config:
        raise GlowflowError(f"{checkpoint_path}: a training checkpoint (.pt, with its run configuration) is needed")
    dataset = checkpoint.dataset
    if not dataset:
        raise GlowflowError(f"{checkpoint_path} does not record the dataset it was trained on")
    device = resolve_device(device_name)
    model = checkpoint.load_model(device)
    run = RunConfig(dataset=dataset, data_root=data_root)  # the defaults of the commands that read the folder
    divisor = 2**model.config.L

    test_set = data.load_dataset(dataset, "test", data_root, checkpoint.image_size, divisor=divisor)
    test_bpd = measure(model, test_set, run, device, "test bits/dim")
    val_size = checkpoint.run_config.get("val_size", 0)
    val_bpd = None
    if val_size:
        train_set = data.load_dataset(dataset, "train", data_root, checkpoint.image_size, divisor=divisor)
        _, val_set, _ = data.split_validation(train_set, val_size, checkpoint.run_config.get("seed", 0))
        val_bpd = measure(model, val_set, run, device, "validation bits/dim")
    command = training_command(checkpoint.run_config, checkpoint.model_config)
    scores = {f"test bits/dim (all {len(test_set)} test images)": test_bpd}
    if val_bpd is not None:
        scores[f"validation bits/dim (the run's {val_size} validation images)"] = val_bpd

    os.makedirs(MODELS, exist_ok=True)
    building = tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=MODELS)
    try:
        model.save_pretrained(building, dataset, checkpoint.image_size, command, scores)
        # Everything below reads the folder back, as the commands will.
        folder = Checkpoint.read(building)
        shipped = folder.load_model(device)
        if model_fingerprint(shipped) != model_fingerprint(model):
            raise GlowflowError(f"{building}: the folder's model differs from the checkpoint's")
        in_name, image_size = folder.data_to_read(None, run.dataset)
        # as run_outlier_detection_command reads them: the training run's training images, and
        # its validation split (never trained on) for the threshold
        fit_sets = FitSets(checkpoint, in_name, run, image_size, divisor)
        validation = (lambda: fit_sets.validation()) if fit_sets.has_validation else None
        detector, detector_file = fit_detector(shipped, building, in_name, run, device, fit_sets.training, validation)
        cpu_model = Glow.from_pretrained(building)  # what the tests load
        how = dict(SLICE, dataset=in_name)
        how["mean_bpd"] = slice_bpd(cpu_model, in_name, data_root, image_size, SLICE)
        how["computed_by"] = (
            "glowflow.train.evaluate_bpd(model, make_loader(subset(load_dataset(dataset, split), range(first)), "
            "batch_size, shuffle=False), device, dequantization_seed, use_labels=model.config.y_condition)"
        )
        expected = {
            "name": name,
            "dataset": dataset,
            "test_slice": how,
            "test_bpd": test_bpd,
            "test_images": len(test_set),
            "validation_bpd": val_bpd,
            "validation_images": val_size,
            "eval_seed": run.eval_seed,
            "model_sha256": model_fingerprint(cpu_model),
            "detector": detector_entry(detector, detector_file, in_name, fit_sets.has_validation),
            "checkpoint": {
                "file": os.path.basename(checkpoint_path),
                "epoch": checkpoint.epoch,
                "step": checkpoint.step,
                "training_command": command,
            },
            "glowflow_version": __version__,
            "written": datetime.date.today().isoformat(),
        }
        if not all(math.isfinite(v) for v in (test_bpd, how["mean_bpd"])):
            raise GlowflowError(f"{checkpoint_path}: the model's bits/dim is not finite")
        atomic_write_text(os.path.join(building, EXPECTED_NAME), json.dumps(expected, indent=2) + "\n")
        notes = card_notes(name, expected["detector"]["file"], expected)
        model.save_pretrained(building, dataset, checkpoint.image_size, command, scores, notes=notes)
        if model_fingerprint(Glow.from_pretrained(building)) != expected["model_sha256"]:
            raise GlowflowError(f"{building}: the folder's model changed when its card was written")
        return _replace(building, os.path.join(MODELS, name))
    finally:
        if os.path.isdir(building):
            shutil.rmtree(building)


def fit_detector(shipped: Glow, building: str, in_name: str, run: RunConfig, device, training, validation):
    """The outlier detector ``glowflow --outlier_detection`` would fit for the folder ``building``
    (``OutlierDetectionSettings`` from the command's defaults, ``detector_for`` under
    ``detector_cache_path_for``'s name, so its cache key matches), its reference on the images
    ``training()`` returns and its threshold on ``validation()`` (None: held back from the
    training images); returns (detector, its file)."""
    settings = OutlierDetectionSettings(
        output_dir=building,
        in_name=in_name,
        reference_cache_path=detector_cache_path_for(building, in_name, shipped.config.n_bits),
        statistics=StatisticsSettings(device=device, seed=run.eval_seed, max_images=run.max_eval_images),
        fit_images=run.fit_images or None,
        detector_score=run.detector_score,
        tpr=run.tpr,
    )

    def loader(dataset):
        return data.make_loader(dataset, batch_size=run.eval_batch_size, shuffle=False, seed=run.seed, device=device)

    detector, _ = detector_for(
        shipped,
        lambda: loader(training()),
        in_name,
        settings.detector(shipped),
        settings.reference_cache_path,
        threshold_images=(lambda: loader(validation())) if validation is not None else None,
    )
    return detector, settings.reference_cache_path


def detector_entry(detector, detector_file: str, in_name: str, has_validation: bool) -> dict:
    """expected.json's description of the shipped detector."""
    return {
        "file": os.path.basename(detector_file),
        "dataset": in_name,
        "n_bits": detector.model.config.n_bits,
        "score": detector.score,
        "tpr": detector.tpr,
        "threshold": detector.threshold_,
        "fit_images": detector.fit_images,
        "reference_images": detector.reference_.n_train,
        "threshold_images": detector.n_threshold_,
        "threshold_split": (
            "images of the training run's validation split (never trained on)"
            if has_validation
            else "training images held back from the reference"
        ),
    }


def refresh_detector(name: str, data_root: str, device_name: str, val_size: int, seed: int) -> str:
    """Refit only the outlier detector of the shipped folder ``name`` (after the detector changed
    on main), keeping its model, its card's training command and bits/dim, and expected.json's
    measurements: the reference on the training run's training images and the threshold on its
    validation split, which ``val_size`` and ``seed`` (the run's ``--val_size`` and ``--seed``)
    rebuild exactly. Built aside and swapped in when done, as :func:`make_pretrained`."""
    final = os.path.join(MODELS, name)
    with open(os.path.join(final, EXPECTED_NAME), encoding="utf-8") as handle:
        expected = json.load(handle)
    building = tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=MODELS)
    try:
        for file in os.listdir(final):
            if not file.startswith("ood_detector_"):
                shutil.copy2(os.path.join(final, file), building)
        device = resolve_device(device_name)
        shipped = Glow.from_pretrained(building, device)
        if model_fingerprint(shipped.cpu()) != expected["model_sha256"]:
            raise GlowflowError(f"{final}: the folder's model is not the one expected.json describes")
        shipped.to(device)
        run = RunConfig(dataset=expected["dataset"], data_root=data_root)
        folder = Checkpoint.read(building)
        in_name, image_size = folder.data_to_read(None, run.dataset)
        divisor = 2**shipped.config.L
        train_set = data.load_dataset(in_name, "train", data_root, image_size, divisor=divisor)
        rest, validation, _ = data.split_validation(train_set, val_size, seed)
        detector, detector_file = fit_detector(
            shipped, building, in_name, run, device, lambda: rest, lambda: validation
        )
        expected["detector"] = detector_entry(detector, detector_file, in_name, True)
        expected["glowflow_version"] = __version__
        expected["written"] = datetime.date.today().isoformat()  # the card's date: when the folder was written
        atomic_write_text(os.path.join(building, EXPECTED_NAME), json.dumps(expected, indent=2) + "\n")
        command, scores = card_provenance(building)
        notes = card_notes(name, expected["detector"]["file"], expected)
        cpu_model = Glow.from_pretrained(building)
        cpu_model.save_pretrained(building, expected["dataset"], folder.image_size, command, scores, notes=notes)
        if model_fingerprint(Glow.from_pretrained(building)) != expected["model_sha256"]:
            raise GlowflowError(f"{building}: the folder's model changed when its card was written")
        return _replace(building, final)
    finally:
        if os.path.isdir(building):
            shutil.rmtree(building)


def _replace(building: str, final: str) -> str:
    """Move the finished folder ``building`` to ``final``, the old one (if any) removed after."""
    os.chmod(building, 0o755)  # mkdtemp's 0700, as a folder made by os.makedirs
    old = None
    if os.path.exists(final):
        old = tempfile.mkdtemp(prefix=".old-", dir=os.path.dirname(final))
        os.rename(final, os.path.join(old, "folder"))
    os.rename(building, final)
    if old is not None:
        shutil.rmtree(old)
    return final


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "checkpoint",
        help="a training checkpoint (.pt) written by glowflow --train (with --detector_only: ignored, '-')",
    )
    parser.add_argument("name", help="the shipped name (pretrained:NAME), e.g. fashionmnist")
    parser.add_argument(
        "--detector_only",
        action="store_true",
        help="refit only the shipped folder's outlier detector (its model, card and expected bits/dim kept), "
        "the threshold on the training run's validation split given by --val_size and --seed",
    )
    parser.add_argument("--val_size", type=int, default=5000, help="the training run's --val_size (--detector_only)")
    parser.add_argument("--seed", type=int, default=0, help="the training run's --seed (--detector_only)")
    parser.add_argument("--data_root", default="./data", help="where glowflow looks for the data (default ./data)")
    parser.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    args = parser.parse_args(argv)
    if not args.name.isidentifier():
        parser.error(f"NAME must be a plain name (letters, digits, _), got {args.name!r}")
    try:
        with writing_shipped_models():  # save_pretrained refuses the package's folder otherwise
            if args.detector_only:
                folder = refresh_detector(args.name, args.data_root, args.device, args.val_size, args.seed)
            else:
                folder = make_pretrained(args.checkpoint, args.name, args.data_root, args.device)
    except GlowflowError as err:
        print(f"make_pretrained: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {folder}: {', '.join(sorted(os.listdir(folder)))}")
    if args.name not in SHIPPED:
        print(f"note: add {args.name!r} to SHIPPED in glowflow/names.py to make pretrained:{args.name} find it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
