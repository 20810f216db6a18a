"""Pretext tasks end to end: every task traces in 2D and 3D, the random views are a function of (seed, step), a
pretraining run resumes bit for bit (momentum target included), its encoder loads downstream through
`init_from`, a contrastive step is the same on 1 and 8 devices, and bad configs fail naming the key."""

import functools
import json
import re
import os

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from medjax import build, checkpoint, config_lib, models, pretext, steps, train
from medjax.config_lib import ConfigError
from medjax.pretext import masking, tasks
from medjax.tools import cli
from medjax.train_state import TrainState
from tests.train_testing import run_straight_and_resumed

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
KEY = jax.random.PRNGKey(0)
RESNET = dict(num_classes=3, small_input=True, width=4, stage_sizes=(1, 1))


def _encoder(name, dims, **kwargs):
  base = {"resnet18": RESNET,
          "unet": dict(num_classes=2, features=(4, 8)),
          "vit_ti16": dict(num_classes=2, image_size=(8,) * dims, patch_size=4, num_layers=1, hidden_size=8,
                           num_heads=2, mlp_dim=16),
          "unetr": dict(num_classes=2, image_size=(8,) * dims, patch_size=4, hidden_size=8, num_layers=3,
                        num_heads=2, mlp_dim=16, feature_size=4, skip_layers=(1,)),
          "swin_unetr": dict(num_classes=2, feature_size=6, depths=(1, 1), num_heads=(1, 1),
                             window_size=2)}[name]
  return models.build_model(name, dict(base, spatial_dims=dims, **kwargs))


class NoAux(nn.Module):
  """An encoder that exposes nothing a pretext head could use."""

  @nn.compact
  def __call__(self, x, *, train):
    return nn.Dense(2)(x), {}


CASES = [  # (task options, encoder name)
    (dict(name="simclr", projection_dim=8, hidden_dim=16), "resnet18"),
    (dict(name="byol", projection_dim=8, hidden_dim=16, predictor_dim=8), "resnet18"),
    (dict(name="moco", projection_dim=8, hidden_dim=16, predictor_dim=8), "resnet18"),
    (dict(name="rotation"), "resnet18"),
    (dict(name="rotation"), "unetr"),
    (dict(name="byol", projection_dim=8, hidden_dim=16), "unet"),
    (dict(name="genesis"), "unet"),
    (dict(name="mae", patch_size=4), "unet"),
    (dict(name="mae", patch_size=4), "vit_ti16"),
    (dict(name="mae", patch_size=4), "unetr"),
    (dict(name="mae", patch_size=4), "swin_unetr"),
]


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("options,encoder", CASES, ids=lambda c: c["name"] if isinstance(c, dict) else c)
def test_every_task_traces_in_2d_and_3d(options, encoder, dims):
  """Shapes of outputs, aux and loss for every task and encoder family (`jax.eval_shape`: nothing compiles)."""
  model = tasks.wrap(options, _encoder(encoder, dims))
  x = jax.ShapeDtypeStruct((2,) + (8,) * dims + (1,), jnp.float32)
  variables = jax.eval_shape(lambda v: model.init({"params": KEY, "dropout": KEY}, v, train=False), x)
  assert pretext.ENCODER in variables["params"]
  mutable = [c for c in variables if c != "params"]

  def forward(v, images):
    (outputs, aux), _ = model.apply(v, images, train=True, rngs={"dropout": KEY}, mutable=mutable)
    return outputs, aux, tasks.objective(options)(outputs, aux, {"image": images})

  outputs, aux, loss = jax.eval_shape(forward, variables, x)
  assert loss.shape == (2,) and loss.dtype == jnp.float32
  name = options["name"]
  if name in ("simclr", "byol", "moco"):
    assert outputs.shape == (2, 2, 8)
    assert ("targets" in aux) == (name != "simclr")
    assert (pretext.models.MOMENTUM in variables) == (name != "simclr")
  elif name == "rotation":
    assert outputs.shape == (2, 4 if dims == 2 else 10)
  elif name == "genesis":
    assert outputs.shape == x.shape
  else:
    assert outputs.shape == aux["target"].shape == (2, 2 ** dims, 4 ** dims) and aux["mask"].shape == (2, 2 ** dims)


