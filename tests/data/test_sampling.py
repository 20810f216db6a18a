"""Class-balanced sampling, foreground-biased patches, device-side crops and Grain workers."""

import numpy as np
import pytest

from medjax import sharding
from medjax.data import pipeline, sampling


class _Classes:
  """Classification source: 90 examples of class 0, 10 of class 1."""

  def __init__(self, n0=90, n1=10):
    self._labels = np.array([0] * n0 + [1] * n1, np.int32)

  def __len__(self):
    return len(self._labels)

  def labels(self):
    return self._labels

  def __getitem__(self, i):
    return {"id": np.int64(i), "image": np.full((2, 2, 1), i, np.float32), "label": self._labels[i]}


class _Cases:
  """Segmentation cases of different shapes with one small foreground blob (class 1 or 2) each."""

  def __init__(self, shapes, seed=0):
    rng = np.random.default_rng(seed)
    self.cases = []
    for i, shape in enumerate(shapes):
      label = np.zeros(shape, np.int32)
      centre = [rng.integers(s) for s in shape]
      label[tuple(slice(c, c + 2) for c in centre)] = 1 + i % 2
      image = (rng.normal(size=shape + (1,)) + label[..., None]).astype(np.float32)
      self.cases.append({"id": np.int64(i), "image": image, "label": label,
                         "spacing_mm": np.ones(len(shape), np.float32)})

  def __len__(self):
    return len(self.cases)

  def __getitem__(self, i):
    return dict(self.cases[i])


def test_balanced_probabilities_give_equal_class_shares():
  labels = np.array([0] * 90 + [1] * 10)
  p = sampling.balanced_probabilities(labels)
  assert p.sum() == pytest.approx(1.0)
  assert p[labels == 0].sum() == pytest.approx(0.5) and p[labels == 1].sum() == pytest.approx(0.5)
  sqrt = sampling.balanced_probabilities(labels, power=0.5)
  assert sqrt[labels == 1].sum() == pytest.approx(10 * 10**-0.5 / (90 * 90**-0.5 + 10 * 10**-0.5))


def test_balanced_sampler_draws_classes_equally_and_deterministically():
  batches = pipeline.TrainBatches(_Classes(), global_batch_size=20, seed=1, process_index=0, process_count=1,
                                  sampler="balanced")
  drawn = np.concatenate([batches.global_indices(s) for s in range(50)])  # 10 epochs
  share = np.mean(drawn >= 90)
  assert 0.45 < share < 0.55
  again = pipeline.TrainBatches(_Classes(), global_batch_size=20, seed=1, process_index=0, process_count=1,
                                sampler="balanced")
  np.testing.assert_array_equal(again.global_indices(37), batches.global_indices(37))


def test_balanced_sampler_rejects_multilabel():
  class _Multi(_Classes):
    def labels(self):
      return np.zeros((len(self._labels), 3), np.int32)
  with pytest.raises(ValueError, match="multi-label"):
    pipeline.TrainBatches(_Multi(), global_batch_size=4, seed=0, sampler="balanced", process_index=0,
                          process_count=1)


@pytest.mark.parametrize("shapes,patch", [([(20, 24), (18, 30), (25, 22)], (8, 12)),
                                          ([(10, 12, 14), (12, 9, 16)], (4, 6, 8))])
def test_foreground_fraction_and_patch_shapes(shapes, patch):
  cases = _Cases(shapes)
  always = sampling.PatchSampler(cases, patch, foreground_fraction=1.0)
  never = sampling.PatchSampler(cases, patch, foreground_fraction=0.0)
  rng = np.random.default_rng(0)
  hits_always = hits_never = 0
  for draw in range(60):
    i = draw % len(cases)
    a, n = always.sample(i, rng), never.sample(i, rng)
    assert a["image"].shape == patch + (1,) and a["label"].shape == patch and a["label"].dtype == np.int32
    hits_always += a["label"].any()
    hits_never += n["label"].any()
  assert hits_always == 60  # a foreground-centred patch always holds its centre voxel
  assert hits_never < 45    # uniform placement misses a 2-voxel blob often
  # The evaluation patch is fixed per case and on foreground.
  np.testing.assert_array_equal(always[1]["image"], never[1]["image"])
  assert always[0]["label"].any()


def test_patch_crop_keeps_image_and_label_aligned():
  cases = _Cases([(16, 20)])
  sampler = sampling.PatchSampler(cases, (6, 7), foreground_fraction=0.5)
  rng = np.random.default_rng(3)
  for _ in range(10):
    start = sampler.location(0, rng)
    patch = sampler.crop(cases[0], start)
    window = tuple(slice(s, s + p) for s, p in zip(start, (6, 7)))
    np.testing.assert_array_equal(patch["image"], cases[0]["image"][window])
    np.testing.assert_array_equal(patch["label"], cases[0]["label"][window])


