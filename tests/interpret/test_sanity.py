"""Sanity checks (medjax.interpret.sanity): Spearman against scipy, parameter randomisation on tiny models, and
deletion / insertion curves against a numpy loop on linear models."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
import scipy.stats

from medjax.interpret import gradcam, gradients, sanity
from medjax.interpret.targets import RegionTarget
from medjax.models import build_model
from tests.interpret.test_gradients import Linear, SegConv
from tests.models.zoo_testing import host_variables_for


class TinyCNN(nn.Module):
  """conv1 -> ReLU -> conv2 -> ReLU -> mean pool -> head: three parameter groups in call order."""

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    del train
    nd = x.ndim - 2
    x = nn.relu(nn.Conv(4, (3,) * nd, name="conv1")(x))
    x = nn.relu(nn.Conv(4, (3,) * nd, name="conv2")(x))
    return nn.Dense(2, name="head")(x.mean(axis=tuple(range(1, x.ndim - 1)))), {}


# --- spearman --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(3, 5, 6), (2, 3, 4, 5)])
@pytest.mark.parametrize("absolute", [False, True])
def test_spearman_equals_scipy_with_ties(shape, absolute):
  rng = np.random.default_rng(0)
  # Few distinct values (many ties), signed so that |maps| changes the ranking.
  a = rng.integers(-3, 4, size=shape).astype(np.float32)
  b = (a + rng.integers(-2, 3, size=shape)).astype(np.float32)
  got = np.asarray(sanity.spearman(jnp.asarray(a), jnp.asarray(b), absolute=absolute))
  f = np.abs if absolute else (lambda x: x)
  want = [scipy.stats.spearmanr(f(a[i]).ravel(), f(b[i]).ravel()).statistic for i in range(shape[0])]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_spearman_of_a_constant_map_is_nan_and_compare_maps_leaves_it_out():
  a = jnp.asarray(np.random.default_rng(1).normal(size=(3, 4, 4)), jnp.float32).at[2].set(1.0)
  assert np.isnan(np.asarray(sanity.spearman(a, a))[2])
  assert sanity.compare_maps(a, a) == pytest.approx({"spearman": 1.0, "spearman_abs": 1.0})
  assert sanity.compare_maps(a, -a) == pytest.approx({"spearman": -1.0, "spearman_abs": 1.0})
  with pytest.raises(ValueError, match="maps_a and maps_b"):
    sanity.spearman(a, a[:, :2])


def test_random_map_is_uniform_of_the_shape():
  m = np.asarray(sanity.random_map(jax.random.key(0), jnp.zeros((2, 5, 6))))
  assert m.shape == (2, 5, 6) and m.dtype == np.float32 and m.min() >= 0 and m.max() < 1


# --- parameter randomisation -----------------------------------------------------------------------------------------

def _tiny_resnet():
  model = build_model("resnet18", {"num_classes": 2, "spatial_dims": 2, "width": 4, "stage_sizes": (1, 1, 1, 1),
                                   "small_input": True})
  images = jnp.ones((1, 8, 8, 1))
  return model, host_variables_for(model, images), images


def test_parameter_groups_run_from_the_head_to_the_stem():
  model, variables, images = _tiny_resnet()
  # host_variables_for maps over the tree, which sorts the dict keys (stem after stages): the order must come from
  # the call order.
  assert list(variables["params"]) == sorted(variables["params"])
  assert sanity.parameter_groups(model, variables, images) == [
      "head", "stage4_block0", "stage3_block0", "stage2_block0", "stage1_block0", "stem_norm", "stem_conv"]


def _leaves(tree):
  return jax.tree_util.tree_leaves_with_path(tree)


def test_randomize_changes_exactly_the_named_groups():
  model, variables, images = _tiny_resnet()
  groups = ["head", "stage4_block0"]
  out = sanity.randomize(variables, groups, jax.random.key(3))
  assert out["batch_stats"] is variables["batch_stats"]
  for name, params in variables["params"].items():
    for (path, old), (_, new) in zip(_leaves(params), _leaves(out["params"][name])):
      if name in groups:
        assert new.shape == old.shape and new.dtype == old.dtype
        assert not np.array_equal(new, old), (name, path)  # constant leaves (zero biases) change too
      else:
        assert new is old
  # With the model, each group takes the values of the model's own init (its true initialisers).
  key = jax.random.key(4, impl="rbg")  # threefry's samplers compile slowly on a small CPU
  out = sanity.randomize(variables, ["head"], key, model=TinyCNN(), images=jnp.ones((1, 6, 6, 1)))
  init = TinyCNN().init(key, jnp.ones((1, 6, 6, 1)))["params"]["head"]
  jax.tree.map(np.testing.assert_array_equal, out["params"]["head"], init)
  with pytest.raises(ValueError, match="groups"):
    sanity.randomize(variables, ["nope"], jax.random.key(0))


@pytest.mark.parametrize("method,options", [(gradients.saliency, {}), (gradcam.grad_cam, {"relu": False})])
@pytest.mark.parametrize("independent", [False, True])
def test_cascading_randomization_starts_at_one_and_decorrelates(method, options, independent):
  model = TinyCNN()
  images = jax.random.normal(jax.random.key(0), (3, 8, 8, 1))
  variables = model.init(jax.random.key(1), images)
  target = jnp.array([0, 1, 0])
  result = sanity.cascading_randomization(method, model, variables, images, target, rng=jax.random.key(7),
                                          independent=independent, keep_maps=True, **options)
  assert result.stages == ("original", "head", "conv2", "conv1")
  assert result.per_example.shape == result.per_example_abs.shape == (4, 3)
  assert result.spearman.shape == result.spearman_abs.shape == (4,)
  assert result.maps.shape == (4, 3, 8, 8)
  np.testing.assert_allclose(result.per_example[0], 1.0, rtol=1e-6)
  np.testing.assert_allclose(result.maps[0], method(model, variables, images, target, **options))
  # Cascading: the last stage is a fully re-initialised network; independent: conv1 alone re-initialised.
  assert result.spearman[-1] < 0.9, result.spearman


# --- deletion / insertion --------------------------------------------------------------------------------------------

def _linear(spatial, channels=1, classes=2, seed=0):
  """Linear model whose class-0 logit is sum(w * x) and the other logits 0: the softmax of class 0 is sigmoid(w.x)."""
  rng = np.random.default_rng(seed)
  w = rng.normal(size=spatial).astype(np.float32)
  kernel = np.zeros((int(np.prod(spatial)) * channels, classes), np.float32)
  kernel[:, 0] = np.repeat(w.ravel(), channels)
  variables = {"params": {"Dense_0": {"kernel": jnp.asarray(kernel), "bias": jnp.zeros(classes)}}}
  images = jnp.asarray(rng.uniform(0.1, 1.0, size=(2,) + spatial + (channels,)), jnp.float32)
  return Linear(classes), variables, images, w


def _softmax_scores(model, variables, images, target):
  logits, _ = model.apply(variables, images)
  return np.asarray(jax.nn.softmax(logits)[np.arange(len(target)), np.asarray(target)])


@pytest.mark.parametrize("spatial", [(4, 5), (3, 4, 3)])
def test_the_true_weight_map_deletes_faster_and_inserts_faster(spatial):
  model, variables, images, w = _linear(spatial)
  target = jnp.zeros(2, jnp.int32)
  maps = jnp.asarray(np.broadcast_to(w, (2,) + spatial))
  s_image = _softmax_scores(model, variables, images, target)
  for mode, start, end in [("deletion", s_image, 0.5), ("insertion", 0.5, s_image)]:
    curves, auc = sanity.deletion_insertion(model, variables, images, target, maps, steps=6, baseline="zero",
                                            mode=mode)
    _, auc_reversed = sanity.deletion_insertion(model, variables, images, target, -maps, steps=6, baseline=0.0,
                                                mode=mode)
    assert curves.shape == (2, 7) and auc.shape == (2,)
    np.testing.assert_allclose(curves[:, 0], start, rtol=1e-5)
    np.testing.assert_allclose(curves[:, -1], end, rtol=1e-5)
    assert ((auc < auc_reversed) if mode == "deletion" else (auc > auc_reversed)).all(), (mode, auc, auc_reversed)


def _reference(model, variables, images, target, maps, steps, baseline, mode):
  """The curve by a plain loop: rank by the map (ties by index), change floor(k N / steps) positions per step."""
  images, baseline = np.asarray(images), np.broadcast_to(np.asarray(baseline), images.shape)
  curves = []
  for b in range(images.shape[0]):
    order = np.argsort(-np.asarray(maps[b]).ravel(), kind="stable")
    n = order.size
    row = []
    for k in range(steps + 1):
      changed = np.zeros(n, bool)
      changed[order[:k * n // steps]] = True
      changed = changed.reshape(maps.shape[1:])[..., None]
      x = np.where(changed, baseline[b], images[b]) if mode == "deletion" else np.where(changed, images[b], baseline[b])
      row.append(_softmax_scores(model, variables, jnp.asarray(x[None]), target[b:b + 1])[0])
    curves.append(row)
  curves = np.array(curves)
  return curves, ((curves[:, 1:] + curves[:, :-1]) / 2).sum(1) / steps  # np.trapezoid needs numpy 2


@pytest.mark.parametrize("mode", ["deletion", "insertion"])
def test_curve_equals_a_numpy_loop_with_ties_channels_and_chunks(mode):
  model, variables, images, _ = _linear((4, 5), channels=2, classes=3, seed=2)
  target = jnp.array([2, 0])
  maps = jnp.asarray(np.random.default_rng(3).integers(0, 3, size=(2, 4, 5)), jnp.float32)  # many ties
  baseline = jnp.asarray(np.random.default_rng(4).normal(size=images.shape), jnp.float32)
  # steps=7 does not divide the 20 positions; batch_size=3 runs one step per pass over 8 padded chunks.
  curves, auc = sanity.deletion_insertion(model, variables, images, target, maps, steps=7, baseline=baseline,
                                          mode=mode, batch_size=3)
  want_curves, want_auc = _reference(model, variables, images, target, maps, 7, baseline, mode)
  np.testing.assert_allclose(curves, want_curves, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(auc, want_auc, rtol=1e-5, atol=1e-6)


def test_blur_baseline_3d_and_region_target():
  model = SegConv()
  images = jax.random.uniform(jax.random.key(0), (2, 4, 5, 3, 1))
  variables = model.init(jax.random.key(1), images)
  mask = np.zeros((2, 4, 5, 3), np.float32)
  mask[:, :2] = 1
  maps = sanity.random_map(jax.random.key(2), mask)
  curves, _ = sanity.deletion_insertion(model, variables, images, RegionTarget(mask, 1), maps, steps=4,
                                        blur_sigma=1.0)
  for k, x in [(0, images), (-1, sanity.gaussian_blur(images, 1.0))]:
    probs = np.asarray(jax.nn.softmax(model.apply(variables, x)[0])[..., 1])
    np.testing.assert_allclose(curves[:, k], (probs * mask).sum((1, 2, 3)) / mask.sum((1, 2, 3)), rtol=1e-5)


def test_gaussian_blur_matches_scipy_inside_and_keeps_constants():
  x = np.random.default_rng(5).normal(size=(1, 24, 20, 1)).astype(np.float32)
  got = np.asarray(sanity.gaussian_blur(x, 1.5))
  want = scipy.ndimage.gaussian_filter(x[0, ..., 0].astype(np.float64), 1.5, truncate=8.0)
  np.testing.assert_allclose(got[0, 8:-8, 8:-8, 0], want[8:-8, 8:-8], atol=1e-5)
  np.testing.assert_allclose(sanity.gaussian_blur(np.full((1, 5, 6, 4, 2), 3.0), (2.0, 0.0, 5.0)), 3.0, rtol=1e-6)


def test_bad_inputs_name_the_argument():
  model, variables, images, w = _linear((4, 5))
  target = jnp.zeros(2, jnp.int32)
  maps = jnp.zeros((2, 4, 5))
  with pytest.raises(ValueError, match="maps must"):
    sanity.deletion_insertion(model, variables, images, target, maps[:, :3])
  with pytest.raises(ValueError, match="steps must"):
    sanity.deletion_insertion(model, variables, images, target, maps, steps=0)
  with pytest.raises(ValueError, match="baseline must"):
    sanity.deletion_insertion(model, variables, images, target, maps, baseline="noise")
  with pytest.raises(ValueError, match="baseline of shape"):
    sanity.deletion_insertion(model, variables, images, target, maps, baseline=jnp.zeros((3, 4)))
  with pytest.raises(ValueError, match="mode must"):
    sanity.deletion_insertion(model, variables, images, target, maps, mode="both")
  with pytest.raises(ValueError, match="score must"):
    sanity.deletion_insertion(model, variables, images, target, maps, score="prob")
  with pytest.raises(ValueError, match="blur_sigma"):
    sanity.deletion_insertion(model, variables, images, target, maps, blur_sigma=(1.0,))
