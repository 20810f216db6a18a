"""`config.init_from` in training: from a workdir, a medjax-named file and a torchvision-layout file, with the
report saved in the workdir; frozen batch-norm statistics; gradual unfreezing; bit-exact resume."""

from __future__ import annotations

import json
import os

import chex
import jax
import numpy as np
import pytest

from medjax import build, checkpoint, config_lib, param_paths, train, transfer
from tests.train_testing import Preempted, preempt_after_save, run_straight_and_resumed, set_dotted

EXPERIMENT = os.path.join(os.path.dirname(__file__), "..", "experiments", "synthetic_resnet.py")


def _config(**overrides):
  """The synthetic ResNet-18 (batch norm, width 4) on 16 px phantoms, 4 steps."""
  config = config_lib.load_config(f"{EXPERIMENT}:quick=true")
  config.mesh = (("data", 1),)
  config.checkpoint.async_save = False
  return set_dotted(config, **overrides)


def _state(workdir, fields=("params", "model_state", "opt_state")):
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), save_interval_steps=1, max_to_keep=10,
                                 read_only=True)
  return ckpt.restore_fields(fields)


def _paths(tree):
  return {param_paths.path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """A 4-step run of the synthetic ResNet with 3 classes, the source of every test here."""
  workdir = str(tmp_path_factory.mktemp("pretrained"))
  train.main(_config(), workdir)
  return workdir


def test_from_a_workdir_with_a_new_head_and_the_report_in_the_workdir(pretrained, tmp_path):
  config = _config(total_steps=2)
  config.data.num_classes = 2  # another task: the head is new
  config.model.num_classes = 2
  config.init_from = dict(path=pretrained, step="latest", exclude=("head",))
  config.optim.train_only = ("head",)  # linear probing: every loaded weight must stay bit-identical
  config.freeze_batch_stats = True
  train.main(config, str(tmp_path))
  with open(tmp_path / checkpoint.INIT_REPORT_FILE) as f:
    report = json.load(f)
  assert report["source"] == f"workdir {pretrained} step 4 (latest)"
  assert report["counts"]["initialised"] == 2 and report["counts"]["skipped"] == 2 and report["counts"]["adapted"] == 0
  assert {r["path"] for r in report["initialised"]} == {"params/head/kernel", "params/head/bias"}
  source, final = _state(pretrained), _state(str(tmp_path))
  src_params, params = _paths(source["params"]), _paths(final["params"])
  assert set(src_params) == set(params) and len(report["loaded"]) == len(src_params) - 2 + len(
      _paths(source["model_state"]))
  for path, value in params.items():
    if path.startswith("head/"):
      assert value.shape[-1] == 2 and not np.array_equal(value, src_params[path][..., :2])
    else:
      np.testing.assert_array_equal(value, src_params[path])  # loaded, then frozen: bit-identical
  # freeze_batch_stats: the running statistics are the loaded ones after 2 training steps.
  chex.assert_trees_all_equal(final["model_state"], source["model_state"])


def test_batch_stats_move_without_freezing(pretrained, tmp_path):
  config = _config(total_steps=2)
  config.init_from = pretrained
  train.main(config, str(tmp_path))
  source, final = _state(pretrained), _state(str(tmp_path))
  moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(source["model_state"]),
                                                       jax.tree.leaves(final["model_state"]))]
  assert all(moved)


def test_frozen_batch_stats_train_like_eval_mode_norms():
  config = _config()
  model = build.model(config)
  x = np.random.default_rng(0).normal(size=(4, 16, 16, 1)).astype(np.float32)
  variables = model.init(jax.random.key(0), x, train=False)
  (eval_logits, _) = model.apply(variables, x, train=False)
  apply = build.train_apply_fn(model, freeze_batch_stats=True)
  (logits, _), new_state = apply(variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(0)})
  np.testing.assert_allclose(logits, eval_logits, rtol=1e-6, atol=1e-6)
  chex.assert_trees_all_equal(new_state["batch_stats"], variables["batch_stats"])
  (logits, _), _ = build.train_apply_fn(model)(variables, x, train=True, mutable=["batch_stats"])
  assert not np.allclose(logits, eval_logits, atol=1e-3)  # batch statistics, not running ones


def test_from_files_medjax_names_and_torchvision_layout(pretrained, tmp_path):
  loaded = checkpoint.load(pretrained)
  variables = jax.device_get(loaded.variables)
  flat = {"/".join(k): v for k, v in transfer.flatten(variables).items()}
  transfer.save_state_dict(tmp_path / "medjax.safetensors", flat)
  transfer.save_state_dict(tmp_path / "torch.npz", transfer.to_torch(variables, "resnet18"))
  for name, source in (("medjax.safetensors", "medjax names"), ("torch.npz", "torchvision resnet18")):
    config = _config(total_steps=1)
    config.init_from = dict(path=str(tmp_path / name))
    config.optim.freeze = ("*",)  # nothing trains: the run's state must be the file's
    config.freeze_batch_stats = True
    workdir = str(tmp_path / name.split(".")[0])
    train.main(config, workdir)
    report = json.load(open(os.path.join(workdir, checkpoint.INIT_REPORT_FILE)))
    assert report["source"] == f"file {tmp_path / name} ({source})"
    assert report["counts"] == {"loaded": len(flat), "adapted": 0, "initialised": 0, "skipped": 0}
    final = _state(workdir)
    chex.assert_trees_all_equal(final["params"], variables["params"])
    chex.assert_trees_all_equal(final["model_state"]["batch_stats"], variables["batch_stats"])


