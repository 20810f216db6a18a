"""make_objective: deep supervision, multi-task sums, config validation; every loss jits with finite grads."""

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest

from medjax import losses, models


def test_deep_supervision_weights_sum_to_one():
  for n in (1, 2, 3, 5):
    w = losses.deep_supervision_weights(n)
    assert w.shape == (n,) and w.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(w[1:] / w[:-1], 0.5)
  np.testing.assert_allclose(losses.deep_supervision_weights(3), [4 / 7, 2 / 7, 1 / 7])
  np.testing.assert_allclose(losses.deep_supervision_weights(3, "uniform"), [1 / 3] * 3)
  np.testing.assert_allclose(losses.deep_supervision_weights(3, (2, 1, 1)), [0.5, 0.25, 0.25])
  with pytest.raises(ValueError, match="3 non-negative numbers"):
    losses.deep_supervision_weights(3, (1, 1))


def test_nearest_downsampling_of_targets_anisotropic_and_odd():
  labels = np.arange(5 * 8).reshape(1, 5, 8)
  # y not downsampled, x by 2 (stride (1, 2)): x indices 1, 3, 5, 7.
  np.testing.assert_array_equal(losses.downsample_nearest(labels, (5, 4)), labels[:, :, [1, 3, 5, 7]])
  # Odd sizes: output i takes floor((i + 1/2) * in / out) -> y 5 -> 3: 0, 2, 4; x 8 -> 3: 1, 4, 6.
  np.testing.assert_array_equal(losses.nearest_indices(5, 3), [0, 2, 4])
  np.testing.assert_array_equal(losses.nearest_indices(8, 3), [1, 4, 6])
  np.testing.assert_array_equal(losses.downsample_nearest(labels, (3, 3)), labels[:, [0, 2, 4]][:, :, [1, 4, 6]])
  # Channels after the spatial axes (distance maps, soft targets) ride along.
  maps = np.arange(5 * 8 * 2).reshape(1, 5, 8, 2)
  np.testing.assert_array_equal(losses.downsample_nearest(maps, (5, 2)), maps[:, :, [2, 6]])


def _xent(logits, labels):
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  return -(np.eye(logits.shape[-1])[labels] * logp).sum(-1).mean(axis=tuple(range(1, labels.ndim)))


def test_deep_supervision_objective_matches_hand_sum():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 3, size=(2, 4, 6))
  outputs = rng.normal(size=(2, 4, 6, 3)).astype(np.float32)
  heads = [rng.normal(size=(2, 4, 3, 3)).astype(np.float32), rng.normal(size=(2, 2, 2, 3)).astype(np.float32)]
  objective = losses.make_objective("xent", {"deep_supervision": True})
  got = objective(jnp.asarray(outputs), {"deep_supervision": heads}, {"label": labels})
  expected = (4 / 7 * _xent(outputs, labels) + 2 / 7 * _xent(heads[0], labels[:, :, [1, 3, 5]])
              + 1 / 7 * _xent(heads[1], labels[:, [1, 3]][:, :, [1, 4]]))
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  explicit = losses.make_objective("xent", {"deep_supervision": {"weights": (1.0, 0.0, 1.0)}})
  got = explicit(jnp.asarray(outputs), {"deep_supervision": heads}, {"label": labels})
  np.testing.assert_allclose(got, 0.5 * _xent(outputs, labels) + 0.5 * _xent(heads[1], labels[:, [1, 3]][:, :, [1, 4]]),
                             rtol=1e-5)
  with pytest.raises(ValueError, match="no aux\\['deep_supervision'\\]"):
    objective(jnp.asarray(outputs), {}, {"label": labels})


def test_multi_task_sum_and_main_weight():
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 2, size=(2, 3, 3))
  outputs = rng.normal(size=(2, 3, 3, 2)).astype(np.float32)
  head = rng.normal(size=(2, 4)).astype(np.float32)
  batch = {"label": labels, "class_label": np.array([3, 0]), "mask": np.ones((2, 3, 3), np.float32)}
  config = mlc.ConfigDict(dict(weight=2.0, batch_dice=True,
                               tasks=dict(head_logits=dict(name="xent", weight=0.5, target="class_label"))))
  objective = losses.make_objective("dice_xent", config)
  got = objective(jnp.asarray(outputs), {"head_logits": head}, batch)
  expected = (2.0 * losses.dice_cross_entropy(outputs, labels, batch_dice=True)
              + 0.5 * losses.softmax_cross_entropy(head, batch["class_label"]))
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  with pytest.raises(KeyError, match="no 'class_label' entry"):
    objective(jnp.asarray(outputs), {"head_logits": head}, {"label": labels})


