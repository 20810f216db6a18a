"""Methods by name (medjax.interpret.methods): names and aliases, input-scaled defaults, and sharding over a mesh
(equal to the single-device maps)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from medjax import models
from medjax.interpret import gradcam, methods
from tests.models import zoo_testing as zt


def test_names_aliases_and_unknown():
  assert methods.resolve("ig") == "integrated_gradients" and methods.resolve("grad_cam") == "gradcam"
  with pytest.raises(ValueError, match="unknown attribution method 'gradcma'; choose from gradcam"):
    methods.resolve("gradcma")


@pytest.mark.parametrize("spatial,window,stride", [((28, 28), (4, 4), (2, 2)), ((224, 224), (32, 32), (16, 16)),
                                                   ((64, 64, 64), (9, 9, 9), (4, 4, 4)), ((3, 40), (2, 6), (1, 3))])
def test_occlusion_default_scales_with_the_input(spatial, window, stride):
  assert methods.occlusion_window(spatial) == (window, stride)
  assert methods.default_options("occlusion", spatial) == {"window": window, "stride": stride}


@pytest.fixture(scope="module")
def tiny_resnet():
  model = models.build_model("resnet18", dict(num_classes=3, width=4, stage_sizes=(1, 1, 1, 1), small_input=True))
  images = jnp.asarray(np.random.default_rng(0).normal(size=(4, 12, 12, 1)), jnp.float32)
  return model, zt.host_variables_for(model, images), images


@pytest.mark.parametrize("name", ["gradcam", "occlusion"])
def test_sharded_maps_equal_single_device(tiny_resnet, name):
  model, variables, images = tiny_resnet
  target = jnp.array([0, 1, 2, 0])
  mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
  single = methods.explain(name, model, variables, images, target)
  sharded = methods.explain(name, model, variables, images, target, mesh=mesh)
  assert len(sharded.sharding.device_set) == 2
  np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), rtol=1e-5, atol=1e-6)
  if name == "gradcam":
    np.testing.assert_array_equal(np.asarray(single), np.asarray(gradcam.grad_cam(model, variables, images, target)))


def test_mesh_errors(tiny_resnet):
  model, variables, images = tiny_resnet
  with pytest.raises(ValueError, match="batch of 3 is not a multiple of the mesh's 'data' axis \\(2 devices\\)"):
    methods.explain("saliency", model, variables, images[:3], jnp.zeros(3, jnp.int32),
                    mesh=Mesh(np.array(jax.devices()[:2]), ("data",)))
  with pytest.raises(ValueError, match="lack 'data'"):
    methods.explain("saliency", model, variables, images, jnp.zeros(4, jnp.int32),
                    mesh=Mesh(np.array(jax.devices()[:2]), ("model",)))