@functools.partial(jax.jit, static_argnames=("model", "train"))
def _apply(model, variables, images, key, train=True):
  mutable = [c for c in variables if c != "params"]
  (outputs, aux), _ = model.apply(variables, images, train=train, rngs={"dropout": key}, mutable=mutable)
  return outputs, aux


@pytest.mark.parametrize("options,encoder", [CASES[0], CASES[3], CASES[6], CASES[7]],
                         ids=["simclr", "rotation", "genesis", "mae"])
def test_views_are_a_function_of_the_key(options, encoder):
  """The same key draws the same views (so the step's key fold_in(rng, step) makes them a function of seed and
  step); another key draws others; evaluation always uses the same ones."""
  model = tasks.wrap(options, _encoder(encoder, 2))
  images = jax.random.normal(KEY, (4, 8, 8, 1))
  variables = model.init({"params": KEY, "dropout": KEY}, images, train=False)
  seen = {"simclr": lambda o, a: a["features"], "rotation": lambda o, a: a["rotation"],
          "genesis": lambda o, a: a["corrupted"], "mae": lambda o, a: a["mask"]}[options["name"]]
  first = seen(*_apply(model, variables, images, jax.random.PRNGKey(1)))
  again = seen(*_apply(model, variables, images, jax.random.PRNGKey(1)))
  other = seen(*_apply(model, variables, images, jax.random.PRNGKey(2)))
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, other)
  eval1 = seen(*_apply(model, variables, images, jax.random.PRNGKey(1), train=False))
  eval2 = seen(*_apply(model, variables, images, jax.random.PRNGKey(2), train=False))
  np.testing.assert_array_equal(eval1, eval2)


def test_mae_masks_the_exact_ratio_and_its_loss_ignores_visible_patches():
  options = dict(name="mae", patch_size=2, mask_ratio=0.75)
  model = tasks.wrap(options, _encoder("unet", 2))
  images = jax.random.normal(KEY, (3, 8, 12, 1))
  variables = model.init({"params": KEY, "dropout": KEY}, images, train=False)
  outputs, aux = _apply(model, variables, images, jax.random.PRNGKey(3))
  np.testing.assert_array_equal(np.sum(aux["mask"], axis=1), [18, 18, 18])  # 0.75 of 24 patches, each image
  masked_voxels = masking.mask_to_voxels(aux["mask"], (4, 6), 2)[..., 0] > 0
  np.testing.assert_array_equal(np.asarray(aux["masked_image"])[~masked_voxels], np.asarray(images)[~masked_voxels])
  objective = tasks.objective(options)
  loss = objective(outputs, aux, {"image": images})
  changed = jnp.where(aux["mask"][..., None], outputs, outputs + 100.0)  # visible patches' predictions only
  np.testing.assert_array_equal(objective(changed, aux, {"image": images}), loss)
  assert not np.array_equal(objective(outputs + 1.0, aux, {"image": images}), loss)


def test_momentum_target_moves_towards_the_online_network():
  model = tasks.wrap(dict(name="byol", projection_dim=8, hidden_dim=16, predictor_dim=8, momentum=0.9),
                     _encoder("resnet18", 2))
  images = jax.random.normal(KEY, (4, 8, 8, 1))
  variables = model.init({"params": KEY, "dropout": KEY}, images, train=False)
  online = jax.tree.map(lambda x: x + 1.0, variables["params"])  # the online network has moved on
  variables = {**variables, "params": online}
  _, updated = model.apply(variables, images, train=True, rngs={"dropout": KEY},
                           mutable=["batch_stats", "momentum"])
  before, after = variables["momentum"]["params"], updated["momentum"]["params"]
  expected = jax.tree.map(lambda t, o: t + 0.1 * (o - t), before,
                          {"encoder": online["encoder"], "projector": online["projector"]})
  chex.assert_trees_all_close(after, expected, rtol=1e-6, atol=1e-6)
  assert set(before) == {"encoder", "projector"}
  _, evaluated = model.apply(variables, images, train=False, mutable=["momentum"])
  chex.assert_trees_all_equal(evaluated["momentum"], variables["momentum"])  # evaluation leaves it alone


