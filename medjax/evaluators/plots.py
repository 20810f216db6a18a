"""PNG figures of an evaluation report (matplotlib's Agg canvas; pyplot and the global backend stay untouched).

Every function takes the JSON-ready data a report holds (`report["curves"]`, `report["cases"]`) or host
arrays, writes one PNG to `path` and returns `path`.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional, Sequence, Tuple

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

CONFUSION_TITLE = "Confusion matrix (rows: reference, columns: prediction)"
_CLASS_COLORS = ["black", "tab:blue", "tab:red", "tab:green", "tab:orange", "tab:purple", "tab:cyan",
                 "tab:olive", "tab:pink", "tab:brown", "tab:gray"]


def save_figure(fig: Figure, path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.tight_layout()
  FigureCanvasAgg(fig).print_png(path)
  return path


def _floats(values: Sequence) -> np.ndarray:
  return np.asarray([np.nan if v is None else v for v in values], np.float64)


def roc_pr(curves: Mapping, path: str) -> str:
  """ROC (left) and precision-recall (right) curves, one line per class (or the positive class)."""
  fig = Figure(figsize=(10, 4.5))
  roc_ax, pr_ax = fig.subplots(1, 2)
  for name, roc in curves.get("roc", {}).items():
    auc = roc.get("auc")
    roc_ax.plot(_floats(roc["fpr"]), _floats(roc["tpr"]), label=f"{name} (AUC {auc:.3f})" if auc is not None
                else f"{name} (AUC n/a)")
  roc_ax.plot([0, 1], [0, 1], ls="--", c="gray", lw=0.8)
  roc_ax.set(xlabel="false positive rate (1 - specificity)", ylabel="true positive rate (sensitivity)",
             title="ROC", xlim=(0, 1), ylim=(0, 1.02))
  for name, pr in curves.get("pr", {}).items():
    ap = pr.get("average_precision")
    pr_ax.step(_floats(pr["recall"]), _floats(pr["precision"]), where="post",
               label=f"{name} (AP {ap:.3f})" if ap is not None else f"{name} (AP n/a)")
  pr_ax.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", title="Precision-recall", xlim=(0, 1),
            ylim=(0, 1.02))
  for ax in (roc_ax, pr_ax):
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize="small", loc="lower right" if ax is roc_ax else "lower left")
  return save_figure(fig, path)


def confusion(matrix: Sequence[Sequence[float]], row_names: Sequence[str], col_names: Sequence[str], path: str,
              title: str = CONFUSION_TITLE) -> str:
  """A count matrix as a heat map with the counts written in the cells."""
  matrix = np.asarray(matrix, np.float64)
  fig = Figure(figsize=(1.2 + 0.6 * max(len(col_names), 4), 1.0 + 0.45 * max(len(row_names), 4)))
  ax = fig.subplots()
  image = ax.imshow(matrix, cmap="Blues")
  fig.colorbar(image, ax=ax, fraction=0.046)
  ax.set_xticks(range(len(col_names)), col_names, rotation=45, ha="right", fontsize="small")
  ax.set_yticks(range(len(row_names)), row_names, fontsize="small")
  threshold = matrix.max() / 2 if matrix.size else 0
  for (i, j), value in np.ndenumerate(matrix):
    ax.text(j, i, f"{value:g}", ha="center", va="center", fontsize="small",
            color="white" if value > threshold else "black")
  ax.set_title(title, fontsize="medium")
  return save_figure(fig, path)


def calibration(curve: Mapping, path: str) -> str:
  """Reliability diagram: accuracy against mean confidence per bin (marker area ~ cases in the bin)."""
  confidence, accuracy = _floats(curve["confidence"]), _floats(curve["accuracy"])
  count = _floats(curve["count"])
  used = count > 0
  fig = Figure(figsize=(4.5, 4.5))
  ax = fig.subplots()
  ax.plot([0, 1], [0, 1], ls="--", c="gray", lw=0.8, label="perfect calibration")
  ax.plot(confidence[used], accuracy[used], marker="o", label="model")
  ax.scatter(confidence[used], accuracy[used], s=20 + 200 * count[used] / max(count.max(), 1), alpha=0.3)
  ece = curve.get("ece")
  ax.set(xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1.02),
         title=f"Calibration (ECE {ece:.3f})" if ece is not None else "Calibration")
  ax.legend(fontsize="small", loc="upper left")
  return save_figure(fig, path)


def case_boxplot(values: Mapping[str, Sequence], path: str, ylabel: str = "Dice") -> str:
  """Box plot (with the cases as dots) of per-case values, one box per column; missing values skipped."""
  names = list(values)
  data = [_floats(values[n])[np.isfinite(_floats(values[n]))] for n in names]
  fig = Figure(figsize=(1.5 + 1.2 * len(names), 4))
  ax = fig.subplots()
  ax.boxplot(data, showfliers=False)
  ax.set_xticks(range(1, len(names) + 1), names, rotation=20)
  rng = np.random.default_rng(0)  # fixed jitter so the figure is reproducible
  for i, d in enumerate(data, start=1):
    ax.scatter(i + rng.uniform(-0.15, 0.15, len(d)), d, s=10, alpha=0.6)
  ax.set(ylabel=ylabel, title=f"Per-case {ylabel}")
  return save_figure(fig, path)


def _middle_slice(image: np.ndarray, label: np.ndarray, prediction: np.ndarray) -> Tuple[np.ndarray, ...]:
  """2D views of (*spatial, C) image and (*spatial) maps: the 3D slice along z with the most reference
  foreground (the middle slice when the reference is empty)."""
  if label.ndim == 2:
    return image[..., 0], label, prediction
  foreground = (label > 0).sum(axis=(1, 2))
  z = int(np.argmax(foreground)) if foreground.any() else label.shape[0] // 2
  return image[z, ..., 0], label[z], prediction[z]


def overlays(rows: Sequence[Tuple[str, np.ndarray, np.ndarray, np.ndarray]], num_classes: int, path: str,
             class_names: Optional[Sequence[str]] = None) -> str:
  """One row per case: image, reference and prediction over the image.

  Args:
    rows: (title, image (*spatial, C), label (*spatial), prediction (*spatial)); 3D shows one z slice.
    num_classes: K, for a fixed colour per class.
  """
  colors = ListedColormap((_CLASS_COLORS * (num_classes // len(_CLASS_COLORS) + 1))[:num_classes])
  fig = Figure(figsize=(9, 3 * len(rows)))
  axes = np.asarray(fig.subplots(len(rows), 3, squeeze=False))
  for (title, image, label, prediction), ax_row in zip(rows, axes):
    image2d, label2d, prediction2d = _middle_slice(np.asarray(image), np.asarray(label), np.asarray(prediction))
    for ax, overlay, name in zip(ax_row, (None, label2d, prediction2d), ("image", "reference", "prediction")):
      ax.imshow(image2d, cmap="gray", interpolation="nearest")
      if overlay is not None:
        ax.imshow(np.ma.masked_equal(overlay, 0), cmap=colors, vmin=0, vmax=num_classes - 1, alpha=0.5,
                  interpolation="nearest")
      ax.set_title(f"{title}: {name}" if name == "image" else name, fontsize="small")
      ax.axis("off")
  if class_names:
    fig.suptitle("  ".join(f"{n}={c}" for n, c in zip(class_names[1:], _CLASS_COLORS[1:])), fontsize="small")
  return save_figure(fig, path)


def scatter(pred: Sequence[float], target: Sequence[float], path: str) -> str:
  """Regression: prediction against target with the identity line."""
  pred, target = _floats(pred), _floats(target)
  fig = Figure(figsize=(4.5, 4.5))
  ax = fig.subplots()
  ax.scatter(target, pred, s=12, alpha=0.6)
  low, high = float(np.nanmin([pred.min(), target.min()])), float(np.nanmax([pred.max(), target.max()]))
  ax.plot([low, high], [low, high], ls="--", c="gray", lw=0.8)
  ax.set(xlabel="target", ylabel="prediction", title="Prediction vs target")
  return save_figure(fig, path)
