"""Fingerprint a dataset's training split and plan a U-Net experiment for it (nnU-Net style).

  python -m medjax.tools.plan --dataset NAME [--kwargs k=v,...] [--split train] --out DIR \
      [--memory_budget_voxels N] [--batch_size 2]

Writes DIR/fingerprint.json (spacings, shapes, foreground intensity statistics, class frequencies) and
DIR/plan.json (target spacing, patch size, per-stage features / kernel sizes / strides), and prints the
plan. An experiment reads the plan with `config_lib.read_plan` / `apply_plan` (`synthetic_unet.py:plan=...`).
The rules are in `medjax.data.plan`. A user's mistake (an unknown dataset or split, a keyword the dataset
does not take, its data not found) prints one line `medjax.tools.plan: error: ...` and exits with status 2.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict, Mapping, Optional, Sequence

from absl import flags

from medjax import config_lib
from medjax.data import plan as plan_lib
from medjax.data.datasets import build_dataset
from medjax.tools import cli

_FLAGS = flags.FlagValues()  # private, so tools imported together do not clash (tools/cli.py)
_DATASET = flags.DEFINE_string("dataset", None, "Registered dataset name.", required=True, flag_values=_FLAGS)
_KWARGS = flags.DEFINE_string("kwargs", "", "Dataset keyword arguments: k=v,k2=v2 (Python literals).",
                              flag_values=_FLAGS)
_SPLIT = flags.DEFINE_string("split", "train", "Split to fingerprint.", flag_values=_FLAGS)
_OUT = flags.DEFINE_string("out", None, "Output folder for fingerprint.json and plan.json.", required=True,
                           flag_values=_FLAGS)
_BUDGET = flags.DEFINE_integer("memory_budget_voxels", None, "Most voxels per patch (default by spatial dims).",
                               lower_bound=1, flag_values=_FLAGS)
_BATCH = flags.DEFINE_integer("batch_size", 2, "Batch size written to the plan.", lower_bound=1, flag_values=_FLAGS)


def plan(dataset: str, kwargs: Optional[Mapping[str, Any]], out: str, *, split: str = "train",
         memory_budget_voxels: Optional[int] = None, batch_size: int = 2) -> Dict[str, Any]:
  """Fingerprints `split` of the dataset registered as `dataset` (channel 0 of each image, its label and
  spacing), writes out/fingerprint.json and out/plan.json, and returns the plan. Raises KeyError for an
  unknown dataset, ValueError for a keyword it does not take or an unknown split."""
  data = build_dataset(dataset, kwargs)
  source = cli.split_source(data, split, "--split")

  def cases():
    for i in range(len(source)):
      ex = source[i]
      yield ex["image"][..., 0], ex["label"], ex["spacing_mm"]

  fp = plan_lib.fingerprint(cases())
  p = plan_lib.plan(fp, memory_budget_voxels=memory_budget_voxels, batch_size=batch_size)
  os.makedirs(out, exist_ok=True)
  plan_lib.write_fingerprint(os.path.join(out, "fingerprint.json"), fp)
  plan_lib.write_plan(os.path.join(out, "plan.json"), p)
  return p


def _planned(argv) -> Dict[str, Any]:
  del argv  # the flags are parsed into _FLAGS
  return plan(_DATASET.value, config_lib.parse_kwargs(_KWARGS.value), _OUT.value, split=_SPLIT.value,
              memory_budget_voxels=_BUDGET.value, batch_size=_BATCH.value)


def main(argv: Sequence[str]) -> Dict[str, Any]:
  """The command line `argv` (program name first, as in `sys.argv`): plans, prints the plan and returns it.
  A user's mistake prints one line on stderr and exits with status 2 (tools/cli.py), also when called from
  Python."""
  result = cli.call(_planned, _FLAGS, argv)
  print(json.dumps(result, indent=2))
  return result


if __name__ == "__main__":
  main(sys.argv)
