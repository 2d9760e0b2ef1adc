"""Experiment tracking: metrics.csv always, wandb unless --no_wandb, TensorBoard with --tensorboard.

metrics.csv has one row per epoch (and one for a run stopped mid-epoch by --max_steps): the
columns of :data:`METRIC_COLUMNS` (train, validation and test bits/dim among them). A rollback
(glowflow/training/rollback.py) adds a row of its own between them: its epoch, step and the
learning rate it left, no bits/dim, and its line in a last column, :data:`EVENT_COLUMN`, which the
header gains with the first such row (a run without one has the nine columns only). Each row
is flushed to disk before the run commits the epoch's last.pt; a resumed run first drops the rows
beyond the checkpoint it resumes from (and a row cut short by a kill), since it writes them again,
so a run killed anywhere and resumed has each row exactly once.

A row of an epoch that --max_steps stopped part-way is replaced when a resumed run completes the
epoch (:func:`drop_rows_after` with ``partial``), so an interrupted and resumed run's metrics.csv is
an uninterrupted one's. Beside it, ``steps.csv`` (the training bits/dim every few steps,
:class:`glowflow.curves.StepLog`) and ``training_curves.png`` (:func:`glowflow.curves.plot_curves`),
drawn again after every metrics row.

wandb never crashes or hangs a run: where it is not installed the run goes on without it; where no
API key is configured (not logged in) it runs in offline mode; where an online start fails
(no network) it falls back to offline mode. Each fallback prints one line.
"""

from __future__ import annotations

import csv
import io
import os
import sys
from typing import Any, Dict, Optional, Tuple

from glowflow.curves import StepLog, plot_curves
from glowflow.files import atomic_write_text

METRIC_COLUMNS = (
    "epoch",
    "step",
    "train_bpd",
    "val_bpd",  # empty without a validation split
    "test_bpd",
    "raw_val_bpd",  # the raw (not averaged) weights' validation bits/dim: --ema only
    "lr",
    "images_per_s",
    "seconds",
)
EVENT_COLUMN = "event"
"""The last column, in files that hold an event row (a rollback): what happened; empty in epoch rows."""
CURVES_NAME = "training_curves.png"


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


def _wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        with open(netrc) as handle:
            return "api.wandb.ai" in handle.read()
    except OSError:
        return False


def start_wandb(project: str, run_name: str, config: Dict[str, Any], folder: str):
    """A wandb run (online if possible, else offline), or None if wandb is not installed."""
    try:
        import wandb
    except ImportError:
        _note("wandb is not installed (pip install wandb); logging to metrics.csv only")
        return None
    mode = os.environ.get("WANDB_MODE")
    if mode is None and not _wandb_logged_in():
        _note("wandb is not logged in; logging offline (sync later with `wandb sync`)")
        mode = "offline"
    os.makedirs(folder, exist_ok=True)
    kwargs = dict(project=project, name=run_name, config=config, dir=folder)
    try:
        return wandb.init(mode=mode, settings=wandb.Settings(init_timeout=60, silent=True), **kwargs)
    except Exception as err:  # network down, service unreachable, bad key: fall back, never crash
        if mode == "offline":
            _note(f"wandb could not start ({type(err).__name__}); logging to metrics.csv only")
            return None
        _note(f"wandb could not reach its server ({type(err).__name__}); logging offline")
        try:
            return wandb.init(mode="offline", settings=wandb.Settings(silent=True), **kwargs)
        except Exception as err2:
            _note(f"wandb offline mode failed too ({type(err2).__name__}); logging to metrics.csv only")
            return None


