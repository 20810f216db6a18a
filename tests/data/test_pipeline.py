"""Deterministic batch order, per-process slicing and padded evaluation batches."""

import numpy as np
import pytest

from medjax.data import pipeline


class _Source:
  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {"id": np.int64(i), "image": np.full((2, 3, 1), i, np.float32), "label": np.int32(i % 2)}


def test_epochs_are_permutations_and_order_is_a_function_of_step():
  batches = pipeline.TrainBatches(_Source(10), global_batch_size=5, seed=3, process_index=0, process_count=1)
  first_epoch = np.concatenate([batches.global_indices(s) for s in range(2)])
  assert sorted(first_epoch) == list(range(10))
  again = pipeline.TrainBatches(_Source(10), global_batch_size=5, seed=3, process_index=0, process_count=1)
  np.testing.assert_array_equal(again.global_indices(7), batches.global_indices(7))
  other_seed = pipeline.TrainBatches(_Source(10), global_batch_size=5, seed=4, process_index=0, process_count=1)
  assert not np.array_equal(other_seed.global_indices(0), batches.global_indices(0))


def test_batches_straddle_epochs():
  batches = pipeline.TrainBatches(_Source(4), global_batch_size=3, seed=0, process_index=0, process_count=1)
  stream = np.concatenate([batches.global_indices(s) for s in range(4)])  # 12 positions = 3 epochs
  for epoch in range(3):
    assert sorted(stream[epoch * 4:(epoch + 1) * 4]) == [0, 1, 2, 3]


def test_iterate_resumes_mid_stream():
  batches = pipeline.TrainBatches(_Source(9), global_batch_size=3, seed=0, process_index=0, process_count=1)
  it = batches.iterate(0)
  stream = [next(it)["id"] for _ in range(5)]
  resumed = batches.iterate(3)
  np.testing.assert_array_equal(next(resumed)["id"], stream[3])


def test_processes_take_disjoint_slices():
  ids = []
  for p in range(2):
    b = pipeline.TrainBatches(_Source(8), global_batch_size=4, seed=0, process_index=p, process_count=2)
    ids.append(b.host_batch(0)["id"])
  assert len(ids[0]) == 2 and not set(ids[0]) & set(ids[1])
  full = pipeline.TrainBatches(_Source(8), global_batch_size=4, seed=0, process_index=0, process_count=1)
  np.testing.assert_array_equal(np.concatenate(ids), full.host_batch(0)["id"])


def test_eval_batches_cover_every_example_once_with_padding():
  batches = list(pipeline.eval_batches(_Source(5), global_batch_size=2, process_index=0, process_count=1))
  assert len(batches) == 3
  ids = np.concatenate([b["id"][b["weight"] > 0] for b in batches])
  np.testing.assert_array_equal(ids, np.arange(5))
  np.testing.assert_array_equal(batches[-1]["weight"], [1.0, 0.0])


def test_collate_rejects_mismatched_keys():
  with pytest.raises(ValueError, match="example 1 has keys"):
    pipeline.collate([{"a": 1}, {"b": 2}])