def test_contrastive_step_is_the_same_on_1_and_8_devices():
  """NT-Xent's negatives come from the whole global batch, and batch norm sees all of it: one update on 8
  devices equals the update on 1."""
  options = dict(name="simclr", projection_dim=8, hidden_dim=16)
  model = tasks.wrap(options, _encoder("resnet18", 2))
  images = jax.random.normal(KEY, (8, 8, 8, 1))
  tx = optax.sgd(0.1)
  variables = model.init({"params": KEY, "dropout": KEY}, images[:1], train=False)
  state = TrainState.create(variables=variables, tx=tx, rng=KEY, use_ema=False)
  step = functools.partial(steps.train_step, apply_fn=model.apply, objective=tasks.objective(options), tx=tx)
  results = []
  for n in (1, 8):
    mesh = Mesh(np.array(jax.devices()[:n]), ("data",))
    batch = {"image": jax.device_put(images, NamedSharding(mesh, P("data")))}
    replicated = jax.device_put(state, NamedSharding(mesh, P()))
    new_state, metrics = jax.jit(step)(replicated, batch)
    results.append((jax.device_get(new_state.params), float(metrics["loss"])))
  assert results[0][1] == pytest.approx(results[1][1], rel=1e-6)
  chex.assert_trees_all_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)


def _pretext_config(**pretext_options):
  config = config_lib.load_config(os.path.join(ROOT, "experiments", "synthetic_resnet.py:quick=true"))
  config.mesh = (("data", 1),)
  del config.loss, config.evaluator
  config.model.stage_sizes = (1, 1)
  config.pretext = dict(projection_dim=8, hidden_dim=16, **pretext_options)
  config.best_metric, config.best_mode = "val/pretext_loss", "min"
  return config


@pytest.fixture(scope="module")
def byol_runs(tmp_path_factory):
  monkeypatch = pytest.MonkeyPatch()
  try:
    yield run_straight_and_resumed(_pretext_config(name="byol", predictor_dim=8), tmp_path_factory.mktemp("byol"),
                                   monkeypatch, at_step=2)
  finally:
    monkeypatch.undo()


def test_a_pretraining_run_resumes_bit_exact(byol_runs):
  straight, resumed = (checkpoint.load(w, "latest", use_ema=False) for w in byol_runs)
  assert straight.step == resumed.step == 4
  chex.assert_trees_all_equal(straight.variables, resumed.variables)  # params, batch stats, momentum target
  assert "momentum" in straight.variables
  with open(os.path.join(byol_runs[0], "results.json")) as f:
    assert json.load(f)["final"]["val/pretext_loss"] > 0


def test_init_from_a_pretraining_run_loads_its_encoder(byol_runs, tmp_path):
  config = config_lib.load_config(os.path.join(ROOT, "experiments", "synthetic_resnet.py:quick=true"))
  config.mesh, config.total_steps = (("data", 1),), 1
  config.model.stage_sizes = (1, 1)
  config.init_from = dict(path=byol_runs[0], step="latest", exclude=("head",))
  config.optim.train_only = ("head",)  # the encoder stays as loaded
  config.freeze_batch_stats = True
  train.main(config, str(tmp_path))
  with open(os.path.join(tmp_path, checkpoint.INIT_REPORT_FILE)) as f:
    report = json.load(f)
  assert "byol pretraining" in report["source"]
  assert not any("projector" in name or "predictor" in name for name in report["loaded"])
  assert "params/stem_conv/kernel" in report["loaded"]
  source = checkpoint.load(byol_runs[0], "latest", use_ema=False).variables
  loaded = checkpoint.load(str(tmp_path), "latest", use_ema=False).variables
  encoder = pretext.encoder_variables(source)
  chex.assert_trees_all_equal({k: v for k, v in loaded["params"].items() if k != "head"},
                              {k: v for k, v in encoder["params"].items() if k != "head"})
  chex.assert_trees_all_equal(loaded["batch_stats"], encoder["batch_stats"])


