"""Tests for medjax.models.fusion: every fusion type in 2D and 3D (shapes, dtypes, an absent modality's pixels never
reaching the logits, the present flag read as information), the late combinations and attention weights against
hand computations, gradients into every present encoder, record-only and image-only models, and the refusals."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax import models
from medjax.models import fusion as fusion_lib
from tests.models import zoo_testing as zt

# Three stages, not four: a fourth would shrink the 8x6 / 6x6x4 images to one voxel, where a group norm with one
# channel per group outputs its bias whatever the input (the encoder would see nothing).
ENCODER = dict(width=4, stage_sizes=(1, 1, 1), small_input=True, norm="group")
# Two modalities of different spatial shapes (not co-registered) for the intermediate and late types; "early"
# concatenates channels, so there both take the first shape.
SHAPES = {2: ((12, 10), (8, 6)), 3: ((8, 6, 6), (6, 6, 4))}
B = 3
PRESENT = {"t1": [1.0, 0.0, 1.0], "t2": [1.0, 1.0, 0.0]}  # case 0 has both, case 1 lacks t1, case 2 lacks t2


def _model(fusion, dims=2, modalities=("t1", "t2"), tabular=True, **kwargs):
  extra = dict(num_numeric=2, categorical_sizes=(3,)) if tabular else {}
  fields = dict(num_classes=3, spatial_dims=dims, modalities=modalities, fusion=fusion, encoder_kwargs=ENCODER,
                tabular_dim=8, hidden_size=8, num_heads=2, head_hidden=8, **extra)
  return models.build_model("fusion", {**fields, **kwargs})


def _batch(fusion, dims=2, seed=0, modalities=("t1", "t2")):
  rng = np.random.default_rng(seed)
  shapes = dict(zip(("t1", "t2"), (SHAPES[dims][0],) * 2 if fusion == "early" else SHAPES[dims]))
  channels = {"t1": 1, "t2": 2}
  images, present = {}, {}
  for m in modalities:
    flag = np.asarray(PRESENT[m], np.float32)
    image = rng.normal(size=(B, *shapes[m], channels[m])).astype(np.float32)
    images[m] = jnp.asarray(image * flag.reshape((B,) + (1,) * (dims + 1)))  # zeros where absent, as the pipeline
    present[m] = jnp.asarray(flag)
  tabular = {"numeric": jnp.asarray(rng.normal(size=(B, 2)), jnp.float32),
             "missing": jnp.asarray([[0, 1], [0, 0], [1, 0]], jnp.float32),
             "categorical": jnp.asarray([[1], [0], [2]], jnp.int32)}
  return {"images": images, "present": present, "tabular": tabular}


def _with(x, modality, case, image=None, flag=None):
  """A copy of `x` with case `case` of `modality` given a new image and / or present flag."""
  images, present = dict(x["images"]), dict(x["present"])
  if image is not None:
    images[modality] = images[modality].at[case].set(image)
  if flag is not None:
    present[modality] = present[modality].at[case].set(flag)
  return {**x, "images": images, "present": present}


def _apply(model, x):
  variables = zt.host_variables_for(model, x)
  fn = jax.jit(lambda x: model.apply(variables, x, train=False))
  return variables, fn


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("fusion", sorted(fusion_lib.FUSIONS))
def test_absent_pixels_never_reach_the_logits_and_the_flag_is_information(fusion, dims):
  model, x = _model(fusion, dims), _batch(fusion, dims)
  _, fn = _apply(model, x)
  logits, aux = fn(x)
  assert (logits.shape, logits.dtype) == ((B, 3), jnp.float32) and np.isfinite(logits).all()
  assert aux["features"].ndim == 2 and aux["features"].shape[0] == B and aux["features"].dtype == jnp.float32
  rng = np.random.default_rng(1)
  # The absent images (t1 of case 1, t2 of case 2) filled with large noise instead of zeros: bit-identical logits.
  noisy = x
  for m, case in (("t1", 1), ("t2", 2)):
    noisy = _with(noisy, m, case, image=100.0 * rng.normal(size=x["images"][m].shape[1:]).astype(np.float32))
  np.testing.assert_array_equal(np.asarray(fn(noisy)[0]), np.asarray(logits))
  # Not vacuous: a present image's pixels do change that case's logits (and only that case's).
  changed = np.asarray(fn(_with(x, "t1", 0, image=rng.normal(size=x["images"]["t1"].shape[1:])))[0])
  assert np.abs(changed[0] - logits[0]).max() > 1e-6
  np.testing.assert_array_equal(changed[1:], np.asarray(logits)[1:])
  # An all-zero image flagged present is data, not absence: case 1's logits change when its zero t1 is "present".
  flagged = np.asarray(fn(_with(x, "t1", 1, flag=1.0))[0])
  assert np.abs(flagged[1] - logits[1]).max() > 1e-6


@pytest.mark.parametrize("fusion", sorted(fusion_lib.FUSIONS))
def test_gradients_reach_every_present_encoder_and_the_record(fusion):
  model = _model(fusion)
  x = _batch(fusion)
  x = {**x, "present": {m: jnp.ones(B, jnp.float32) for m in x["present"]}}  # every modality present
  x["images"] = {m: jnp.asarray(np.random.default_rng(2).normal(size=v.shape), jnp.float32)
                 for m, v in x["images"].items()}
  variables = zt.host_variables_for(model, x)
  labels = jnp.array([0, 2, 1])

  def loss(params):
    logits, _ = model.apply({**variables, "params": params}, x, train=True)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))

  grads = jax.jit(jax.grad(loss))(variables["params"])
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  encoders = ["encoder"] if fusion == "early" else ["encoder_t1", "encoder_t2"]
  for name in encoders:  # the first convolution: the gradient crosses the whole encoder
    assert float(jnp.abs(grads[name]["stem_conv"]["kernel"]).max()) > 0, f"no gradient reaches {name}"
  record = grads["numeric_token_kernel"] if fusion == "cross_attention" else grads["tabular"]["hidden"]["kernel"]
  assert float(jnp.abs(record).max()) > 0


@pytest.mark.parametrize("fusion", fusion_lib.LATE)
def test_late_combination_is_the_present_sources_mean_or_renormalised_weights(fusion):
  model, x = _model(fusion), _batch(fusion)
  variables, fn = _apply(model, x)
  logits, aux = fn(x)
  source_logits = np.asarray(aux["source_logits"])
  assert source_logits.shape == (B, 3, 3)  # sources: t1, t2, tabular
  valid = np.array([[1, 1, 1], [0, 1, 1], [1, 0, 1]], bool)
  if fusion == "late_mean":
    expected = np.stack([source_logits[b][valid[b]].mean(axis=0) for b in range(B)])
  else:
    w = np.exp(np.asarray(variables["params"]["source_weights"], np.float64))
    expected = np.stack([(w[valid[b]] / w[valid[b]].sum()) @ source_logits[b][valid[b]] for b in range(B)])
  np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(aux["source_weights"])[~valid], 0.0)


def test_attention_weights_are_zero_on_absent_tokens_and_sum_to_one():
  model, x = _model("attention"), _batch("attention")
  _, aux = _apply(model, x)[1](x)
  weights = np.asarray(aux["attention"])  # tokens: t1, t2, tabular
  assert weights.shape == (B, 3)
  assert weights[1, 0] == 0.0 and weights[2, 1] == 0.0
  np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-6)


def test_masked_softmax_known_values_and_no_nan_when_nothing_is_present():
  scores = jnp.array([[0.0, np.log(3.0), 5.0], [1.0, 2.0, 3.0]])
  mask = jnp.array([[True, True, False], [False, False, False]])
  np.testing.assert_allclose(fusion_lib.masked_softmax(scores, mask), [[0.25, 0.75, 0.0], [0.0, 0.0, 0.0]],
                             rtol=1e-6)
  g = jax.grad(lambda s: fusion_lib.masked_softmax(s, mask)[0, 1])(scores)
  assert np.isfinite(g).all() and float(g[0, 2]) == 0.0


@pytest.mark.parametrize("fusion", ["concat", "attention", "cross_attention", "late_mean", "late_learned"])
def test_record_only_model(fusion):
  model = _model(fusion, modalities=())
  x = _batch(fusion, modalities=())
  _, fn = _apply(model, x)
  logits, _ = fn(x)
  assert logits.shape == (B, 3) and np.isfinite(logits).all()
  # A numeric value flagged missing (case 0, column 1) is not read.
  x2 = {**x, "tabular": {**x["tabular"], "numeric": x["tabular"]["numeric"].at[0, 1].set(50.0)}}
  np.testing.assert_array_equal(np.asarray(fn(x2)[0]), np.asarray(logits))


@pytest.mark.parametrize("fusion", ["early", "concat", "attention", "cross_attention", "late_mean"])
def test_image_only_model_ignores_a_record_it_does_not_declare(fusion):
  model = _model(fusion, modalities=("t1",), tabular=False)
  x = _batch(fusion, modalities=("t1",))
  variables = jax.eval_shape(lambda: model.init(zt.KEY, x, train=False))["params"]
  assert "tabular" not in variables and "encoder_t2" not in variables
  logits, aux = jax.eval_shape(lambda: model.apply(zt.host_variables_for(model, x), x, train=False))
  assert logits.shape == (B, 3) and aux["features"].shape[0] == B


@pytest.mark.parametrize("fusion", sorted(fusion_lib.FUSIONS))
def test_bfloat16_compute_gives_float32_outputs(fusion):
  model, x = _model(fusion, dtype=jnp.bfloat16), _batch(fusion)
  logits, aux = zt.init_shapes(model, x)[0]
  assert (logits.shape, logits.dtype, aux["features"].dtype) == ((B, 3), jnp.float32, jnp.float32)


def _raises(model, x, match):
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(lambda: model.init(zt.KEY, x, train=False))


def test_errors_name_the_problem():
  x = _batch("concat")
  _raises(_model("concatt"), x, r"Unknown fusion type 'concatt'\. Did you mean 'concat'\?")
  _raises(_model("early"), x, r"equal spatial shapes; got \{'t1': \(12, 10\), 't2': \(8, 6\)\}")
  _raises(_model("film", tabular=False), _batch("film"), r"fusion='film' .* needs tabular columns")
  _raises(_model("early", modalities=()), x, r"fusion='early' needs at least one image modality")
  _raises(_model("concat", modalities=(), tabular=False), x, "nothing to fuse")
  missing = {**x, "images": {"t1": x["images"]["t1"]}}
  _raises(_model("concat"), missing, r"x\['images'\] has no declared modality 't2'")
  _raises(_model("concat"), x["images"]["t1"], "multimodal batch")
  short = {**x, "tabular": {**x["tabular"], "numeric": x["tabular"]["numeric"][:, :1]}}
  _raises(_model("concat"), short, r"x\['tabular'\]\['numeric'\] must be \(B=3, 2\)")
  _raises(_model("cross_attention", num_heads=3), x, r"hidden_size divisible by num_heads .* hidden_size=8, num_heads=3")
  _raises(_model("concat", dims=3), x, r"image 't1' has shape \(3, 12, 10, 1\); spatial_dims=3")


def test_encoder_errors_name_the_encoder_and_key():
  x = _batch("concat")

  def model(encoder="resnet18", fusion="concat", **kwargs):
    return models.build_model("fusion", dict(num_classes=2, modalities=("t1", "t2"), fusion=fusion,
                                             encoder=encoder, encoder_kwargs=kwargs, num_numeric=2,
                                             categorical_sizes=(3,)))

  _raises(model(**{**ENCODER, "norm": "batch"}), x, r"norm='batch' .* 'group' or 'instance'")
  no_norm = {k: v for k, v in ENCODER.items() if k != "norm"}
  _raises(model(**no_norm), x, r"encoder 'resnet18' uses norm='batch' \(given or its default\)")
  _raises(model(**ENCODER, num_classes=4), x, r"\['num_classes'\] are set by the fusion model")
  _raises(model(**ENCODER, widht=4), x, r"unknown key 'widht' .* Did you mean 'width'\?")
  vit = dict(image_size=(12, 10), patch_size=2, hidden_size=8, num_layers=1, num_heads=2, mlp_dim=8)
  # Both modalities at 12x10 (the "early" batch), the ViT's image_size: a ViT has pooled features but no stages.
  _raises(model("vit_ti16", "film", **vit), _batch("early"), r"encoder 'vit_ti16' gives no aux\['stages'\]")
