"""Tests for medjax.compress.structured: filter scores (L1 / L2, ties), kept counts, and the rebuilt ResNet
(fewer inner channels) computing the original's function with the removed filters silenced, with exactly the
expected parameter count; GroupNorm group counts; rebuilding from a config (`inner_widths`)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax import models
from medjax.compress import structured
from medjax.models.resnet import ResNet


def _init(model, shape, seed=0):
  """A random input and random variables of `model` (every parameter and statistic, so norms and biases
  matter), drawn with NumPy from the variables' shapes (`eval_shape`: no compiled initialisers)."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(shape).astype(np.float32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  out = jax.tree.map(lambda v: (0.6 * rng.standard_normal(v.shape)).astype(np.float32), shapes)
  if "batch_stats" in shapes:  # positive variances
    out["batch_stats"] = jax.tree.map(lambda v: rng.uniform(0.5, 1.5, v.shape).astype(np.float32),
                                      shapes["batch_stats"])
  return x, out


def _expected_count(params, kept):
  """The rebuilt model's parameter count from the original shapes alone: an inner conv's kernel (and bias)
  loses its removed output channels, its norm's scale and offset their entries, the next conv's kernel the
  matching input channels (in a bottleneck conv2 loses both)."""
  count = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = [p.key for p in path]
    shape = list(leaf.shape)
    if keys[0].startswith("stage"):
      block, layer = keys[0], keys[1]
      own = kept.get(f"{block}/{layer}")
      norm_of = kept.get(f"{block}/conv{layer[-1]}") if layer.startswith("norm") else None
      feeding = kept.get(f"{block}/conv{int(layer[-1]) - 1}") if layer.startswith("conv") else None
      if own is not None:
        shape[-1] = len(own)
      if norm_of is not None:
        shape[-1] = len(norm_of)
      if feeding is not None and keys[-1] == "kernel":
        shape[-2] = len(feeding)
    count += int(np.prod(shape))
  return count


def test_l1_and_l2_scores_pick_different_filters_and_ties_keep_index_order():
  model = ResNet(num_classes=2, width=2, stage_sizes=(1,), small_input=True, norm="none")
  _, variables = _init(model, (1, 6, 5, 1))
  kernel = np.zeros((3, 3, 2, 2), np.float32)
  kernel[1, 1, 0, 0] = 3.0                # channel 0: one large weight, L1 3, L2 3
  kernel[0, :2, :, 1] = 1.0               # channel 1: four unit weights, L1 4, L2 2
  variables["params"]["stage1_block0"]["conv1"]["kernel"] = kernel
  l1 = structured.filter_scores(model, variables["params"])
  l2 = structured.filter_scores(model, variables["params"], norm="l2")
  np.testing.assert_array_equal(l1["stage1_block0/conv1"], [3.0, 4.0])
  np.testing.assert_array_equal(l2["stage1_block0/conv1"], [3.0, 2.0])
  assert structured.choose_filters(l1, keep=0.5)["stage1_block0/conv1"].tolist() == [1]
  assert structured.choose_filters(l2, keep=0.5)["stage1_block0/conv1"].tolist() == [0]
  tied = {"c": np.array([1.0, 2.0, 2.0, 1.0, 0.5])}
  assert structured.choose_filters(tied, keep=0.2)["c"].tolist() == [1]          # the tie 1/2: index 1
  assert structured.choose_filters(tied, keep=0.6)["c"].tolist() == [0, 1, 2]    # the tie 0/3: index 0
  assert structured.choose_filters(tied, keep=0.2, multiple=2)["c"].tolist() == [1, 2]
  assert [structured.kept_count(64, k) for k in (0.5, 0.3, 0.01, 1.0)] == [32, 19, 1, 64]
  assert structured.kept_count(64, 0.3, multiple=8) == 24 and structured.kept_count(10, 0.9, multiple=4) == 10
  assert structured.kept_count(64, 0.01, min_channels=4) == 4