@pytest.mark.slow
def test_unet_deep_supervision_with_anisotropic_strides_trains():
  model = models.MODELS.get("unet")(spatial_dims=2, num_classes=2, features=(4, 8, 8), strides=((1, 2), 2),
                                    deep_supervision=1, head_classes=3, blocks_per_stage=1, norm="none")
  images = jnp.ones((2, 6, 10, 1))
  variables = jax.jit(lambda key: model.init(key, images, train=False))(jax.random.key(0))
  batch = {"image": images, "label": jnp.asarray(np.random.default_rng(2).integers(0, 2, size=(2, 6, 10))),
           "class_label": jnp.array([0, 2])}
  objective = losses.make_objective("dice_xent", dict(
      deep_supervision=dict(weights="exponential"), tasks=dict(head_logits=dict(name="xent", target="class_label"))))

  def loss(params):
    outputs, aux = model.apply({"params": params}, images, train=True)
    assert aux["deep_supervision"][0].shape == (2, 6, 5, 2)
    return jnp.mean(objective(outputs, aux, batch))

  value, grads = jax.jit(jax.value_and_grad(loss))(variables["params"])
  assert np.isfinite(float(value))
  assert float(jnp.abs(grads["ds_head1"]["kernel"]).sum()) > 0 and float(jnp.abs(grads["cls_head"]["kernel"]).sum()) > 0


@pytest.mark.parametrize("config,message", [
    ("dice_xnet", r"config\.loss: Unknown loss 'dice_xnet'\. Did you mean 'dice_xent'"),
    (dict(name="dice_xent", batch_dcie=True), r"config\.loss: unknown key 'batch_dcie'.*Did you mean 'batch_dice'"),
    (dict(name="dice_xent", tasks=dict(head_logits=dict(name="xent", wieght=0.5, target="class_label"))),
     r"config\.loss\.tasks\.head_logits: unknown key 'wieght' for loss 'xent'\. Did you mean 'weight'"),
    (dict(name="dice", tasks=dict(head_logits=dict(name="xnet", target="c"))),
     r"config\.loss\.tasks\.head_logits: Unknown loss 'xnet'\. Did you mean 'xent'"),
    (dict(name="dice", tasks=dict(head_logits=dict(name="xent"))), r"tasks\.head_logits: needs 'target'"),
    (dict(name="dice", tasks=dict(head_logits=dict(name="xent", target="c", deep_supervision=True))),
     r"unknown key 'deep_supervision'"),
    (dict(name="dice_boundary", distance_map=1.0), r"config\.loss: 'distance_map' is not a config key"),
    (dict(name="dice", deep_supervision=dict(weights="exponentail")),
     r"config\.loss\.deep_supervision\.weights: unknown scheme 'exponentail'\. Did you mean 'exponential'"),
    (dict(name="dice", deep_supervision=dict(weigths=(1, 1))),
     r"config\.loss\.deep_supervision: unknown key 'weigths'\. Did you mean 'weights'"),
    (dict(name="dice", deep_supervision=dict(weights=(1, -1))), r"deep_supervision\.weights: .*non-negative"),
    (dict(name="dice", weight="heavy"), r"config\.loss\.weight must be a number"),
    (dict(batch_dice=True), r"config\.loss must name its loss"),
])
def test_validate_loss_config_messages(config, message):
  with pytest.raises(ValueError, match=message):
    losses.validate_loss_config(config)
  if isinstance(config, dict) and "name" in config:
    kwargs = dict(config)
    with pytest.raises((ValueError, KeyError)):
      losses.make_objective(kwargs.pop("name"), kwargs)


def test_validate_accepts_good_configs():
  losses.validate_loss_config("xent")
  losses.validate_loss_config(mlc.ConfigDict(dict(
      name="dice_xent", batch_dice=True, mask=None, deep_supervision=dict(weights=(1.0, 0.5)),
      tasks=dict(head_logits=dict(name="focal", weight=0.5, target="class_label", gamma=1.0)))))


def _inputs(name, spatial, rng):
  num_classes = 1 if name in ("l1", "l2", "mse", "huber") else 3
  logits = rng.normal(size=(2,) + spatial + (num_classes,)).astype(np.float32)
  if num_classes == 1:
    label = rng.normal(size=(2,) + spatial).astype(np.float32)
  else:
    label = rng.integers(0, num_classes, size=(2,) + spatial)
  batch = {"label": label, "mask": (rng.random((2,) + spatial) > 0.2).astype(np.float32),
           "distance_map": rng.normal(size=(2,) + spatial + (num_classes,)).astype(np.float32)}
  return logits, batch


@pytest.mark.parametrize("spatial,dtype", [((6, 5), jnp.bfloat16), ((4, 4, 3), jnp.float32)])
def test_every_loss_jits_with_finite_grads(spatial, dtype):
  rng = np.random.default_rng(3)
  for name in losses.LOSSES.names():
    logits, batch = _inputs(name, spatial, rng)
    # One skeleton iteration keeps the clDice compile short; the tube tests run the default 3.
    objective = losses.make_objective(name, {"iterations": 1} if "cldice" in name else {})

    def loss_fn(x, b, objective=objective):
      per_example = objective(x, {}, b)
      return jnp.mean(per_example), per_example

    (value, per_example), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
        jnp.asarray(logits, dtype), batch)
    assert per_example.shape == (2,) and per_example.dtype == jnp.float32, name
    assert np.isfinite(float(value)) and bool(jnp.all(jnp.isfinite(grads.astype(jnp.float32)))), name
    assert float(jnp.abs(grads.astype(jnp.float32)).sum()) > 0, name
