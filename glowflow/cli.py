"""Command line: flags -> config -> train / sample / outlier detection / score / export; nothing else.

The flags of GenerativeZoo's Glow script (a copy of y0ast/Glow-PyTorch) keep their names,
meanings and defaults (every flag is declared in :mod:`glowflow.flags`; the defaults and choices
come from :mod:`glowflow.config`). A
user-fixable problem prints one line and exits with status 2 (a misspelt flag with the nearest
flags suggested); Ctrl-C prints one line and exits with status 130. This module imports no torch:
dataset names and checkpoint paths are checked first (:mod:`glowflow.preflight`), then the
commands (and torch) load when one runs. A --sample, --outlier_detection or --score that fails
leaves no empty output folder behind (:mod:`glowflow.outputs`).

A sampling sub-mode alone (``--reconstruct``, ``--interpolate``, ``--manipulate``,
``--manipulate_attribute``) implies ``--sample``; no command at all is an error that lists them.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
from typing import List, Optional

from glowflow.config import (
    MAX_L,
    OUTPUT_ROOT,
    PRESETS,
    GlowConfig,
    RunConfig,
)
from glowflow.errors import GlowflowError, one_line_message
from glowflow.flags import _ARCH, build_parser  # noqa: F401  (build_parser stays importable from here)
from glowflow.outputs import no_empty_folder_left
from glowflow.preflight import check_command_line


def apply_preset(args: argparse.Namespace, argv: Optional[List[str]]) -> argparse.Namespace:
    """``args`` with --preset's values (glowflow.config.PRESETS) for every flag that ``argv`` does
    not set itself; unchanged without --preset."""
    if args.preset is None:
        return args
    probe = build_parser()  # the same flags, with no defaults: only what argv sets is parsed
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    given = set(vars(probe.parse_args(argv)))
    for name, value in PRESETS[args.preset].items():
        if name not in given:
            setattr(args, name, value)
    return args


def run_config_from_args(args: argparse.Namespace) -> RunConfig:
    """The RunConfig of the parsed flags: every RunConfig field from the flag of its name (lists
    as tuples; --dataset, when not given, keeps its default)."""
    names = {f.name for f in dataclasses.fields(RunConfig)}
    values = {
        k: (tuple(v) if isinstance(v, list) else v)
        for k, v in vars(args).items()
        if k in names and not (k == "dataset" and v is None)
    }
    run = RunConfig(**values)
    if run.resume == "last":
        run.resume = os.path.join(run.resolved_output_dir(), "last.pt")
    run.validate()
    return run


def model_config_from_args(args: argparse.Namespace, run: RunConfig) -> GlowConfig:
    """The architecture: the flags, with image shape and classes from the dataset."""
    from glowflow.data import dataset_info
    from glowflow.data.resolve import check_divisible

    info = dataset_info(run.dataset, image_size=run.image_size, data_root=run.data_root)
    if 1 <= args.L <= MAX_L:  # (an L out of range is GlowConfig's to refuse)
        check_divisible(info.name, info.image_shape[1], args.L)
    num_classes = run.num_classes if run.num_classes is not None else (info.num_classes or _ARCH.num_classes)
    from_data = dict(image_shape=tuple(info.image_shape), num_classes=num_classes, y_multilabel=bool(info.multilabel))
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(GlowConfig) if f.name not in from_data}
    return GlowConfig(**flags, **from_data)


def _run(args: argparse.Namespace) -> int:
    run = run_config_from_args(args)
    checkpoints = (
        ("--checkpoint", run.checkpoint),
        ("--background_checkpoint", run.background_checkpoint),
        ("--compare_with", run.compare_with),
    )
    check_command_line(args.dataset, run.out_dataset if args.outlier_detection else (), checkpoints)
    if args.train:
        from glowflow.training import train

        model_config = None if run.resume else model_config_from_args(args, run)
        summary = train(run, model_config)
        if summary["chosen_on"] == "validation":
            chosen = f"best validation bits/dim {summary['best_val_bpd']:.4f} chose the checkpoint"
        else:
            chosen = "no validation split: the checkpoint is the last epoch's"
        print(f"done: {chosen} (test {summary['test_bpd']:.4f}); checkpoints in {summary['output_dir']}")
    if args.sample:
        if run.checkpoint is None:
            raise GlowflowError("--sample needs --checkpoint PATH (a .pt file written by glowflow --train)")
        from glowflow.sample import run_sampling

        run_sampling(run, dataset=args.dataset)
    if args.outlier_detection:
        if run.checkpoint is None:
            raise GlowflowError("--outlier_detection needs --checkpoint PATH (a .pt file written by glowflow --train)")
        from glowflow.ood.command import run_outlier_detection_command

        run_outlier_detection_command(run, dataset=args.dataset)
    if run.score_path is not None:
        if run.checkpoint is None:
            raise GlowflowError("--score needs --checkpoint PATH (a .pt file written by glowflow --train)")
        from glowflow.ood.score_command import run_score_command

        run_score_command(run, dataset=args.dataset, paths=getattr(args, "score_paths", None))
    if args.export is not None:
        if run.checkpoint is None:
            raise GlowflowError("--export needs --checkpoint PATH (a .pt file written by glowflow --train)")
        from glowflow.export import export_checkpoint

        print(f"wrote the model folder {export_checkpoint(run.checkpoint, args.export)}")
    return 0


COMMANDS = "--train, --sample, --outlier_detection, --score PATH, --export FOLDER"
SAMPLE_SUB_MODES = ("reconstruct", "interpolate", "manipulate", "manipulate_attribute")
"""Flags that ask --sample for more than sample grids: alone, they imply --sample."""


def choose_command(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with --sample set when a sampling sub-mode is given without any command;
    GlowflowError listing the commands when there is none at all."""
    commands = (args.train, args.sample, args.outlier_detection, args.score_path is not None, args.export is not None)
    if any(commands):
        return args
    if any(getattr(args, name) not in (None, False) for name in SAMPLE_SUB_MODES):
        args.sample = True
        return args
    raise GlowflowError(f"no command given: use one of {COMMANDS} (glowflow --help lists every flag)")


def run() -> None:
    """The program's entry point (the ``glowflow`` command and ``python -m glowflow``): :func:`main`,
    then exit with its status. Once the work is done, a Ctrl-C or SIGTERM while Python shuts down
    is ignored, so it cannot turn a finished run into a death by signal."""
    code = main()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(code)


def main(argv: Optional[List[str]] = None) -> int:
    """The ``glowflow`` command: 0 when done, 2 for a user-fixable problem (one line on stderr),
    130 when interrupted (Ctrl-C), at any moment: while parsing, importing torch, or working."""
    try:
        parser = build_parser()
        args = choose_command(apply_preset(parser.parse_args(argv), argv))
        with no_empty_folder_left(None if args.train else args.output_dir or OUTPUT_ROOT):
            return _run(args)
    except GlowflowError as err:
        print(f"glowflow: error: {one_line_message(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("glowflow: interrupted", file=sys.stderr)
        return 130