class Tracker:
    """Writes one metrics.csv row per epoch and the step curve (steps.csv), and forwards scalars to
    wandb / TensorBoard."""

    def __init__(
        self,
        output_dir: str,
        use_wandb: bool,
        use_tensorboard: bool,
        run_name: str,
        config: Dict[str, Any],
        resume: bool = False,
        resume_at: Optional[Tuple[int, int]] = None,
        partial: bool = False,
        steps_per_epoch: Optional[int] = None,
    ):
        """``resume``: append to an existing metrics.csv, after dropping its rows beyond
        ``resume_at`` (the resumed checkpoint's epoch and step), if given, and the row at it too
        when ``partial`` (the checkpoint is part-way through an epoch, whose row comes again);
        steps.csv likewise. ``steps_per_epoch`` places metrics rows on the picture's epoch axis."""
        self.csv_path = os.path.join(output_dir, "metrics.csv")
        self.steps_per_epoch = steps_per_epoch
        if not (resume and os.path.exists(self.csv_path)):
            with open(self.csv_path, "w", newline="") as handle:
                csv.writer(handle).writerow(METRIC_COLUMNS)
        elif resume_at is not None:
            drop_rows_after(self.csv_path, *resume_at, partial=partial)
        self.steps = StepLog(output_dir, resume_at[1] if resume and resume_at is not None else None)
        self.wandb_run = start_wandb("glowflow", run_name, config, output_dir) if use_wandb else None
        self.tensorboard = None
        if use_tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                _note("tensorboard is not installed (pip install tensorboard); --tensorboard ignored")
            else:
                self.tensorboard = SummaryWriter(os.path.join(output_dir, "tensorboard"))

    def log(self, step: int, values: Dict[str, float]) -> None:
        if self.wandb_run is not None:
            self.wandb_run.log(values, step=step)
        if self.tensorboard is not None:
            for key, value in values.items():
                self.tensorboard.add_scalar(key, value, step)

    def log_epoch(self, row: Dict[str, Any]) -> None:
        self._append([row.get(c, "") for c in METRIC_COLUMNS])
        self._plot()
        self.log(
            int(row["step"]),
            {f"epoch/{k}": v for k, v in row.items() if k not in ("epoch", "step") and isinstance(v, (int, float))},
        )

    def log_event(self, row: Dict[str, Any], event: str) -> None:
        """A row marking an event between evaluations (a rollback): ``row``'s columns (epoch, step,
        learning rate), and ``event`` in the last column, which the header gains first if it lacks it."""
        with open(self.csv_path, newline="") as handle:
            rows = list(csv.reader(handle))
        if rows and rows[0] and rows[0][-1] != EVENT_COLUMN:
            atomic_write_text(self.csv_path, _csv_text([rows[0] + [EVENT_COLUMN], *rows[1:]]))
        self._append([row.get(c, "") for c in METRIC_COLUMNS] + [event])
        self._plot()
        self.log(int(row["step"]), {"train/lr": row["lr"], "train/rollback": 1})

    def _append(self, cells) -> None:
        with open(self.csv_path, "a", newline="") as handle:
            csv.writer(handle).writerow(cells)
            handle.flush()
            os.fsync(handle.fileno())  # on disk before last.pt, which is written after it

    def _plot(self) -> None:
        folder = os.path.dirname(self.csv_path)
        plot_curves(self.csv_path, os.path.join(folder, CURVES_NAME), self.steps.path, self.steps_per_epoch)

    def log_step(self, step: int, epoch: float, train_bpd: float) -> None:
        """A point of the step curve: steps.csv, and ``train/bpd`` for wandb / TensorBoard."""
        self.steps.write(step, epoch, train_bpd)
        self.log(step, {"train/bpd": train_bpd})

    def log_image(self, step: int, key: str, path: str) -> None:
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.log({key: wandb.Image(path)}, step=step)

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
        if self.tensorboard is not None:
            self.tensorboard.close()


def drop_rows_after(path: str, epoch: int, step: int, partial: bool = False) -> int:
    """Remove the rows of metrics.csv ``path`` that come after ``(epoch, step)`` (a larger step, or
    the same step and a larger epoch), with ``partial`` the epoch row at ``(epoch, step)`` too (not
    an event row), and a last row a kill cut short; the number removed. A row may lack the last
    column, :data:`EVENT_COLUMN`. The file is rewritten atomically, and only if something is removed."""
    with open(path, newline="") as handle:
        text = handle.read()
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        atomic_write_text(path, _csv_text([METRIC_COLUMNS]))
        return 0
    header, kept = rows[0], [rows[0]]
    whole = {len(header), len(header) - 1} if header and header[-1] == EVENT_COLUMN else {len(header)}
    for i, row in enumerate(rows[1:], start=1):
        cut_short = i == len(rows) - 1 and not text.endswith("\n")
        try:
            row_epoch, row_step = int(row[0]), int(row[1])
        except (ValueError, IndexError):
            continue
        position, resumed_at = (row_step, row_epoch), (step, epoch)
        is_event = len(row) == len(header) and header[-1] == EVENT_COLUMN and bool(row[-1])
        before = position < resumed_at or (position == resumed_at and not (partial and not is_event))
        if not cut_short and len(row) in whole and before:
            kept.append(row)
    removed = len(rows) - len(kept)
    if removed or not text.endswith("\n"):
        atomic_write_text(path, _csv_text(kept))
    return removed


def _csv_text(rows) -> str:
    buffer = io.StringIO(newline="")
    csv.writer(buffer).writerows(rows)
    return buffer.getvalue()