def test_unfreezing_and_init_from_resume_bit_exact(pretrained, tmp_path, monkeypatch):
  config = _config(total_steps=6, checkpoint_every_steps=3, eval_every_steps=3)
  config.init_from = dict(path=pretrained, step=2)
  config.optim.unfreeze = (("head", 0), ("stage4_*", 2), ("*", 4))
  straight, resumed = map(_state, run_straight_and_resumed(config, tmp_path, monkeypatch, at_step=3))
  chex.assert_trees_all_equal(resumed, straight)  # bitwise: params, batch stats, optimizer state


def test_unfreeze_schedule_zero_before_fresh_adam_after():
  from medjax import optim
  config = _config(total_steps=10, lr=0.1)
  config.optim = dict(name="adamw", wd=0.5, unfreeze=(("a", 3),))
  config.schedule = dict(decay="cosine", warmup_steps=2)
  config.grad_clip_norm = None
  tx, schedule = optim.make_optimizer(config)
  params = {"a": {"kernel": np.ones((2, 2), np.float32)}, "b": {"kernel": np.ones((2, 2), np.float32)}}
  state = tx.init(params)
  grads = jax.tree.map(np.ones_like, params)
  for step in range(5):
    updates, state = jax.jit(tx.update)(grads, state, params)
    a, b = float(updates["a"]["kernel"][0, 0]), float(updates["b"]["kernel"][0, 0])
    if step < 3:
      assert (a == 0.0 and b != 0.0) or step == 0  # step 0: lr(0) = 0 in the warmup
    else:
      # Adam's first update after a fresh start is lr * (1 + wd) * sign: bias correction counts from step 3.
      np.testing.assert_allclose(a, -float(schedule(step)) * (1 + 0.5) if step == 3 else a, rtol=1e-5)
  with pytest.raises(ValueError, match=r"config\.optim\.unfreeze: pattern 'c' matches no parameter"):
    config.optim.unfreeze = (("c", 3),)
    tx, _ = optim.make_optimizer(config)
    tx.init(params)


@pytest.mark.parametrize("init_from, pattern", [
    (__file__, r"config\.init_from\.path: '.*test_init_from\.py' is neither a workdir nor a weight file"),
    (dict(path=".", stepp=3), r"config\.init_from: unknown key\(s\) \['stepp'\]; known keys: path, step"),
    (dict(path=".", inflate="mean"), r"config\.init_from\.inflate must be None or one of \('average', 'center'\)"),
    (dict(path=".", source="keras"), r"config\.init_from\.source must be one of"),
])
def test_bad_init_from_fails_validation_naming_the_key(init_from, pattern):
  config = _config()
  config.init_from = init_from
  with pytest.raises(config_lib.ConfigError, match=pattern):
    build.validate(config)


def test_wrong_architecture_names_the_source_and_every_mismatch(tmp_path):
  unet = {"params/enc0/conv/kernel": np.zeros((3, 3, 1, 8), np.float32)}
  transfer.save_state_dict(tmp_path / "unet.safetensors", unet)
  config = _config(total_steps=1)
  config.init_from = str(tmp_path / "unet.safetensors")
  with pytest.raises(transfer.WeightMismatchError) as info:
    train.main(config, str(tmp_path / "run"))
  message = str(info.value)
  assert message.startswith(f"the pretrained variables of file {tmp_path / 'unet.safetensors'} (medjax names) do "
                            "not fit the model: ")
  assert "\n  params/stem_conv/kernel (" in message and "not in the model (1): params/enc0/conv/kernel" in message
  assert not os.path.exists(tmp_path / "run" / "checkpoints" / "0")  # nothing was saved


def test_init_file_is_needed_at_the_start_only(pretrained, tmp_path, monkeypatch):
  weights = tmp_path / "w.safetensors"
  variables = jax.device_get(checkpoint.load(pretrained).variables)
  transfer.save_state_dict(weights, {"/".join(k): v for k, v in transfer.flatten(variables).items()})
  config = _config(total_steps=2, checkpoint_every_steps=1, eval_every_steps=2)
  config.init_from = str(weights)
  config.freeze_batch_stats = True
  original_save = preempt_after_save(monkeypatch, at_step=1)
  with pytest.raises(Preempted):
    train.main(config, str(tmp_path / "run"))
  monkeypatch.setattr(checkpoint.Checkpointer, "save", original_save)
  os.remove(weights)  # a resumed run restores its own checkpoint and never reads init_from again
  assert train.main(config, str(tmp_path / "run"))["step"] == 2
  final = _state(str(tmp_path / "run"))
  chex.assert_trees_all_equal(final["model_state"]["batch_stats"], variables["batch_stats"])  # frozen statistics
  with pytest.raises(FileNotFoundError, match=r"config\.init_from\.path: '.*w\.safetensors' does not exist"):
    train.main(config, str(tmp_path / "new_run"))
