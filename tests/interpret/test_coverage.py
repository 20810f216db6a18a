"""Every attribution method on every registered classification model, 2D and 3D, at tiny sizes.

Each method is traced end to end (`jax.eval_shape`: the capture of the default Grad-CAM layer, the batched paths of
SmoothGrad, integrated gradients and occlusion, the sown attention of rollout) for every registered name, which
checks that it is defined for the model and returns `(B, *spatial)` float32, without compiling ~500 programs on a
2-core CPU. One member of each family then runs Grad-CAM and integrated gradients for real (finite, non-zero maps);
the numbers of each method are checked against references in the method tests.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax import models
from medjax.interpret import methods
from tests.models import zoo_testing as zt

SEGMENTATION = {"unet", "attention_unet", "unetr", "swin_unetr", "transunet"}
ATTENTION = ("vit_", "vit_hybrid")
# Tiny settings by name prefix, the spatial ranks the model takes, and an input size per rank. Widths and the
# number of repeated blocks shrink where the family has a knob (so e.g. efficientnet_b0..b3 keep only their widths
# apart), since tracing cost grows with depth; the block types, strides and heads stay the registered ones.
_RESNET = dict(width=4, stage_sizes=(1, 1, 1, 1), small_input=True)
_FAMILIES = [
    ("resnet", _RESNET, {2: (16, 16), 3: (8, 8, 8)}),
    ("vgg", dict(width=4, head_features=(8, 8), pool_size=1, stage_sizes=(1, 1, 1, 1, 1)),
     {2: (32, 32), 3: (32, 32, 32)}),
    ("densenet", dict(growth_rate=4, init_features=8, bn_size=2, block_config=(2, 2), small_input=True),
     {2: (16, 16), 3: (8, 8, 8)}),
    ("googlenet", dict(), {2: (32, 32), 3: (32, 32, 32)}),
    ("efficientnet", dict(depth_mult=0.25), {2: (32, 32), 3: (32, 32, 32)}),
    ("mobilenet", dict(), {2: (32, 32), 3: (32, 32, 32)}),
    ("shufflenet", dict(stage_blocks=(1, 1, 1)), {2: (32, 32), 3: (32, 32, 32)}),
    ("vit_hybrid", dict(width=4, stage_sizes=(1, 1), small_input=True, hidden_size=16, num_layers=1, num_heads=2,
                        mlp_dim=16), {2: (16, 16), 3: (8, 8, 8)}),
    ("vit_", dict(patch_size=4, hidden_size=16, num_layers=1, num_heads=2, mlp_dim=16), {2: (8, 8), 3: (8, 8, 8)}),
    # spatial_dims counts the sequence axis: (B, T, y, x, C) sequences of 2D frames are spatial_dims=3.
    ("cnn_lstm", dict(features=(4, 8), hidden_size=6), {3: (3, 8, 8), 4: (3, 8, 8, 8)}),
    ("cnn_gnn", dict(features=(4, 8), graph_features=8, num_heads=2), {2: (8, 8), 3: (8, 8, 8)}),
]


def _family(name):
  for prefix, kwargs, sizes in _FAMILIES:
    if name.startswith(prefix):
      if name.endswith(("_acs", "_2.5d")):  # 2D kernels on volumes: 3D only
        sizes = {3: sizes[3]}
      return kwargs, sizes
  raise AssertionError(f"registered classification model {name!r} has no tiny settings in this test: add its family")


NOT_IMAGE_INPUT = {"fusion"}  # takes a multimodal dict (images, presence flags, a record), not one image array
CLASSIFIERS = sorted(n for n in models.MODELS.names() if n not in SEGMENTATION | NOT_IMAGE_INPUT)
CASES = [(name, dims) for name in CLASSIFIERS for dims in sorted(_family(name)[1])]


def _model_and_input(name, dims, batch=2):
  kwargs, sizes = _family(name)
  kwargs = dict(kwargs, num_classes=3, spatial_dims=dims)
  if name.startswith(ATTENTION):
    kwargs["image_size"] = sizes[dims][-dims:]
  return models.build_model(name, kwargs), (batch, *sizes[dims], 1)


def _options(name, shape):
  return {"integrated_gradients": dict(steps=2), "smoothgrad": dict(num_samples=2, rng=jax.random.key(0, impl="rbg")),
          "occlusion": dict(window=tuple(max(1, n // 2) for n in shape[1:-1]))}.get(name, {})


def test_every_classification_model_has_a_case():
  assert {name for name, _ in CASES} == set(CLASSIFIERS) and len(CLASSIFIERS) >= 30
  assert sum(1 for name in CLASSIFIERS if name.startswith(ATTENTION)) == 5


@pytest.mark.parametrize("name,dims", CASES)
def test_every_method_traces(name, dims):
  model, shape = _model_and_input(name, dims)
  images = jax.ShapeDtypeStruct(shape, jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(zt.KEY, x, train=False), images)
  target = jax.ShapeDtypeStruct((shape[0],), jnp.int32)
  for method in methods.METHODS:
    if methods.METHODS[method].attention_only and not name.startswith(ATTENTION):
      continue
    maps = jax.eval_shape(lambda v, x, t: methods.explain(method, model, v, x, t, **_options(method, shape)),
                          variables, images, target)
    assert (maps.shape, maps.dtype) == (shape[:-1], jnp.float32), (method, maps)


def test_rollout_refuses_a_cnn():
  model, shape = _model_and_input("resnet18", 2)
  images = jnp.ones(shape)
  with pytest.raises(ValueError, match="attention"):
    jax.eval_shape(lambda v: methods.explain("rollout", model, v, images, jnp.zeros(2, jnp.int32)),
                   jax.eval_shape(lambda x: model.init(zt.KEY, x, train=False), images))


# One member per family (the smallest variant), both ranks where the family has them.
_COMPUTED = [("resnet18", 2), ("resnet18_acs", 3), ("resnet50", 3), ("vgg11_bn", 2), ("densenet121", 3),
             ("vit_ti16", 2), ("vit_hybrid", 3), ("cnn_lstm", 3), ("cnn_gnn", 3), ("mobilenet_v3_small", 2),
             ("shufflenet_v2_x0_5", 3)]


@pytest.mark.parametrize("name,dims", _COMPUTED)
def test_gradcam_and_integrated_gradients_compute(name, dims):
  model, shape = _model_and_input(name, dims)
  images = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
  variables = zt.host_variables_for(model, images)
  target = jnp.array([0, 2], jnp.int32)
  for method in ("gradcam", "integrated_gradients"):
    maps = np.asarray(methods.explain(method, model, variables, images, target, **_options(method, shape)))
    assert maps.shape == shape[:-1] and np.isfinite(maps).all(), method
    assert np.abs(maps).max() > 0, f"{method} gives an all-zero map on {name}"
