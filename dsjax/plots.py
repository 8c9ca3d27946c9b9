"""PNG plots of training and search runs, read back from their workdirs.

  from dsjax import plots
  plots.figure_curves(["runs/fp32", "runs/mixed"])  # a matplotlib Figure, runs overlaid
  plots.write_plots(["runs/fp32", "runs/mixed"])    # every kind with data, as PNG files
  plots.draw_detections("boxes.png", images, predictions, truths, names)  # a detector's boxes

Figures are `matplotlib.figure.Figure` objects made without pyplot, so drawing one changes
no global backend, and files are written through the Agg canvas. A notebook shows a
figure left as a cell's last value once its inline backend is on (`%matplotlib inline`,
Colab's default). From dsjax only `dsjax.errors` is imported: the trainer may call
this module at the end of a run without pulling in anything else.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dsjax.errors import ConfigError, DataError

if TYPE_CHECKING:
  from matplotlib.figure import Figure

DPI = 80
# `dsjax.nas.derivation.flat_probabilities`: arch/block_0/op/conv_3x3, .../channels/16, .../keep.
_ARCH_KEY = re.compile(r"arch/block_(\d+)/(?:(op|channels)/(.+)|keep)$")


@dataclasses.dataclass
class Run:
  """One run read back from its workdir.

  Attributes:
    name: the workdir's folder name (the legend label).
    workdir: the folder.
    records: the metrics.jsonl objects, in file order.
    summary: summary.json ({} until the run has finished).
    config: config.json ({} if absent).
  """
  name: str
  workdir: Path
  records: list[dict[str, Any]]
  summary: dict[str, Any]
  config: dict[str, Any]


Runs = Run | str | Path | Sequence[Run | str | Path]


class _NoData(DataError):
  """The runs logged nothing a figure draws: write_plots skips that figure."""


def _read_json(path: Path) -> dict[str, Any]:
  if not path.exists():
    return {}
  try:
    payload = json.loads(path.read_text())
  except json.JSONDecodeError as error:
    raise DataError(f"{path}: not valid JSON ({error})") from error
  if not isinstance(payload, dict):
    raise DataError(f"{path}: expected a JSON object, got {type(payload).__name__}")
  return payload


def load_run(workdir: str | Path) -> Run:
  """Reads a dsjax-train or dsjax-search workdir.

  Args:
    workdir: the run's folder, holding metrics.jsonl (summary.json, config.json optional).

  Returns:
    The Run.

  Raises:
    DataError: naming the file, when metrics.jsonl is missing, empty or has a line that is
      not a JSON object with an integer "step" (or summary.json/config.json is not JSON).
  """
  workdir = Path(workdir)
  path = workdir / "metrics.jsonl"
  if not path.is_file():
    raise DataError(f"{path}: no such file; is {workdir} a dsjax-train or dsjax-search workdir?")
  text = path.read_text()
  lines = text.splitlines()
  records = []
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as error:
      if number == len(lines) and not text.endswith("\n"):
        break  # A live run is still writing its last line: plot what is complete.
      raise DataError(f"{path}, line {number}: not valid JSON ({error.msg})") from error
    if not isinstance(record, dict) or not isinstance(record.get("step"), int):
      raise DataError(f"{path}, line {number}: expected an object with an integer 'step'")
    records.append(record)
  if not records:
    raise DataError(f"{path}: no records yet (the run has not logged a step)")
  return Run(workdir.absolute().name, workdir, records, _read_json(workdir / "summary.json"),
             _read_json(workdir / "config.json"))


def _as_runs(runs: Runs) -> list[Run]:
  if isinstance(runs, Run | str | Path):
    runs = [runs]
  if not runs:
    raise ValueError("no runs given: pass a Run, a workdir, or a sequence of them")
  return [run if isinstance(run, Run) else load_run(run) for run in runs]


def _number(value: Any) -> float | None:
  if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
    return None
  return float(value)


def _series(run: Run, key: str) -> tuple[list[int], list[float]]:
  """Steps and values of `key`, skipping records without it and nulls (non-finite values)."""
  points = [(r["step"], _number(r.get(key))) for r in run.records]
  points = [(step, value) for step, value in points if value is not None]
  return [step for step, _ in points], [value for _, value in points]


def _any(run: Run, key: str, test: Callable[[float], bool]) -> bool:
  return any(test(value) for value in _series(run, key)[1])


@dataclasses.dataclass
class _Panel:
  title: str
  keys: tuple[str, ...]  # Alternatives: each run draws the first it logged.
  scale: str = "linear"  # Or "log", "log2" (loss scales are powers of 2), "percent".
  steps: bool = False  # Piecewise-constant values: a staircase.
  marker: str = ""  # Sparse series (eval steps only) show their points.
  absent: float | None = None  # A value meaning "not measured" (MFU 0: peak unknown).
  final: str = ""  # A summary.json key drawn as a star at the run's last step.

  def key_of(self, run: Run) -> str | None:
    """The first of `keys` the run logged a measured value of, if any."""
    return next((key for key in self.keys if _any(
        run, key, lambda v: self.absent is None or v != self.absent)), None)


def _matplotlib() -> Any:
  """matplotlib, imported lazily (importing dsjax must not need it), or a clear error."""
  try:
    import matplotlib.backends.backend_agg
    import matplotlib.figure
  except ImportError as error:
    raise ConfigError("plots need matplotlib, which is not installed: pip install "
                      "'dsjax[plot]' (or matplotlib)") from error
  return matplotlib


def _new_figure(width: float, height: float) -> Figure:
  return _matplotlib().figure.Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _draw(runs: Runs, panels: Sequence[_Panel], what: str,
          include: Callable[[Run], bool] = lambda run: True) -> Figure:
  """One panel per entry of `panels` some run has data for, one line per run in it; runs
  failing `include` are left out (their colour stays reserved, so overlays match)."""
  from matplotlib.ticker import PercentFormatter

  every_run = _as_runs(runs)
  colors = {id(run): f"C{index % 10}" for index, run in enumerate(every_run)}
  runs = [run for run in every_run if include(run)]
  panels = [panel for panel in panels if any(panel.key_of(run) for run in runs)]
  if not panels:
    raise _NoData(f"no {what} logged in {', '.join(str(r.workdir) for r in every_run)}")
  figure = _new_figure(4.2 * len(panels), 3.0)
  handles = {}
  for ax, panel in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels, strict=True):
    title = panel.title
    for run in runs:
      if (key := panel.key_of(run)) is None:
        continue
      (line,) = ax.plot(*_series(run, key), color=colors[id(run)], label=run.name,
                        marker=panel.marker, markersize=3,
                        drawstyle="steps-post" if panel.steps else "default")
      handles.setdefault(id(run), line)  # By run: two workdirs may share a folder name.
      final = _number(run.summary.get(panel.final))
      if final is not None and isinstance(run.summary.get("steps"), int):
        # A scatter, not a line: each run keeps exactly one line per panel.
        ax.scatter([run.summary["steps"]], [final], marker="*", s=80, color=colors[id(run)],
                   zorder=3)
        title = f"{panel.title} (star: test)"
    ax.set_title(title)
    ax.set_xlabel("step")
    if panel.scale.startswith("log"):
      ax.set_yscale("log", base=2 if panel.scale == "log2" else 10)
    elif panel.scale == "percent":
      ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    ax.grid(alpha=0.3)
  figure.legend(list(handles.values()), [line.get_label() for line in handles.values()],
                loc="outside upper center", ncols=min(len(handles), 4), fontsize="small",
                frameon=False)
  return figure


def figure_curves(runs: Runs) -> Figure:
  """Train loss, eval loss and eval accuracy (AUC when the task scores clicks) vs step.

  A search's `train_loss`/`val_loss` stand in for the losses; a finished run's test
  accuracy (AUC) from summary.json is a star at its last step.

  Args:
    runs: a Run, a workdir, or a sequence of either; one line per run in each panel.

  Returns:
    The Figure.
  """
  runs = _as_runs(runs)
  metric = "auc" if any(_series(run, "eval_auc")[0] for run in runs) else "accuracy"
  return _draw(runs, [_Panel("train loss", ("loss", "train_loss")),
                      _Panel("eval loss", ("eval_loss", "val_loss"), marker="o"),
                      _Panel(f"eval {metric.replace('auc', 'AUC')}", (f"eval_{metric}",),
                             marker="o", final=f"test_{metric}")], "loss or accuracy")


def figure_learning_rate(runs: Runs) -> Figure:
  """The learning rate of each logged step.

  Args:
    runs: a Run, a workdir, or a sequence of either.

  Returns:
    The Figure.
  """
  return _draw(runs, [_Panel("learning rate", ("learning_rate",))], "learning_rate")


def figure_loss_scale(runs: Runs) -> Figure:
  """The dynamic loss scale (log y) and the cumulative count of skipped steps. Runs without
  loss scaling (scale 1.0 throughout, nothing skipped) are left out.

  Args:
    runs: a Run, a workdir, or a sequence of either.

  Returns:
    The Figure.
  """
  return _draw(runs, [_Panel("loss scale", ("loss_scale",), scale="log2", steps=True),
                      _Panel("skipped steps (cumulative)", ("skipped_steps",), steps=True)],
               "loss scaling", lambda run: (_any(run, "loss_scale", lambda v: v != 1.0)
                                            or _any(run, "skipped_steps", lambda v: v > 0)))


def figure_precision_plan(runs: Runs) -> Figure:
  """Layers the adaptive controller promoted to float32, and the half-precision share of
  matmul FLOPs. Float32 runs (share 0 throughout) are left out.

  Args:
    runs: a Run, a workdir, or a sequence of either.

  Returns:
    The Figure.
  """
  return _draw(runs, [_Panel("promoted layers (float32)", ("promoted_layers",), steps=True),
                      _Panel("half-precision share of matmul FLOPs",
                             ("fp16_matmul_flops_fraction",), scale="percent", steps=True)],
               "half-precision compute",
               lambda run: _any(run, "fp16_matmul_flops_fraction", lambda v: v > 0))


def figure_throughput(runs: Runs) -> Figure:
  """Throughput (tokens/s where logged, else examples/s; log y) and MFU per logged window.

  Args:
    runs: a Run, a workdir, or a sequence of either.

  Returns:
    The Figure.
  """
  runs = _as_runs(runs)
  tokens = any(_series(run, "tokens_per_sec")[0] for run in runs)
  return _draw(runs, [_Panel("tokens/s" if tokens else "examples/s",
                             ("tokens_per_sec", "examples_per_sec"), scale="log"),
                      _Panel("MFU", ("mfu",), scale="percent", absent=0.0)], "throughput")


def _decisions(run: Run) -> list[list[tuple[str, str, dict[str, str]]]]:
  """The searched decisions as rows of (title, kind, {candidate: metric key}): per block
  its op and its width, then the optional blocks' keep probabilities (the depth)."""
  choices: dict[int, dict[str, dict[str, str]]] = {}
  keeps: dict[str, str] = {}
  for key in dict.fromkeys(key for record in run.records for key in record):
    if (match := _ARCH_KEY.match(key)) is None:
      continue
    block, kind, choice = int(match[1]), match[2], match[3]
    if kind is not None:
      choices.setdefault(block, {}).setdefault(kind, {})[choice] = key
    elif _any(run, key, lambda v: v != 1.0):  # Blocks below the minimum depth always stay.
      keeps[f"block {block}"] = key
  rows = []
  for block, kinds in sorted(choices.items()):
    widths = sorted(kinds.get("channels", {}).items(), key=lambda item: float(item[0]))
    row = [(f"block {block}: {kind}", kind, options)
           for kind, options in (("op", kinds.get("op", {})), ("channels", dict(widths)))
           if len(options) > 1]  # One candidate: nothing was searched.
    rows += [row] if row else []
  if keeps:
    rows.append([("depth: P(keep), kept if >= 0.5", "keep",
                  dict(sorted(keeps.items(), key=lambda item: int(item[0].split()[1]))))])
  return rows