def test_case_smaller_than_patch_is_padded_with_a_warning_once():
  cases = _Cases([(5, 30)])
  sampler = sampling.PatchSampler(cases, (8, 8), pad_value=-3.0)
  with pytest.warns(UserWarning, match=r"Case 0: shape \(5, 30\) is smaller than the patch \(8, 8\)"):
    patch = sampler.sample(0, np.random.default_rng(0))
  assert patch["image"].shape == (8, 8, 1)
  assert (patch["image"][0] == -3.0).all() and (patch["label"][0] == 0).all()  # padding rows (1 before, 2 after)
  import warnings
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    sampler.sample(0, np.random.default_rng(1))  # the warning is not repeated


def test_patch_sampler_errors_name_the_case():
  cases = _Cases([(10, 10)])
  with pytest.raises(ValueError, match="3 spatial axes"):
    sampling.PatchSampler(cases, (4, 4, 4)).sample(0, np.random.default_rng(0))
  with pytest.raises(ValueError, match="foreground_fraction"):
    sampling.PatchSampler(cases, (4, 4), foreground_fraction=1.5)


def test_train_batches_draw_patches_deterministically_by_position():
  cases = _Cases([(20, 24), (18, 30), (25, 22), (21, 21)])
  sampler = sampling.PatchSampler(cases, (8, 8))
  batches = pipeline.TrainBatches(sampler, global_batch_size=2, seed=5, process_index=0, process_count=1)
  stream = batches.iterate(0)
  first = [next(stream) for _ in range(4)]
  resumed = next(batches.iterate(3))
  np.testing.assert_array_equal(resumed["image"], first[3]["image"])
  # A new epoch draws new patches of the same cases.
  assert not np.array_equal(batches.host_batch(0)["image"], batches.host_batch(2)["image"])


@pytest.mark.parametrize("shapes,patch", [([(12, 16), (10, 20), (6, 9), (14, 14)], (8, 8)),
                                          ([(6, 8, 10), (7, 5, 9), (8, 8, 8), (6, 6, 6)], (4, 4, 6))])
def test_device_crops_equal_host_crops_on_eight_devices(shapes, patch):
  import warnings
  mesh = sharding.make_mesh((("data", -1),))
  cases = _Cases(shapes)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the small case's padding warning
    sampler = sampling.PatchSampler(cases, patch, foreground_fraction=0.5)
    batches = pipeline.TrainBatches(sampler, global_batch_size=8, seed=2, process_index=0, process_count=1)
    device = pipeline.DeviceCrops(batches, mesh).iterate(1)
    for step in (1, 2):
      host = batches.host_batch(step)
      got = next(device)
      np.testing.assert_array_equal(np.asarray(got["image"]), host["image"])
      np.testing.assert_array_equal(np.asarray(got["label"]), host["label"])
      np.testing.assert_array_equal(np.asarray(got["spacing_mm"]), host["spacing_mm"])
      assert got["image"].sharding.spec[0] == "data"


def test_device_cache_budget_error():
  mesh = sharding.make_mesh((("data", -1),))
  sampler = sampling.PatchSampler(_Cases([(12, 16)] * 8), (8, 8))
  batches = pipeline.TrainBatches(sampler, global_batch_size=8, seed=0, process_index=0, process_count=1)
  with pytest.raises(ValueError, match="device_crop=False"):
    pipeline.DeviceCrops(batches, mesh, max_bytes=1000)


def test_grain_workers_give_the_same_stream():
  source = _Cases([(12, 16), (10, 20), (14, 14)])
  batches = pipeline.TrainBatches(sampling.PatchSampler(source, (8, 8)), global_batch_size=2, seed=4,
                                  process_index=0, process_count=1)
  expected = [batches.host_batch(s) for s in (5, 6, 7)]
  stream = batches.grain_iterate(5, num_workers=2)
  for want in expected:
    got = next(stream)
    np.testing.assert_array_equal(got["image"], want["image"])
    np.testing.assert_array_equal(got["id"], want["id"])
  stream.close()


def test_input_options_reject_unknown_keys():
  with pytest.raises(ValueError, match="Did you mean 'patch_size'"):
    pipeline.input_options({"batch_size": 2, "patch_sise": (8, 8)})
  with pytest.raises(ValueError, match="needs config.input.patch_size"):
    pipeline.input_options({"batch_size": 2, "device_crop": True})


def test_prepare_source_adds_distance_maps_to_patches():
  cases = _Cases([(12, 16), (10, 20)])
  source = pipeline.prepare_source(cases, {"batch_size": 2, "patch_size": (8, 8), "distance_maps": True,
                                           "foreground_fraction": 1.0},
                                   seed=0, num_classes=3, for_training=True)
  patch = source.sample(0, np.random.default_rng(0))
  assert patch["distance_map"].shape == (8, 8, 3)
  inside = patch["label"] == 1
  assert (patch["distance_map"][..., 1][inside] < 0).all() and (patch["distance_map"][..., 1][~inside] > 0).all()
  batches = pipeline.TrainBatches(source, global_batch_size=2, seed=0, process_index=0, process_count=1)
  assert batches.host_batch(0)["distance_map"].shape == (2, 8, 8, 3)
  import pickle
  assert len(pickle.loads(pickle.dumps(source))) == 2
