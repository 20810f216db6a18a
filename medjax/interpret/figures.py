"""PNG figures of attribution maps: image, map and blended overlay; 3D as three orthogonal slices through the map's
maximum. Host numpy in, one PNG out (matplotlib's Agg canvas, as `evaluators.plots`).

Display conventions: the image is shown in grey (its first channel when the channels are copies of one another, as
MedMNIST's repeated grayscale; RGB when they differ), windowed to its 1st-99th percentiles. A map that is never
negative (Grad-CAM, saliency, rollout) is shown on [0, max] with "inferno"; a signed one (gradient x input,
integrated gradients, occlusion) on [-m, m] with the diverging "RdBu_r", m = max |map|, so the colour 0 is white and
positive evidence red. The overlay blends the map's colours over the image with opacity proportional to |map| / m.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from medjax.evaluators import plots

PLANES = ("axial", "coronal", "sagittal")


def _display_image(image: np.ndarray) -> np.ndarray:
  """`(*spatial, C)` -> grey `(*spatial)` or RGB `(*spatial, 3)` in [0, 1], windowed to the 1st-99th percentiles."""
  image = np.asarray(image, np.float32)
  copies = all(np.array_equal(image[..., 0], image[..., c]) for c in range(image.shape[-1]))
  if copies or image.shape[-1] != 3:
    image = image[..., 0]
  low, high = np.percentile(image, [1, 99])
  return np.clip((image - low) / max(high - low, 1e-12), 0.0, 1.0)


def map_scale(attribution: np.ndarray) -> Tuple[bool, float]:
  """(signed, m): whether the map has negative values, and the colour scale's bound max |map| (1 for a zero map)."""
  attribution = np.asarray(attribution, np.float32)
  bound = float(np.max(np.abs(attribution))) if attribution.size else 0.0
  return bool((attribution < 0).any()), bound if bound > 0 else 1.0


def _colours(attribution: np.ndarray, signed: bool, bound: float) -> Tuple[np.ndarray, np.ndarray]:
  """RGB colours `(*s, 3)` and overlay opacity `(*s)` of a map."""
  if signed:
    rgba = colormaps["RdBu_r"](np.clip(0.5 + 0.5 * attribution / bound, 0.0, 1.0))
  else:
    rgba = colormaps["inferno"](np.clip(attribution / bound, 0.0, 1.0))
  return rgba[..., :3], np.clip(np.abs(attribution) / bound, 0.0, 1.0)


def blend(image: np.ndarray, attribution: np.ndarray, signed: bool, bound: float, opacity: float = 0.6) -> np.ndarray:
  """The map's colours over the image `(*s, C)`: RGB `(*s, 3)` in [0, 1], each pixel's opacity `opacity * |map| / m`."""
  grey = _display_image(image)
  base = np.repeat(grey[..., None], 3, axis=-1) if grey.ndim == attribution.ndim else grey
  colours, alpha = _colours(attribution, signed, bound)
  alpha = opacity * alpha[..., None]
  return (1.0 - alpha) * base + alpha * colours


def _panels(axes, image, attribution, signed, bound, fig, label: str, origin: str):
  grey = _display_image(image)
  axes[0].imshow(grey, cmap="gray" if grey.ndim == 2 else None, vmin=0, vmax=1, origin=origin)
  axes[0].set_ylabel(label, fontsize=8)
  shown = axes[1].imshow(attribution, cmap="RdBu_r" if signed else "inferno", vmin=-bound if signed else 0,
                         vmax=bound, origin=origin)
  fig.colorbar(shown, ax=axes[1], fraction=0.046, pad=0.02)
  axes[2].imshow(blend(image, attribution, signed, bound), origin=origin)
  for ax in axes:
    ax.set_xticks([])
    ax.set_yticks([])


def peak(attribution: np.ndarray) -> Tuple[int, ...]:
  """Index of the map's largest value (of |map| for a signed map): where the three 3D slices cross."""
  attribution = np.asarray(attribution)
  values = np.abs(attribution) if (attribution < 0).any() else attribution
  return tuple(int(i) for i in np.unravel_index(int(np.argmax(values)), attribution.shape))


