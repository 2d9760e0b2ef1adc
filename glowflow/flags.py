"""The command line's flags: every flag of ``glowflow``, in groups, with its default and choices
from :mod:`glowflow.config` (the flags of GenerativeZoo's Glow script keep their names, meanings
and defaults), and the parser that reads them (:func:`build_parser`: a one-line error with the
nearest flags for a misspelt one, each default said once in --help). No torch is imported."""

from __future__ import annotations

import argparse

from glowflow import __version__
from glowflow.config import (
    AMP_CHOICES,
    FLOW_COUPLINGS,
    FLOW_PERMUTATIONS,
    IMAGE_TRANSFORMS,
    OOD_PRECISIONS,
    PRESETS,
    PRIOR_FITS,
    GlowConfig,
    RunConfig,
)
from glowflow.preflight import did_you_mean

_RUN = RunConfig()
_ARCH = GlowConfig()

DATASET_HELP = (
    "mnist, fashionmnist, cifar10, cifar100, svhn, chestmnist, octmnist, tissuemnist, pneumoniamnist, "
    "tinyimagenet, places365, dtd, imagenet, or a path to an image folder or .npz"
)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``(default: X)`` after a flag's help (a list as its values, ``0.7`` not ``[0.7]``), unless the
    help already says its default, or the default is None or False (a flag that is off, or a value
    chosen elsewhere)."""

    def _get_help_string(self, action):
        if "default" in (action.help or "").lower() or action.default is None or action.default is False:
            return action.help
        if isinstance(action.default, (list, tuple)):
            values = " ".join(str(v) for v in action.default).replace("%", "%%")
            return f"{action.help} (default: {values})"
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (status 2) that suggests the nearest flags for
    a misspelt one, instead of the whole usage."""

    def error(self, message):
        if message.startswith("unrecognized arguments:"):
            flags = [o for o in self._option_string_actions if o.startswith("--")]
            words = [w.split("=", 1)[0] for w in message.split(":", 1)[1].split() if w.startswith("-")]
            message += "".join(did_you_mean(w, flags) for w in dict.fromkeys(words))
        self.exit(2, f"{self.prog}: error: {message} (glowflow --help lists every flag)\n")


def build_parser() -> argparse.ArgumentParser:
    """Every flag, in groups; defaults and choices from glowflow.config."""
    p = _Parser(
        prog="glowflow",
        formatter_class=_HelpFormatter,
        description="Glow (Kingma & Dhariwal, 2018): train, sample and detect outliers.",
    )
    p.add_argument("--version", action="version", version=f"glowflow {__version__}")
    _add_command_flags(p.add_argument_group("what to do"))
    _add_data_flags(p.add_argument_group("data"))
    _add_training_flags(p.add_argument_group("training"))
    _add_architecture_flags(p.add_argument_group("architecture (stored in the checkpoint)"))
    _add_output_flags(p.add_argument_group("output and logging"))
    _add_sampling_flags(p.add_argument_group("sampling and manipulation (--sample)"))
    _add_outlier_flags(p.add_argument_group("outlier detection (--outlier_detection, --score)"))
    return p


def _add_command_flags(group) -> None:
    group.add_argument("--train", action="store_true", help="Train model")
    group.add_argument("--sample", action="store_true", help="Sample from model (needs --checkpoint)")
    group.add_argument("--outlier_detection", action="store_true", help="Outlier detection (needs --checkpoint)")
    group.add_argument(
        "--score",
        dest="score_path",
        metavar="PATH",
        nargs="+",
        action=_ScorePaths,
        default=_RUN.score_path,
        help="Score images for outliers: image files, folders of images (however few) and .npz files; "
        "unreadable files are skipped and marked in the CSV. Writes a CSV and a picture sheet, prints a "
        "summary (needs --checkpoint)",
    )
    group.add_argument(
        "--export",
        metavar="FOLDER",
        default=None,
        help="Write the checkpoint's model as a shareable folder: config.json, model.safetensors and a "
        "README.md model card, loaded by glowflow.Glow.from_pretrained and by every --checkpoint (needs --checkpoint)",
    )