def figure_architecture(run: Run | str | Path) -> Figure:
  """Architecture probabilities over the search steps, as in the DARTS paper: one panel per
  searched decision (each block's op and width, the depth), one line per candidate. A
  candidate keeps its colour in every block's panel.

  Args:
    run: a dsjax-search Run or workdir.

  Returns:
    The Figure.

  Raises:
    DataError: the run logged no architecture probabilities (it is no search).
  """
  runs = _as_runs(run)
  if len(runs) != 1:
    raise TypeError("figure_architecture draws one search run: pass a Run or a workdir")
  run = runs[0]
  rows = _decisions(run)
  if not rows:
    raise _NoData(f"no architecture probabilities (arch/... keys) in {run.workdir}: "
                  "is it a dsjax-search workdir?")
  ncols = max(len(row) for row in rows)
  figure = _new_figure(4.8 * ncols, 1.9 * len(rows))
  grid = figure.add_gridspec(len(rows), ncols)
  colors: dict[tuple[str, str], str] = {}
  first = None
  for row_index, row in enumerate(rows):
    for col, (title, kind, options) in enumerate(row):
      ax = figure.add_subplot(grid[row_index, col], sharex=first)
      first = first or ax
      for label, key in options.items():
        color = colors.setdefault((kind, label), f"C{sum(k == kind for k, _ in colors) % 10}")
        ax.plot(*_series(run, key), label=label, color=color)
      ax.set_title(title, fontsize="medium")
      ax.set_ylim(-0.02, 1.02)
      ax.set_ylabel("probability")
      ax.grid(alpha=0.3)
      ax.legend(fontsize="x-small", loc="center left", bbox_to_anchor=(1.0, 0.5),
                frameon=False)
  figure.supxlabel("search step")
  figure.suptitle(f"architecture probabilities: {run.name}")
  return figure


