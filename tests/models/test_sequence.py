"""Tests for medjax.models.sequence (CNN-LSTM)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax import models
from medjax.models import sequence  # noqa: F401  (registers "cnn_lstm")
from medjax.models.resnet import ResNet18
from medjax.models.sequence import CNNLSTM
from tests.models.zoo_testing import KEY, num_params as _num_params, init_shapes as _init_apply

TINY = dict(features=(4, 8), hidden_size=6)


def _lstm_params(d_in, hidden):
  return 4 * (d_in * hidden + hidden * hidden + hidden)  # i, f, g, o: input kernel, recurrent kernel, bias


@pytest.mark.parametrize("shape,per_step,pooling", [
  ((2, 5, 12, 16, 1), False, "mean"),        # volume as z-slices / 2D frames
  ((2, 5, 12, 16, 1), True, "mean"),         # per-step logits (B, T, classes)
  ((3, 4, 6, 8, 10, 2), False, "last"),      # spatial_dims=4: a series of 3D volumes
], ids=["2d_frames", "2d_frames_per_step", "3d_frames_last"])
def test_cnn_lstm_shapes_and_aux(shape, per_step, pooling):
  b, t = shape[:2]
  model = CNNLSTM(num_classes=3, spatial_dims=len(shape) - 2, per_step=per_step, pooling=pooling, **TINY)
  (logits, aux), variables = _init_apply(model, jnp.ones(shape))
  chex.assert_shape(logits, (b, t, 3) if per_step else (b, 3))
  assert logits.dtype == jnp.float32
  assert set(aux) == {"slice_features", "sequence_features", "features", "mask", "stages"}
  chex.assert_shape([aux["slice_features"], aux["sequence_features"], aux["features"], aux["mask"]],
                    [(b, t, 8), (b, t, 12), (b, 12), (b, t)])
  frame = shape[2:-1]
  chex.assert_shape(aux["stages"], [(b * t, *frame, 4), (b * t, *[(n + 1) // 2 for n in frame], 8)])
  assert set(variables) == {"params", "batch_stats"}


def test_cnn_lstm_exact_param_count_with_registered_resnet_encoder():
  # Two stacked bidirectional LSTMs on ResNet-18 slice embeddings (512 wide at width 64).
  model = models.build_model("cnn_lstm", dict(
    num_classes=2, encoder="resnet18", encoder_kwargs=dict(small_input=True), hidden_size=32,
    num_lstm_layers=2, embed_dim=64))
  (_, aux), variables = _init_apply(model, jnp.ones((1, 3, 16, 12, 3)))
  resnet = jax.eval_shape(lambda x: ResNet18(num_classes=1, small_input=True).init(KEY, x, train=False),
                          jnp.ones((1, 16, 12, 3)))
  expected = (_num_params(resnet["params"])      # 11,176,512 + the unused 1-class head (513)
              + 512 * 64 + 64                    # embed
              + 2 * _lstm_params(64, 32) + 2 * _lstm_params(64, 32)  # layer 2 reads 2 * 32 = 64 features
              + 64 * 2 + 2)                      # head
  assert _num_params(variables["params"]) == expected
  chex.assert_shape(aux["slice_features"], (1, 3, 64))
  assert set(variables["params"]) == {"encoder", "embed", "lstm0_fwd", "lstm0_bwd", "lstm1_fwd", "lstm1_bwd",
                                      "head"}


def test_cnn_lstm_bf16_keeps_float32_params():
  model = CNNLSTM(num_classes=2, dtype=jnp.bfloat16, cell="lstm", **TINY)
  (logits, aux), variables = _init_apply(model, jnp.ones((2, 3, 8, 6, 1)))
  assert logits.dtype == jnp.float32 and aux["features"].dtype == jnp.float32
  assert aux["stages"][-1].dtype == jnp.bfloat16
  assert {p.dtype for p in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}


def test_padded_steps_do_not_change_valid_outputs():
  # Sequence 0 has 3 valid frames of 5; garbage in its padding must not reach the valid outputs, and they
  # must equal those of the unpadded 3-frame sequence (reverse LSTM starts at the last valid frame).
  model = CNNLSTM(num_classes=2, norm="group", pooling="last", **TINY)
  x = jax.random.normal(KEY, (2, 5, 8, 6, 1))
  variables = jax.jit(lambda x: model.init(KEY, x, train=False))(x)
  # The mask is turned into lengths inside; the train-step test passes lengths directly.
  fn = jax.jit(lambda x, mask: model.apply(variables, x, train=False, mask=mask))
  mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
  logits, aux = fn(x, mask)
  logits2, aux2 = fn(x.at[0, 3:].set(100.0), mask)
  np.testing.assert_allclose(logits, logits2, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(aux["sequence_features"], aux2["sequence_features"], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(aux["sequence_features"][0, 3:], 0.0)
  np.testing.assert_array_equal(aux["mask"], mask)
  short, aux_short = fn(x[:, :3], jnp.ones((2, 3), bool))
  np.testing.assert_allclose(logits[0], short[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(aux["sequence_features"][0, :3], aux_short["sequence_features"][0],
                             rtol=1e-5, atol=1e-5)


def test_cnn_lstm_train_step_gradients_are_finite():
  model = CNNLSTM(num_classes=3, per_step=True, dropout=0.1, **TINY)
  x = jax.random.normal(KEY, (2, 4, 8, 6, 1))
  variables = jax.jit(lambda x: model.init(KEY, x, train=False))(x)

  def loss(params):
    (logits, _), state = model.apply({**variables, "params": params}, x, train=True, lengths=jnp.array([4, 2]),
                                     mutable=["batch_stats"], rngs={"dropout": KEY})
    return jnp.mean(logits ** 2), (logits, state)

  (value, (logits, state)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
  assert np.isfinite(value) and all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  for name in ("encoder", "lstm0_fwd", "lstm0_bwd", "head"):
    assert any(np.abs(g).sum() > 0 for g in jax.tree.leaves(grads[name])), name
  np.testing.assert_array_equal(logits[1, 2:], 0.0)  # padded steps
  assert not np.allclose(state["batch_stats"]["encoder"]["stage1_conv0"]["norm"]["mean"],
                         variables["batch_stats"]["encoder"]["stage1_conv0"]["norm"]["mean"])


def test_cnn_lstm_errors():
  with pytest.raises(ValueError, match=r"CNNLSTM\(spatial_dims=3\) expects input \(B, T, y, x, C\)"):
    CNNLSTM(num_classes=2).init(KEY, jnp.ones((1, 8, 8, 1)), train=False)
  with pytest.raises(ValueError, match=r"CNNLSTM\(spatial_dims=4\) expects input \(B, T, z, y, x, C\)"):
    CNNLSTM(num_classes=2, spatial_dims=4).init(KEY, jnp.ones((1, 2, 8, 8, 1)), train=False)
  x = jnp.ones((2, 3, 8, 8, 1))
  with pytest.raises(ValueError, match=r"mask has shape \(2, 4\), expected \(B, T\) = \(2, 3\)"):
    _init_apply(CNNLSTM(num_classes=2, **TINY), x, mask=jnp.ones((2, 4), bool))
  with pytest.raises(ValueError, match="either lengths or mask"):
    _init_apply(CNNLSTM(num_classes=2, **TINY), x, mask=jnp.ones((2, 3), bool), lengths=jnp.ones(2))
  with pytest.raises(ValueError, match="pooling='max' must be 'mean' or 'last'"):
    _init_apply(CNNLSTM(num_classes=2, pooling="max", **TINY), x)
  with pytest.raises(KeyError, match="Did you mean 'resnet18'"):
    _init_apply(CNNLSTM(num_classes=2, encoder="resnet81"), x)
  with pytest.raises(ValueError, match=r"CNNLSTM.encoder_kwargs: unknown key 'depth' for model 'resnet18'"):
    _init_apply(CNNLSTM(num_classes=2, encoder="resnet18", encoder_kwargs=dict(depth=3)), x)
  with pytest.raises(ValueError, match="unknown key 'hidden' for model 'cnn_lstm'.*hidden_size"):
    models.build_model("cnn_lstm", dict(num_classes=2, hidden=3))