class _ScorePaths(argparse.Action):
    """--score PATH [PATH ...]: the first path in ``score_path`` (RunConfig's field, which says
    that --score was given), every path in ``score_paths``."""

    def __call__(self, parser, namespace, values, option_string=None):
        namespace.score_path = values[0]
        namespace.score_paths = list(values)


def _add_data_flags(group) -> None:
    group.add_argument(
        "--dataset",
        default=None,
        help=f"Dataset name: {DATASET_HELP} (default: {_RUN.dataset} for --train, the "
        f"checkpoint's own dataset for --sample and --outlier_detection)",
    )
    group.add_argument(
        "--out_dataset", nargs="+", default=list(_RUN.out_dataset), help="Outlier dataset name(s) or path(s)"
    )
    group.add_argument("--data_root", default=_RUN.data_root, help="Where datasets are read from / downloaded to")
    group.add_argument(
        "--image_size",
        type=int,
        default=_RUN.image_size,
        help="Override the dataset's image size (must be divisible by 2**L)",
    )
    group.add_argument("--num_workers", type=int, default=_RUN.num_workers, help="Number of workers for Dataloader")


def _add_training_flags(group) -> None:
    group.add_argument("--batch_size", type=int, default=_RUN.batch_size, help="Batch size")
    group.add_argument("--n_epochs", type=int, default=_RUN.n_epochs, help="Number of epochs")
    group.add_argument("--lr", type=float, default=_RUN.lr, help="Learning rate (Adamax)")
    group.add_argument("--warmup", type=int, default=_RUN.warmup, help="Number of warmup epochs (linear, per batch)")
    group.add_argument("--decay", type=float, default=_RUN.decay, help="Weight decay of Adamax")
    group.add_argument("--max_grad_clip", type=float, default=_RUN.max_grad_clip, help="Max Grad clip (value; 0 = off)")
    group.add_argument("--max_grad_norm", type=float, default=_RUN.max_grad_norm, help="Max Grad Norm (0 = off)")
    group.add_argument("--n_bits", type=int, default=_ARCH.n_bits, help="Number of bits per pixel (1..8)")
    group.add_argument("--y_weight", type=float, default=_RUN.y_weight, help="Weight of class condition loss")
    group.add_argument(
        "--sample_and_save_freq", type=int, default=_RUN.sample_and_save_freq, help="Sample and save frequency (epochs)"
    )
    group.add_argument("--seed", type=int, default=_RUN.seed, help="Random seed")
    group.add_argument("--max_steps", type=int, default=_RUN.max_steps, help="Stop after this many optimizer steps")
    group.add_argument(
        "--prior_fit_images",
        type=int,
        default=_RUN.prior_fit_images,
        help="Training images the priors' Gaussians are fitted on at the end of every epoch (--prior_fit)",
    )
    group.add_argument(
        "--max_rollbacks",
        type=int,
        default=_RUN.max_rollbacks,
        help="A step whose loss, gradients or weights are not finite puts back the last finite state kept in "
        "memory, skips its batch and halves the learning rate for 100 steps; after this many rollbacks the "
        "next one stops the run (0: such steps are only skipped)",
    )
    group.add_argument(
        "--resume",
        nargs="?",
        const="last",
        default=_RUN.resume,
        help="Resume from a checkpoint (alone: <output_dir>/last.pt)",
    )
    group.add_argument(
        "--overwrite",
        action="store_true",
        help="Start a new run in an --output_dir that holds a previous run, removing its checkpoints and records",
    )
    group.add_argument(
        "--perturb",
        type=float,
        default=_RUN.perturb,
        help="Replace each pixel by a random value with this probability (background model "
        "for the likelihood-ratio outlier score)",
    )
    group.add_argument(
        "--val_size",
        type=int,
        default=_RUN.val_size,
        help="Validation images carved from the training split (seeded by --seed); they choose the best "
        "checkpoint. Default: 10%% of the training split, at most 5000; 0: none (the best checkpoint is "
        "then the last epoch's)",
    )
    group.add_argument(
        "--ema",
        type=float,
        default=_RUN.ema,
        help="Polyak averaging decay (e.g. 0.999): evaluation, checkpoints and samples use the averaged "
        "weights; 0 = off",
    )
    group.add_argument(
        "--augment",
        action="store_true",
        help="Random whole-pixel shifts (up to 10%% of the side, edges repeated) and, for RGB images, "
        "left-right flips, seeded by (--seed, step)",
    )
    group.add_argument(
        "--grad_checkpoint",
        action="store_true",
        help="Recompute each flow step's activations in the backward pass (less memory, more time)",
    )
    group.add_argument(
        "--preset",
        default=_RUN.preset,
        choices=tuple(PRESETS),
        help="A published configuration; flags given on the command line win. cifar10: "
        + ", ".join(f"--{k} {v}" if not isinstance(v, bool) else f"--{k}" for k, v in PRESETS["cifar10"].items()),
    )


