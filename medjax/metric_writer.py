"""Where scalars go: `workdir/metrics.jsonl`, TensorBoard event files, and the terminal.

One JSON object per line, `{"step": N, "split/name": value, ...}`, so a notebook reads a run with
`pandas.read_json(path, lines=True)`. TensorBoard files are written with tensorboardX (no TensorFlow).
Only process 0 writes; other processes get a writer that drops everything.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Mapping, Optional

from medjax.typing import Metrics


class MetricWriter:
  """Appends scalars to metrics.jsonl and TensorBoard under `workdir` (process 0 only)."""

  def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True):
    self.enabled = enabled
    self.path = os.path.abspath(os.path.join(workdir, "metrics.jsonl"))
    self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      self._file = open(self.path, "a", buffering=1)
      if tensorboard:
        from tensorboardX import SummaryWriter  # imported lazily: only the writing process needs it
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    clean = {k: (float(v) if math.isfinite(float(v)) else None) for k, v in scalars.items()}
    self._file.write(json.dumps({"step": int(step), **clean}) + "\n")
    if self._tb is not None:
      # An undefined metric (e.g. precision with no positive prediction) is null in the JSON and absent from
      # TensorBoard, where a NaN point would break the plot's y-range and make tensorboardX warn every time.
      for key, value in clean.items():
        if value is not None:
          self._tb.add_scalar(key, value, int(step))

  def flush(self) -> None:
    if self.enabled:
      self._file.flush()
      if self._tb is not None:
        self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._file.close()
      if self._tb is not None:
        self._tb.close()


def format_scalars(scalars: Metrics) -> str:
  return " ".join(f"{k}={v:.4g}" for k, v in scalars.items())


class Progress:
  """A progress bar with rate and ETA on a terminal; plain lines on `log` calls otherwise (CI, files)."""

  def __init__(self, total_steps: int, start_step: int, *, enabled: bool = True, stream=None):
    self.total, self.start = total_steps, start_step
    self.stream = stream or sys.stderr
    self.enabled = enabled
    self.bar = None
    self.t0 = time.perf_counter()
    if enabled and hasattr(self.stream, "isatty") and self.stream.isatty():
      from tqdm import tqdm
      self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, file=self.stream)

  def update(self, step: int) -> None:
    if self.bar is not None:
      self.bar.update(step - self.bar.n)

  def log(self, step: int, scalars: Metrics, prefix: str = "") -> None:
    if not self.enabled:
      return
    text = f"{prefix}step {step}/{self.total} {format_scalars(scalars)}"
    if self.bar is not None:
      self.bar.set_postfix_str(format_scalars({k: v for k, v in scalars.items() if "/" not in k}))
      self.bar.write(text)
      return
    done = step - self.start
    elapsed = time.perf_counter() - self.t0
    eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
    print(f"{text} elapsed={elapsed:.0f}s eta={eta:.0f}s", file=self.stream, flush=True)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


def read_metrics(workdir: str) -> list:
  """All records of `workdir/metrics.jsonl` as dicts (for tools, tests and notebooks)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    raise FileNotFoundError(f"No metrics file at {path}.")
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def last_value(records, key: str) -> Optional[float]:
  for record in reversed(records):
    if record.get(key) is not None:
      return record[key]
  return None