@pytest.mark.parametrize("norm, bottleneck, shape", [
    ("batch", False, (2, 9, 7, 2)),
    ("instance", False, (2, 3, 6, 5, 2)),
    ("none", True, (2, 9, 7, 2)),
    ("batch", True, (2, 3, 6, 5, 2)),
])
def test_rebuilt_model_computes_the_zeroed_original_with_fewer_parameters(norm, bottleneck, shape):
  model = ResNet(num_classes=3, spatial_dims=len(shape) - 2, width=4 if bottleneck else 8, stage_sizes=(1, 2),
                 bottleneck=bottleneck, norm=norm, small_input=True)
  x, variables = _init(model, shape)
  pruned = structured.prune_filters(model, variables, keep=0.5)
  expected_widths = ((2, 2), (4, 4), (4, 4)) if bottleneck else ((4,), (8,), (8,))
  assert pruned.inner_widths == expected_widths and pruned.model.inner_widths == expected_widths
  assert set(pruned.kept) == set(structured.inner_convs(model))

  logits, aux = pruned.model.apply(pruned.variables, x, train=False)
  ref_logits, ref_aux = model.apply(structured.zero_filters(model, variables, pruned.kept), x, train=False)
  dense_logits, _ = model.apply(variables, x, train=False)
  # Same function up to float summation order (the next conv sums over fewer input channels).
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
  for stage, ref in zip(aux["stages"], ref_aux["stages"]):
    np.testing.assert_allclose(stage, ref, rtol=1e-5, atol=1e-5)
  assert np.max(np.abs(dense_logits - logits)) > 1e-2  # the removed channels did matter before

  before = structured.param_count(variables["params"])
  after = structured.param_count(pruned.variables["params"])
  assert after == _expected_count(variables["params"], pruned.kept) < before
  init_shapes = jax.eval_shape(lambda: pruned.model.init(jax.random.key(0), x, train=False))
  jax.tree.map(lambda a, b: np.testing.assert_equal(a.shape, b.shape), init_shapes, pruned.variables)


def test_group_norm_keeps_its_group_count():
  model = ResNet(num_classes=2, width=64, stage_sizes=(1,), small_input=True, norm="group")
  x, variables = _init(model, (1, 6, 5, 1))
  pruned = structured.prune_filters(model, variables, keep=0.4)  # round(25.6) = 26 -> a multiple of 32
  assert pruned.inner_widths == ((32,),)
  assert pruned.variables["params"]["stage1_block0"]["norm1"]["norm"]["scale"].shape == (32,)
  logits, _ = pruned.model.apply(pruned.variables, x, train=False)
  assert logits.shape == (1, 2) and np.all(np.isfinite(logits))
  assert structured.prune_filters(model, variables, keep=0.4, multiple=1).inner_widths == ((26,),)
  narrow = ResNet(num_classes=2, width=16, stage_sizes=(1,), small_input=True, norm="group")
  _, narrow_variables = _init(narrow, (1, 6, 5, 1))  # 16 groups of 1 channel: left whole by default
  assert structured.prune_filters(narrow, narrow_variables, keep=0.5).inner_widths == ((16,),)
  assert structured.prune_filters(narrow, narrow_variables, keep=0.5, multiple=8).inner_widths == ((8,),)


def test_registered_resnet_rebuilds_from_a_json_config_and_prunes_again():
  kwargs = dict(num_classes=3, width=4, small_input=True)
  model = models.build_model("resnet18", kwargs)
  x, variables = _init(model, (2, 8, 6, 1))
  pruned = structured.prune_filters(model, variables, keep=0.5, norm="l2")
  assert pruned.inner_widths == ((2,),) * 2 + ((4,),) * 2 + ((8,),) * 2 + ((16,),) * 2
  widths = json.loads(json.dumps(pruned.inner_widths))  # a config round trip: lists
  rebuilt = models.build_model("resnet18", dict(kwargs, inner_widths=widths))
  np.testing.assert_array_equal(rebuilt.apply(pruned.variables, x, train=False)[0],
                                pruned.model.apply(pruned.variables, x, train=False)[0])
  again = structured.prune_filters(pruned.model, pruned.variables, keep=0.5)
  assert again.inner_widths == ((1,),) * 2 + ((2,),) * 2 + ((4,),) * 2 + ((8,),) * 2
  full = models.build_model("resnet18", dict(kwargs, inner_widths=[[4]] * 2 + [[8]] * 2 + [[16]] * 2 + [[32]] * 2))
  np.testing.assert_array_equal(full.apply(variables, x, train=False)[0], model.apply(variables, x, train=False)[0])


def test_errors_name_the_problem():
  with pytest.raises(TypeError, match=r"expected a medjax.models.resnet.ResNet .* got UNet"):
    structured.inner_convs(models.build_model("unet", dict(spatial_dims=2, num_classes=2)))
  acs_model = models.build_model("resnet18_acs", dict(num_classes=2, width=4, small_input=True))
  with pytest.raises(ValueError, match=r"an ACS convolution assigns output channels to planes by position"):
    structured.inner_convs(acs_model)
  model = ResNet(num_classes=2, width=4, stage_sizes=(1,), small_input=True)
  _, variables = _init(model, (1, 6, 5, 1))
  with pytest.raises(ValueError, match=r"keep \(fraction of channels kept\) must lie in \(0, 1\], got 0"):
    structured.prune_filters(model, variables, keep=0)
  with pytest.raises(ValueError, match=r"norm must be one of \('l1', 'l2'\), got 'l3'"):
    structured.prune_filters(model, variables, keep=0.5, norm="l3")
  with pytest.raises(ValueError, match=r"ResNet.inner_widths needs one entry per residual block \(1 for stage_sizes "
                                       r"\(1,\)\), got 2."):
    model.clone(inner_widths=((2,), (2,))).init(jax.random.key(0), jnp.zeros((1, 6, 5, 1)), train=False)