def _add_architecture_flags(group) -> None:
    group.add_argument("--hidden_channels", type=int, default=_ARCH.hidden_channels, help="Hidden channels")
    group.add_argument("--K", type=int, default=_ARCH.K, help="Number of layers per block")
    group.add_argument("--L", type=int, default=_ARCH.L, help="Number of blocks")
    group.add_argument("--actnorm_scale", type=float, default=_ARCH.actnorm_scale, help="Act norm scale")
    group.add_argument(
        "--flow_permutation", default=_ARCH.flow_permutation, choices=FLOW_PERMUTATIONS, help="Flow permutation"
    )
    group.add_argument("--flow_coupling", default=_ARCH.flow_coupling, choices=FLOW_COUPLINGS, help="Flow coupling")
    group.add_argument("--LU_decomposed", action="store_true", help="Train with LU decomposed 1x1 convs")
    group.add_argument(
        "--coupling_scale_min",
        type=float,
        default=_ARCH.coupling_scale_min,
        help="Lower bound of the affine coupling's scale: s_min + (1 - s_min) * sigmoid(raw + 2) (0: the paper's "
        "sigmoid(raw + 2)); bounds what a reverse coupling can multiply a value by (docs/sampling.md)",
    )
    group.add_argument(
        "--prior_fit",
        default=_ARCH.prior_fit,
        choices=PRIOR_FITS,
        help="Each prior's Gaussian on its standardised latent, fitted in closed form to --prior_fit_images "
        "training images at the end of every epoch: full (a full covariance, diagonal for latents over "
        "4096 values), diag, or none (the paper's priors) (docs/training.md)",
    )
    group.add_argument("--learn_top", action="store_true", help="Learn top layer (prior)")
    group.add_argument("--y_condition", action="store_true", help="Class Conditioned Glow")
    group.add_argument(
        "--num_classes",
        type=int,
        default=_RUN.num_classes,
        help=f"Number of classes (default: the dataset's; {_ARCH.num_classes} if unknown)",
    )


def _add_output_flags(group) -> None:
    group.add_argument(
        "--checkpoint",
        default=_RUN.checkpoint,
        help="Checkpoint path: a .pt file written by --train, a model folder (config.json + model.safetensors), "
        "or pretrained:fashionmnist, the model shipped with glowflow",
    )
    group.add_argument("--output_dir", default=_RUN.output_dir, help="Output folder (default outputs/Glow_<dataset>)")
    group.add_argument("--no_wandb", action="store_true", help="Disable Wandb")
    group.add_argument("--tensorboard", action="store_true", help="Also write TensorBoard logs")
    group.add_argument("--device", default=_RUN.device, help="auto (cuda, mps, cpu), cpu, cuda, cuda:N, mps")
    group.add_argument("--compile", action="store_true", help="torch.compile the training step (pays off on CUDA)")
    group.add_argument(
        "--amp",
        default=_RUN.amp,
        choices=AMP_CHOICES,
        help="Mixed precision: bf16 autocast for the coupling networks (log-dets and priors stay float32); auto: bf16 "
        "where this CPU/GPU computes it natively (AMX, AVX-512 BF16, CUDA 8.0+), else none",
    )