# Kind -> figure of the overlaid runs, in the order write_plots writes them.
_KINDS = {"curves": figure_curves, "learning_rate": figure_learning_rate,
          "loss_scale": figure_loss_scale, "precision_plan": figure_precision_plan,
          "throughput": figure_throughput}


def write_plots(workdirs: Runs, out_dir: str | Path | None = None) -> list[Path]:
  """Writes each figure the runs have data for as a PNG: KIND.png of the overlaid runs
  (curves, learning_rate, loss_scale, precision_plan, throughput) and architecture.png of
  a search (architecture_NAME.png per search when several runs are given). Kinds without
  data (no loss scale in a float32 run) are skipped, not drawn empty.

  Args:
    workdirs: a Run, a workdir, or a sequence of either.
    out_dir: where the PNGs go (created); default: the first run's workdir.

  Returns:
    The paths written.
  """
  canvas = _matplotlib().backends.backend_agg.FigureCanvasAgg
  runs = _as_runs(workdirs)
  out = Path(out_dir) if out_dir is not None else runs[0].workdir
  out.mkdir(parents=True, exist_ok=True)
  figures = [(kind, lambda function=function: function(runs)) for kind, function in _KINDS.items()]
  figures += [("architecture" if len(runs) == 1 else f"architecture_{run.name}",
               lambda run=run: figure_architecture(run)) for run in runs]
  written = []
  for name, draw in figures:
    try:
      figure = draw()
    except _NoData:
      continue
    canvas(figure)  # Agg, whatever backend the session chose.
    figure.savefig(out / f"{name}.png", dpi=DPI)
    written.append(out / f"{name}.png")
  return written


