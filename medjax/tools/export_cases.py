"""Write cases of a run's dataset as image files, to open in a viewer (ITK-SNAP, 3D Slicer) or to feed `predict`.

  python -m medjax.tools.export_cases --workdir runs/demo --split test --num 2 --out runs/demo/cases
  python -m medjax.tools.predict --workdir runs/demo --input runs/demo/cases --output runs/demo/predictions

The dataset comes from the workdir's config.json (generated or read exactly as training saw it, after the
dataset's own preprocessing). Each case becomes `<out>/<name><suffix>` with its reference label map in
`<out>/labels/<name><suffix>` (segmentation), with the example's voxel spacing on an axis-aligned RAS grid;
2D examples become one-slice volumes. Names are the dataset's case names, else `<split>_<index>`.
"""

from __future__ import annotations

import os
from typing import List

import numpy as np
from absl import flags

from medjax import build, checkpoint
from medjax.data import io
from medjax.tools import cli


def export(workdir: str, *, split: str = "test", num: int = 2, out: str, suffix: str = ".nii.gz") -> List[str]:
  """Writes the first `num` examples of `split` of `workdir`'s dataset into `out`; returns the image paths.

  Images are float32 (z, y, x) or (z, y, x, C), labels uint8/int16 (z, y, x); `spacing_mm` (z, y, x) in mm.
  """
  if suffix not in io.IMAGE_SUFFIXES:
    raise ValueError(f"--suffix {suffix!r} must be one of {', '.join(io.IMAGE_SUFFIXES)}.")
  if num < 1:
    raise ValueError(f"--num must be >= 1, got {num}.")
  config = checkpoint.load_config(workdir)
  dataset = build.dataset(config)
  source = build.split_source(dataset, split, "--split")
  paths = []
  for index in range(min(num, len(source))):
    example = source[index]
    name = source.case_name(index) if hasattr(source, "case_name") else f"{split}_{index:04d}"
    image, spacing = np.asarray(example["image"], np.float32), np.asarray(example["spacing_mm"], np.float64)
    if image.ndim == 3:  # 2D (y, x, C): one slice of 1 mm
      image, spacing = image[None], np.concatenate([[1.0], spacing])
    image = image[..., 0] if image.shape[-1] == 1 else image
    path = os.path.join(out, name + suffix)
    os.makedirs(out, exist_ok=True)
    io.write_image(path, io.Volume.from_array(image, tuple(spacing)))
    paths.append(path)
    if dataset.info.label_kind == "map" and "label" in example:
      label = np.asarray(example["label"])
      label = label[None] if label.ndim == 2 else label
      dtype = np.uint8 if dataset.info.num_classes <= 255 else np.int16
      os.makedirs(os.path.join(out, "labels"), exist_ok=True)
      io.write_image(os.path.join(out, "labels", name + suffix),
                     io.Volume.from_array(label.astype(dtype), tuple(spacing)))
  return paths


_FLAGS = flags.FlagValues()
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (its config.json names the dataset).", required=True,
                               flag_values=_FLAGS)
_SPLIT = flags.DEFINE_string("split", "test", "Dataset split.", flag_values=_FLAGS)
_NUM = flags.DEFINE_integer("num", 2, "How many cases (the first ones of the split).", flag_values=_FLAGS)
_OUT = flags.DEFINE_string("out", None, "Output folder (default WORKDIR/cases).", flag_values=_FLAGS)
_SUFFIX = flags.DEFINE_string("suffix", ".nii.gz", "File format: .nii.gz, .nii, .nrrd, .mha, ...", flag_values=_FLAGS)


def main(argv):
  del argv
  out = _OUT.value or os.path.join(_WORKDIR.value, "cases")
  paths = export(_WORKDIR.value, split=_SPLIT.value, num=_NUM.value, out=out, suffix=_SUFFIX.value)
  print(f"Wrote {len(paths)} case(s) to {os.path.abspath(out)}")


if __name__ == "__main__":
  cli.run(main, _FLAGS)
