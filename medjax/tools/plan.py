"""Fingerprint a dataset's training split and plan a U-Net experiment for it (nnU-Net style).

  python -m medjax.tools.plan --dataset NAME [--kwargs k=v,...] [--split train] --out DIR \
      [--memory_budget_voxels N] [--batch_size 2]

Writes DIR/fingerprint.json (spacings, shapes, foreground intensity statistics, class frequencies) and
DIR/plan.json (target spacing, patch size, per-stage features / kernel sizes / strides), and prints the
plan. An experiment reads the plan with `config_lib.read_plan` / `apply_plan` (`synthetic_unet.py:plan=...`).
The rules are in `medjax.data.plan`.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict, Sequence

from absl import flags

from medjax import config_lib
from medjax.data import plan as plan_lib
from medjax.data.datasets import build_dataset


def _flags() -> flags.FlagValues:
  fv = flags.FlagValues()  # private: does not clash with other tools' --kwargs in the same process
  flags.DEFINE_string("dataset", None, "Registered dataset name.", flag_values=fv)
  flags.DEFINE_string("kwargs", "", "Dataset keyword arguments: k=v,k2=v2 (Python literals).", flag_values=fv)
  flags.DEFINE_string("split", "train", "Split to fingerprint.", flag_values=fv)
  flags.DEFINE_string("out", None, "Output folder for fingerprint.json and plan.json.", flag_values=fv)
  flags.DEFINE_integer("memory_budget_voxels", None, "Most voxels per patch (default by spatial dims).",
                       flag_values=fv)
  flags.DEFINE_integer("batch_size", 2, "Batch size written to the plan.", flag_values=fv)
  return fv


def main(argv: Sequence[str]) -> Dict[str, Any]:
  """Fingerprints the split (channel 0 of each image, its label and spacing) and writes DIR/fingerprint.json
  and DIR/plan.json. `argv[0]` is the program name. Returns the plan."""
  fv = _flags()
  fv(list(argv))
  if not fv.dataset or not fv.out:
    raise ValueError("--dataset and --out are required.")
  dataset = build_dataset(fv.dataset, config_lib.parse_kwargs(fv.kwargs))
  if fv.split not in dataset.splits:
    raise ValueError(f"dataset {fv.dataset!r} has no split {fv.split!r}; splits: {dataset.splits}.")
  src = dataset.source(fv.split)

  def cases():
    for i in range(len(src)):
      ex = src[i]
      yield ex["image"][..., 0], ex["label"], ex["spacing_mm"]

  fp = plan_lib.fingerprint(cases())
  p = plan_lib.plan(fp, memory_budget_voxels=fv.memory_budget_voxels, batch_size=fv.batch_size)
  os.makedirs(fv.out, exist_ok=True)
  plan_lib.write_fingerprint(os.path.join(fv.out, "fingerprint.json"), fp)
  plan_lib.write_plan(os.path.join(fv.out, "plan.json"), p)
  return p


if __name__ == "__main__":
  try:
    result = main(sys.argv)
  except (ValueError, KeyError, FileNotFoundError, flags.Error) as e:  # user errors: one line
    sys.exit(f"error: {e}")
  print(json.dumps(result, indent=2))