def _category_name(categories: Sequence[Any] | Mapping[int, Any], index: int) -> str:
  try:
    entry = categories[index]
  except (IndexError, KeyError):
    return str(index)
  return str(entry.get("name", index) if isinstance(entry, Mapping) else entry)


def _displayable(image: np.ndarray) -> np.ndarray:
  """An [H, W, 3] or [H, W] image imshow draws as is: uint8 and floats in [0, 1] unchanged,
  other floats (normalised model inputs) stretched to [0, 1]."""
  image = image[..., 0] if image.shape[-1] == 1 else image
  if image.dtype == np.uint8:
    return image
  image = np.asarray(image, np.float32)
  low, high = float(np.nanmin(image)), float(np.nanmax(image))
  if low < 0.0 or high > 1.0:
    image = (image - low) / max(high - low, 1e-12)
  return np.clip(np.nan_to_num(image), 0.0, 1.0)


def draw_detections(path: str | Path, images: Any, predictions: Mapping[str, Any],
                    truths: Mapping[str, Any], categories: Sequence[Any] | Mapping[int, Any], *,
                    max_images: int = 16, score_threshold: float = 0.3) -> Path:
  """A grid of the first `max_images` images with their true boxes (green, thin) and the
  predicted boxes scoring above `score_threshold` (red, labelled "class score"), as a PNG.

  Args:
    path: the PNG to write (its folder is created).
    images: uint8 or float [N, H, W, C], C = 1 or 3 (floats outside [0, 1] are stretched).
    predictions: {"boxes": [N, K, 4] (x0, y0, x1, y1) in image pixels, "scores": [N, K],
      "classes": [N, K]}.
    truths: {"boxes": [N, M, 4], "classes": [N, M]}, class -1 marking padding.
    categories: class index -> name: a sequence of names (or of COCO category dicts, whose
      "name" is used) or a mapping; an index it lacks is drawn as its number.
    max_images: at most this many images are drawn.
    score_threshold: predictions scoring at most this are not drawn.

  Returns:
    The path written.
  """
  canvas = _matplotlib().backends.backend_agg.FigureCanvasAgg
  from matplotlib.patches import Rectangle

  images = np.asarray(images)[:max_images]
  if images.ndim != 4 or images.shape[-1] not in (1, 3) or not len(images):
    raise ValueError(f"images: expected a non-empty [N, H, W, C] array with C = 1 or 3, got "
                     f"shape {images.shape}")
  count = len(images)
  predicted = [np.asarray(predictions[key])[:count] for key in ("boxes", "scores", "classes")]
  true_boxes, true_classes = (np.asarray(truths[key])[:count] for key in ("boxes", "classes"))
  ncols = min(count, 4)
  nrows = math.ceil(count / ncols)
  figure = _new_figure(3.0 * ncols, 3.0 * nrows + 0.4)
  axes = figure.subplots(nrows, ncols, squeeze=False).reshape(-1)
  for index, ax in enumerate(axes):
    ax.set_axis_off()
    if index >= count:
      continue
    height, width = images.shape[1:3]
    image = _displayable(images[index])
    # Fixed limits: a gray image is drawn as it is, not stretched by imshow.
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0,
              vmax=255 if image.dtype == np.uint8 else 1, interpolation="nearest")
    for (x0, y0, x1, y1), label in zip(true_boxes[index], true_classes[index], strict=True):
      if label >= 0:
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="lime",
                               linewidth=0.8))
    for (x0, y0, x1, y1), score, label in zip(*(part[index] for part in predicted), strict=True):
      if score > score_threshold:
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="red",
                               linewidth=1.2))
        ax.text(x0, y0, f"{_category_name(categories, int(label))} {score:.2f}", fontsize=6,
                color="white", va="bottom", clip_on=True,
                bbox={"facecolor": "red", "alpha": 0.6, "pad": 1, "edgecolor": "none"})
    # Boxes reaching past the image must not widen the axes: the image keeps its frame.
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(height - 0.5, -0.5)
    ax.set_title(f"image {index}", fontsize="small")
  figure.suptitle(f"green: truth; red: predictions scoring > {score_threshold:g}",
                  fontsize="medium")
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  canvas(figure)  # Agg, whatever backend the session chose.
  figure.savefig(path, dpi=DPI)
  return path