@pytest.mark.parametrize("change,message", [
    (dict(pretext=dict(name="simclar")), "Did you mean 'simclr'"),
    (dict(pretext=dict(name="simclr", temprature=0.1)), "config.pretext.temprature"),
    (dict(pretext=dict(name="rotation", mask_ratio=0.5)), "Known keys: none"),
    (dict(pretext=dict(name="simclr", views=dict(flipp=True))), "config.pretext.views"),
    (dict(pretext=dict(name="genesis", loss="l3")), "config.pretext.loss must be one of ('mse', 'l1')"),
    (dict(pretext="simclr", loss="xent"), "config.loss and config.pretext are exclusive"),
])
def test_bad_pretext_configs_name_the_key(change, message):
  config = config_lib.load_config(os.path.join(ROOT, "experiments", "synthetic_resnet.py:quick=true"))
  del config.loss, config.evaluator
  for key, value in change.items():
    config[key] = value
  with pytest.raises(ConfigError, match=re.escape(message)):
    build.validate(config)


@pytest.mark.parametrize("options,encoder,message", [
    (dict(name="genesis"), "resnet18", "needs a dense aux\\['features'\\]"),
    (dict(name="simclr"), "no_aux", "needs pooled aux\\['features'\\] \\(B, F\\) or an aux\\['bottleneck'\\]"),
    (dict(name="mae", patch_size=2), "vit_ti16", "Use the encoder's patch size"),
])
def test_an_encoder_that_does_not_fit_the_task_is_named(options, encoder, message):
  model = tasks.wrap(options, NoAux() if encoder == "no_aux" else _encoder(encoder, 2))
  with pytest.raises(ValueError, match=message):
    jax.eval_shape(lambda x: model.init({"params": KEY, "dropout": KEY}, x, train=False),
                   jax.ShapeDtypeStruct((2, 8, 8, 1), jnp.float32))


@pytest.mark.parametrize("tool", ["evaluate", "explain", "predict"])
def test_tools_that_need_predictions_refuse_a_pretraining_run(byol_runs, tool, tmp_path):
  from medjax.tools import evaluate, explain, predict
  call = {"evaluate": lambda: evaluate.run(byol_runs[0], split="val", out=str(tmp_path)),
          "explain": lambda: explain.run(byol_runs[0], split="val", method="gradcam", num_cases=1, out=str(tmp_path)),
          "predict": lambda: predict.run_prediction(byol_runs[0], str(tmp_path), str(tmp_path / "out"))}[tool]
  with pytest.raises(cli.UsageError, match=f"self-supervised pretraining run \\(config.pretext: byol\\); {tool}"):
    call()


def test_convert_weights_exports_the_encoder_of_a_pretraining_run(byol_runs, tmp_path):
  from medjax import transfer
  from medjax.tools import convert_weights
  out = str(tmp_path / "encoder.safetensors")
  convert_weights.convert(byol_runs[0], out, "resnet18", {}, "torchvision", "medjax", step="latest")
  names = set(transfer.load_state_dict(out))
  assert "params/stem_conv/kernel" in names and "batch_stats/stem_norm/mean" in names
  assert not any("projector" in n or "momentum" in n or n.startswith("params/encoder/") for n in names)
