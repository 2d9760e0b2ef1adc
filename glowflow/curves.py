"""The training curve: the training bits/dim as a run goes, and the picture of a run.

* :class:`RunningLoss` -- the sums behind the training bits/dim: the current epoch's (its
  metrics.csv row: ``train_bpd``, images/s, seconds) and the current point's of the step curve.
  Sums over the finite optimizer steps (each step's bits/dim averaged over all processes), kept in
  ``last.pt`` (``running_loss``), so a run interrupted mid-epoch and resumed reports what an
  uninterrupted run reports, to the last bit.
* :class:`StepLog` -- ``steps.csv`` beside metrics.csv: ``step, epoch, train_bpd``, a row every
  :func:`curve_interval` steps (about :data:`POINTS_PER_EPOCH` per epoch) and at each epoch's end,
  with the mean training bits/dim of the steps since the previous row; ``epoch`` is fractional
  (step / steps per epoch). A resumed run first drops the rows beyond its checkpoint.
* :func:`curve_series` / :func:`plot_curves` -- ``training_curves.png``: the training line from
  steps.csv, the validation and test bits/dim of each epoch (metrics.csv) as markers on the same
  axes, and each rollback (an event row of metrics.csv) as a vertical line, x in epochs, non-finite
  values left out (:func:`curve_series` is the data; the picture is drawn with matplotlib's Agg
  canvas, no display, written atomically).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
from typing import Any, Dict, List, Optional, Tuple

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from glowflow.config import is_int, is_number
from glowflow.errors import GlowflowError
from glowflow.files import atomic_write, atomic_write_text

STEPS_NAME = "steps.csv"
STEP_COLUMNS = ("step", "epoch", "train_bpd")
POINTS_PER_EPOCH = 20
"""Rows of steps.csv per epoch (fewer when an epoch has fewer steps)."""
SPLIT_MARKERS = (  # metrics.csv column -> label, marker, line style
    ("val_bpd", "validation", "o", "-"),
    ("test_bpd", "test", "s", "-"),
    ("raw_val_bpd", "validation, raw weights (no EMA)", "^", "--"),
)


def curve_interval(steps_per_epoch: int) -> int:
    """Steps between two rows of steps.csv."""
    return max(1, math.ceil(steps_per_epoch / POINTS_PER_EPOCH))


@dataclasses.dataclass
class RunningLoss:
    """Sums over the finite steps of the current epoch, and of the current point of the curve."""

    epoch_sum: float = 0.0  # bits/dim summed over the epoch's finite steps
    epoch_steps: int = 0
    epoch_images: int = 0  # images of those steps, all processes together
    epoch_seconds: float = 0.0  # time spent in the epoch's steps
    point_sum: float = 0.0  # the same since the last row of steps.csv
    point_steps: int = 0

    def add(self, bpd: float, images: int) -> None:
        self.epoch_sum += bpd
        self.epoch_steps += 1
        self.epoch_images += images
        self.point_sum += bpd
        self.point_steps += 1

    def epoch_mean(self) -> float:
        """The epoch's training bits/dim so far (0 before its first finite step)."""
        return self.epoch_sum / max(1, self.epoch_steps)

    def take_point(self) -> Optional[float]:
        """The mean bits/dim since the last point (None without a finite step), starting the next."""
        mean = self.point_sum / self.point_steps if self.point_steps else None
        self.point_sum, self.point_steps = 0.0, 0
        return mean

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_checkpoint(cls, value: Any, path: str) -> RunningLoss:
        """The sums a checkpoint holds (``running_loss``), checked; zero for a checkpoint written
        before it held them (its resumed epoch then reports only the steps after the resume)."""
        if value is None:
            return cls()
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        if not isinstance(value, dict) or set(value) != set(fields):
            raise GlowflowError(f"{path}: malformed checkpoint: running_loss must hold {', '.join(fields)}")
        for name, kind in fields.items():
            number = value[name]
            ok = is_int(number) if kind == "int" else is_number(number) and math.isfinite(number)
            if not ok or number < 0 and kind == "int":
                raise GlowflowError(f"{path}: malformed checkpoint: running_loss {name} is {number!r}")
        return cls(**{name: (float(v) if fields[name] == "float" else v) for name, v in value.items()})


class StepLog:
    """steps.csv of a run's folder: made anew for a new run; a resumed run keeps the rows up to
    the step it resumes from (``resume_step``) and appends."""

    def __init__(self, folder: str, resume_step: Optional[int] = None):
        self.path = os.path.join(folder, STEPS_NAME)
        if resume_step is None or not os.path.exists(self.path):
            atomic_write_text(self.path, _csv_text([STEP_COLUMNS]))
        else:
            _drop_rows_after(self.path, resume_step)

    def write(self, step: int, epoch: float, train_bpd: float) -> None:
        """Append a row, on disk (fsync) before the checkpoint that follows it."""
        with open(self.path, "a", newline="") as handle:
            csv.writer(handle).writerow([step, f"{epoch:.4f}", f"{train_bpd:.6f}"])
            handle.flush()
            os.fsync(handle.fileno())