def _add_sampling_flags(group) -> None:
    group.add_argument(
        "--n_samples",
        type=int,
        default=_RUN.n_samples,
        help="Samples per grid; samples that are not finite (or pass 100 in absolute value at a level) are "
        "drawn again, up to 10 rounds, and each grid's count is printed",
    )
    group.add_argument(
        "--temperature", type=float, nargs="+", default=list(_RUN.temperature), help="One or more sampling temperatures"
    )
    group.add_argument(
        "--class",
        dest="sample_class",
        type=int,
        default=_RUN.sample_class,
        help="Sample this class (class-conditional models)",
    )
    group.add_argument(
        "--compare_with",
        default=_RUN.compare_with,
        metavar="CHECKPOINT",
        help="Also a sheet (samples_compared.png) of this model's samples beside those of CHECKPOINT (e.g. "
        "pretrained:fashionmnist) at each temperature, every row labelled with its model",
    )
    group.add_argument("--reconstruct", action="store_true", help="Reconstruct test images")
    group.add_argument("--interpolate", action="store_true", help="Interpolate between pairs of test images")
    group.add_argument(
        "--manipulate",
        type=int,
        nargs=2,
        metavar=("SOURCE", "TARGET"),
        default=_RUN.manipulate,
        help="Class-to-class manipulation (class-conditional models): move SOURCE-class test images towards "
        "TARGET along the difference of the class-mean latents (of test images)",
    )
    group.add_argument(
        "--manipulate_attribute",
        type=_index_list,
        default=_RUN.manipulate_attribute,
        metavar="ATTRIBUTE",
        help="Attribute manipulation (Glow, section 5), any model: move test images along the mean latent of "
        "training images with ATTRIBUTE minus those without. ATTRIBUTE: a class, a group of classes "
        "(e.g. 5,7,9: footwear in Fashion-MNIST) or, for multi-label data, a finding index (or several: any present)",
    )
    group.add_argument(
        "--manipulate_scales",
        type=float,
        nargs="+",
        default=list(_RUN.manipulate_scales),
        help="Scales of the attribute direction, one column each (0: the test image itself)",
    )
    group.add_argument(
        "--n_interpolation_steps",
        type=int,
        default=_RUN.n_interpolation_steps,
        help="Images per interpolation / class-to-class manipulation row",
    )


def _index_list(text: str) -> tuple:
    """'5,7,9' -> (5, 7, 9): class or finding indices of --manipulate_attribute."""
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers (e.g. 5,7,9), got {text!r}") from None


def _add_outlier_flags(group) -> None:
    group.add_argument(
        "--background_checkpoint",
        default=_RUN.background_checkpoint,
        help="Checkpoint of a background model (trained with --perturb) for the likelihood-ratio score",
    )
    group.add_argument(
        "--max_eval_images",
        type=int,
        default=_RUN.max_eval_images,
        help="Use at most this many images of each split (quick looks)",
    )
    group.add_argument(
        "--detector",
        default=_RUN.detector,
        help="A saved outlier detector (.npz, e.g. the one cached beside the checkpoint) for --score, "
        "instead of fitting one on the checkpoint's training data",
    )
    group.add_argument(
        "--fit_images",
        type=int,
        default=_RUN.fit_images,
        help="Images the detector fits on (a seeded subset: four fifths of training images for the reference, "
        "a fifth for the threshold, from the checkpoint's validation split when it has one; 0 = all)",
    )
    group.add_argument(
        "--tpr",
        type=float,
        default=_RUN.tpr,
        help="Share of the threshold images (inliers the reference was not fitted on) the decision threshold keeps",
    )
    group.add_argument(
        "--detector_score",
        default=_RUN.detector_score,
        help="The score --score and each report decide with (combined: dos_orientation plus the score of a "
        "classifier trained on the training images' class labels when they have some; else dos_orientation)",
    )
    group.add_argument(
        "--orientation_transforms",
        nargs="*",
        choices=IMAGE_TRANSFORMS,
        default=list(_RUN.orientation_transforms),
        metavar="T",
        help=f"Transforms ({', '.join(IMAGE_TRANSFORMS)}) the orientation score compares each image with, one more "
        "model pass each; none given: no orientation score (combined builds on dos) and scoring is about 3x faster",
    )
    group.add_argument(
        "--ood_precision",
        choices=OOD_PRECISIONS,
        default=_RUN.ood_precision,
        help="The detector's model passes: float32, bf16 (autocast of the coupling networks), or auto: bf16 where "
        "this CPU/GPU computes it natively (2.5-3x faster with AMX, the same AUROCs), else float32",
    )