def orthogonal_slices(volume: np.ndarray, center: Sequence[int]) -> Tuple[np.ndarray, ...]:
  """The axial, coronal and sagittal slices of a volume `(z, y, x, ...)` (medjax's array order, data/io/volume.py)
  through `center`: `(y, x, ...)`, `(z, x, ...)` and `(z, y, ...)`. Figures draw them with the first axis upwards
  (`origin="lower"`), so a RAS volume shows superior and anterior up."""
  d, h, w = center
  return volume[d], volume[:, h], volume[:, :, w]


def case_figure(image: np.ndarray, attribution: np.ndarray, path: str, title: str = "",
                signed: Optional[bool] = None) -> str:
  """One case: image `(*spatial, C)`, map `(*spatial)`, 2D or 3D. 2D: one row image | map | overlay; 3D: one row
  per orthogonal plane through the map's peak. Returns `path`."""
  image, attribution = np.asarray(image), np.asarray(attribution, np.float32)
  if image.shape[:-1] != attribution.shape or attribution.ndim not in (2, 3):
    raise ValueError(f"case_figure: map {attribution.shape} must match the image's spatial shape {image.shape[:-1]} "
                     "(2D or 3D).")
  found_signed, bound = map_scale(attribution)
  signed = found_signed if signed is None else signed
  if attribution.ndim == 2:
    rows = [("", image, attribution)]
  else:
    center = peak(attribution)
    rows = [(f"{plane} {i}", im, at) for plane, i, im, at in
            zip(PLANES, center, orthogonal_slices(image, center), orthogonal_slices(attribution, center))]
  fig = Figure(figsize=(9, 3 * len(rows)))
  axes = fig.subplots(len(rows), 3, squeeze=False)
  for row, (label, im, at) in zip(axes, rows):
    _panels(row, im, at, signed, bound, fig, label, "upper" if attribution.ndim == 2 else "lower")
  for ax, name in zip(axes[0], ("image", "map", "overlay")):
    ax.set_title(name, fontsize=9)
  if title:
    fig.suptitle(title, fontsize=9)
  return plots.save_figure(fig, path)


def overview_figure(cases: Sequence[Tuple[str, np.ndarray, np.ndarray]], path: str, signed: Optional[bool] = None
                    ) -> str:
  """Several cases `(label, image, map)` in one PNG, a row each: image and overlay (2D), or the overlays of the three
  planes through each map's peak (3D). All maps share one colour scale, so rows compare. Returns `path`."""
  if not cases:
    raise ValueError("overview_figure: no cases")
  found = [map_scale(at) for _, _, at in cases]
  signed = any(s for s, _ in found) if signed is None else signed
  bound = max(b for _, b in found)
  three_d = np.asarray(cases[0][2]).ndim == 3
  fig = Figure(figsize=(7.5, 2.4 * len(cases)))
  axes = fig.subplots(len(cases), 3, squeeze=False)
  for row, (label, image, attribution) in zip(axes, cases):
    image, attribution = np.asarray(image), np.asarray(attribution, np.float32)
    if three_d:
      center = peak(attribution)
      for ax, plane, im, at in zip(row, PLANES, orthogonal_slices(image, center), orthogonal_slices(attribution,
                                                                                                       center)):
        ax.imshow(blend(im, at, signed, bound), origin="lower")
        ax.set_title(f"{plane}", fontsize=7)
    else:
      grey = _display_image(image)
      row[0].imshow(grey, cmap="gray" if grey.ndim == 2 else None, vmin=0, vmax=1)
      row[1].imshow(attribution, cmap="RdBu_r" if signed else "inferno", vmin=-bound if signed else 0, vmax=bound)
      row[2].imshow(blend(image, attribution, signed, bound))
    row[0].set_ylabel(label, fontsize=7)
    for ax in row:
      ax.set_xticks([])
      ax.set_yticks([])
  return plots.save_figure(fig, path)
