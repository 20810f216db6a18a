"""MetricWriter: metrics.jsonl rows and what reaches TensorBoard."""

import json
import math
import os

from medjax.metric_writer import MetricWriter, last_value, read_metrics


class _RecordingBoard:
  def __init__(self):
    self.calls = []

  def add_scalar(self, key, value, step):
    self.calls.append((key, value, step))

  def flush(self):
    pass

  def close(self):
    pass


def test_undefined_metrics_are_null_in_json_and_absent_from_tensorboard(tmp_path):
  writer = MetricWriter(str(tmp_path), tensorboard=False)
  writer._tb = board = _RecordingBoard()
  writer.write(3, {"val/auc": 0.75, "val/precision": math.nan, "val/loss": math.inf})
  writer.close()
  with open(os.path.join(str(tmp_path), "metrics.jsonl")) as f:
    assert json.loads(f.read()) == {"step": 3, "val/auc": 0.75, "val/precision": None, "val/loss": None}
  assert board.calls == [("val/auc", 0.75, 3)]
  records = read_metrics(str(tmp_path))
  assert last_value(records, "val/auc") == 0.75 and last_value(records, "val/precision") is None


def test_disabled_writer_writes_nothing(tmp_path):
  writer = MetricWriter(str(tmp_path / "run"), enabled=False)
  writer.write(1, {"a": 1.0})
  writer.close()
  assert not os.path.exists(str(tmp_path / "run"))