def _drop_rows_after(path: str, step: int) -> None:
    """Remove the rows of steps.csv beyond ``step`` and a last row a kill cut short (atomically)."""
    with open(path, newline="") as handle:
        text = handle.read()
    rows = list(csv.reader(io.StringIO(text)))
    kept: List[List[str]] = [list(STEP_COLUMNS)]
    for i, row in enumerate(rows[1:], start=1):
        cut_short = i == len(rows) - 1 and not text.endswith("\n")
        if not cut_short and len(row) == len(STEP_COLUMNS) and _number(row[0]) is not None and float(row[0]) <= step:
            kept.append(row)
    if kept != rows:
        atomic_write_text(path, _csv_text(kept))


def _csv_text(rows) -> str:
    buffer = io.StringIO(newline="")
    csv.writer(buffer).writerows(rows)
    return buffer.getvalue()


def _read_rows(path: Optional[str]) -> List[Dict[str, str]]:
    if path is None or not os.path.exists(path):
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _number(text: Any) -> Optional[float]:
    """A CSV cell as a finite number, or None (empty, not a number, or not finite)."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _x_of(row, steps_per_epoch: Optional[int]) -> Optional[float]:
    """A metrics.csv row's place in epochs: its step over ``steps_per_epoch`` where given, else its epoch."""
    step = _number(row.get("step"))
    if steps_per_epoch and step is not None:
        return step / steps_per_epoch
    return _number(row.get("epoch"))


@dataclasses.dataclass(frozen=True)
class CurveSeries:
    """One line of ``training_curves.png``: its label, whether it is the training line (a thin
    line; the splits' are markers), matplotlib marker and line style, and its points (x in epochs,
    bits/dim), finite values only."""

    label: str
    training: bool
    marker: Optional[str]
    style: str
    xs: Tuple[float, ...]
    values: Tuple[float, ...]


def curve_series(
    metrics_path: str, steps_path: Optional[str] = None, steps_per_epoch: Optional[int] = None
) -> List[CurveSeries]:
    """What :func:`plot_curves` draws: the training line of steps.csv ``steps_path`` (without one,
    metrics.csv's per-epoch train_bpd), then each of :data:`SPLIT_MARKERS` that has a value, against
    epochs (a metrics row's step divided by ``steps_per_epoch`` where given, else its epoch). A
    cell that is empty, not a number or not finite is left out (its point, not its row)."""
    rows = [r for r in _read_rows(metrics_path) if not r.get("event")]  # rollbacks are not evaluations

    def x_of(row) -> Optional[float]:
        return _x_of(row, steps_per_epoch)

    def finite(points) -> List[Tuple[float, float]]:
        return [(x, v) for x, v in points if x is not None and v is not None]

    series = []
    points = finite((_number(r.get("epoch")), _number(r.get("train_bpd"))) for r in _read_rows(steps_path))
    label = "train (mean of the steps between points)"
    if not points:  # no step curve: the epochs' means
        points = finite((x_of(r), _number(r.get("train_bpd"))) for r in rows)
        label = "train (mean over the epoch)"
    if points:
        xs, values = zip(*points)
        series.append(CurveSeries(label, True, "." if len(points) < 50 else None, "-", xs, values))
    for column, split_label, marker, style in SPLIT_MARKERS:
        split = finite((x_of(r), _number(r.get(column))) for r in rows)
        if split:
            xs, values = zip(*split)
            series.append(CurveSeries(split_label, False, marker, style, xs, values))
    return series


def plot_curves(
    metrics_path: str, png_path: str, steps_path: Optional[str] = None, steps_per_epoch: Optional[int] = None
) -> Optional[str]:
    """Draw ``training_curves.png`` (``png_path``, atomically): the lines of :func:`curve_series`
    against epochs. Its path, or None when there is nothing to draw."""
    series = curve_series(metrics_path, steps_path, steps_per_epoch)
    if not series:
        return None
    rows = _read_rows(metrics_path)
    events = [r for r in rows if r.get("event")]  # rollbacks (glowflow/tracking.py's EVENT_COLUMN)
    evaluations = len(rows) - len(events)
    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for line in series:
        if line.training:
            ax.plot(line.xs, line.values, line.style, linewidth=1.0, marker=line.marker, label=line.label)
        else:
            ax.plot(line.xs, line.values, line.style, marker=line.marker, markersize=5, label=line.label)
    rollback_xs = [x for x in (_x_of(r, steps_per_epoch) for r in events) if x is not None]
    for i, x in enumerate(rollback_xs):
        ax.axvline(x, color="tab:red", linewidth=0.8, alpha=0.5, label=None if i else "rollback")
    ax.set_xlabel("epochs")
    ax.set_ylabel("bits/dim")
    ax.set_title(f"bits/dim ({evaluations} evaluation{'s' if evaluations != 1 else ''})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return atomic_write(png_path, lambda handle: fig.savefig(handle, format="png"))
