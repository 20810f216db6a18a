"""medjax.build: settings and their defaults (each stated once), parts, validation, and the model that
checkpoint.load, evaluate and predict build through it."""

import os
import pathlib
import re

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest

from medjax import build, checkpoint, config_lib, provenance, train

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "medjax"


def _demo(arg="quick"):
  return config_lib.load_config(str(ROOT / "experiments" / f"synthetic_unet.py:{arg}"))


EXPERIMENTS = sorted(p for p in (ROOT / "experiments").glob("*.py") if not p.name.startswith(("_", "common")))


def _package_sources():
  return {str(p.relative_to(ROOT)): p.read_text() for p in PACKAGE.rglob("*.py")}


def _fallback(key):
  return rf"""get\(\s*["']{key}["']\s*,"""


def _field(key):
  return rf"""(?m)^\s+{key}\s*:[^=\n]*=\s*\S"""


# Each default, and the patterns of every way of stating it: a dataclass field `key: type = value` (build.Settings,
# the one place), a fallback `config.get("key", value)`, a keyword default, or the literal itself.
_DEFAULTS = {
    "best_mode": [_field("best_mode"), _fallback("best_mode"), r"""best_mode\s*(?::[^=,)]*)?=\s*["']max["']"""],
    "mesh": [r"""\(\s*\(\s*["']data["']\s*,\s*-1\s*\)\s*,\s*\)""", _fallback("mesh")],
    "eval_batch_size": [_field("eval_batch_size"), _fallback("eval_batch_size")],
    "compute_dtype": [_field("compute_dtype"), _fallback("compute_dtype")],
    **{key: [_field(key), _fallback(key)] for key in (
        "sharding", "loss", "ema_decay", "eval_with_ema", "grad_accum_steps", "log_every_steps", "eval_split")},
}


@pytest.mark.parametrize("name", sorted(_DEFAULTS))
def test_each_default_is_stated_once(name):
  lines = {}  # "path:line" -> the text found there (patterns may overlap on one line)
  for path, text in _package_sources().items():
    for pattern in _DEFAULTS[name]:
      for m in re.finditer(pattern, text):
        lines[f"{path}:{text[:m.start() + len(m.group(0)) - len(m.group(0).lstrip())].count(chr(10)) + 1}"] = m.group(0)
  assert len(lines) == 1 and next(iter(lines)).startswith("medjax/build/run_settings.py:"), lines


def test_the_default_check_finds_a_second_statement(tmp_path):
  """The grep above is not vacuous: a fallback written anywhere else is found."""
  text = 'x = config.get("best_mode", "max")\nm = (("data", -1),)\ndef f(best_mode: str = "max"): ...\n'
  assert [len(re.findall(p, text)) for p in _DEFAULTS["best_mode"]] == [0, 1, 1]
  assert re.search(_DEFAULTS["mesh"][0], text)


def test_settings_defaults_and_overrides():
  config = _demo()
  run = build.settings(config)
  assert run.mesh == build.DEFAULT_MESH == (("data", -1),)
  assert run.best_mode == "max" and run.eval_batch_size == run.batch_size == config.input.batch_size
  config.input.eval_batch_size, config.best_mode, config.mesh = 3, "min", [["data", 2]]
  run = build.settings(config)
  assert (run.eval_batch_size, run.best_mode, run.mesh) == (3, "min", (("data", 2),))
  config.checkpoint = dict(max_to_keep=3, kep_best=2)
  with pytest.raises(config_lib.ConfigError, match=r"config\.checkpoint: unknown key\(s\) \['kep_best'\]"):
    build.settings(config)


def test_validate_traces_the_model_on_the_patch():
  config = _demo()
  build.validate(config)
  config.input.patch_size = (16, 16)  # a 2D patch for the 3D U-Net
  with pytest.raises(config_lib.ConfigError, match=r"config\.model \(unet\) does not accept config\.input\.patch_size"):
    build.validate(config)


def test_validate_names_the_key():
  config = _demo()
  config.checkpoint = dict(keep_bset=1)
  with pytest.raises(config_lib.ConfigError, match="config.checkpoint"):
    build.validate(config)
  config = _demo()
  config.compute_dtype = "float16"
  with pytest.raises(config_lib.ConfigError, match="config.compute_dtype must be one of"):
    build.validate(config)


def _saved_run(workdir, compute_dtype):
  """A workdir holding a 2D U-Net's initial weights as a run with `compute_dtype` would have saved them."""
  config = mlc.ConfigDict(dict(model_name="unet", compute_dtype=compute_dtype, seed=0,
                               model=dict(spatial_dims=2, num_classes=2, features=(2, 4)),
                               input=dict(batch_size=2), data=dict(name="synthetic_phantoms", spatial_dims=2)))
  params = build.model(config).init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), train=False)["params"]
  checkpoint.save_config(workdir, config)
  with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), save_interval_steps=1, max_to_keep=1,
                               async_save=False) as ckpt:
    ckpt.save(1, {"params": params}, force=True)
  return config


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_checkpoint_load_computes_in_the_runs_dtype(tmp_path, dtype):
  _saved_run(str(tmp_path), dtype)
  loaded = checkpoint.load(str(tmp_path))
  logits, _ = loaded.model.apply(loaded.variables, jnp.ones((1, 8, 8, 1)), train=False)
  assert loaded.model.dtype == jnp.dtype(dtype)
  # The U-Net returns float32 logits; computed in bfloat16 they carry bfloat16's 8-bit mantissa.
  as_bf16 = np.asarray(logits.astype(jnp.bfloat16).astype(jnp.float32))
  assert np.array_equal(np.asarray(logits), as_bf16) == (dtype == "bfloat16")
  assert jax.tree.leaves(loaded.variables)[0].dtype == jnp.float32  # parameters stay float32
  assert (loaded.step, loaded.selected) == (1, "latest")
  assert loaded.metrics == {}  # saved without metrics


def test_load_evaluate_and_predict_build_the_model_through_build(tmp_path, monkeypatch):
  """`checkpoint.load` is the one place a saved run's model is made, and it calls `build.model`."""
  _saved_run(str(tmp_path), "bfloat16")
  calls = []
  original = build.model
  monkeypatch.setattr(build, "model", lambda config: calls.append(config.model_name) or original(config))
  checkpoint.load(str(tmp_path))
  assert calls == ["unet"]
  sources = _package_sources()
  for tool in ("medjax/tools/evaluate.py", "medjax/tools/predict.py"):
    assert "checkpoint.load(" in sources[tool], tool
    assert not re.search(r"build\.model\(|build_model\(", sources[tool].split("def benchmark(")[0]), tool


def test_select_step(tmp_path):
  config = _saved_run(str(tmp_path), "float32")
  with checkpoint.for_run(str(tmp_path), config, read_only=True) as ckpt:
    assert ckpt.select_step("best") == (1, "latest (no best)")
    assert ckpt.select_step("1") == (1, "requested")
    with pytest.raises(FileNotFoundError, match=r"No checkpoint for step 7 .*available steps: \[1\]"):
      ckpt.select_step(7)
    with pytest.raises(ValueError, match="'best', 'latest' or a step number"):
      ckpt.select_step("newest")


def test_env_json_is_written_by_training_and_kept_across_sessions(tmp_path):
  config = _demo("dims=2,quick")
  config.total_steps, config.mesh = 2, (("data", 1),)
  workdir = str(tmp_path / "run")
  train.main(config, workdir)
  env = provenance.read(workdir)
  assert env["versions"]["jax"] == jax.__version__ and env["versions"]["flax"]
  assert set(env["versions"]) == {"jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"}
  assert env["device_count"] == jax.device_count() and env["process_count"] == 1
  assert env["device_kind"] == jax.devices()[0].device_kind and env["platform"] == "cpu"
  assert env["command"] and env["previous_sessions"] == []
  commit = provenance.git_state(str(ROOT))["git_commit"]
  assert env["git_commit"] == commit  # None outside a git checkout, on both sides
  if commit:
    assert re.fullmatch(r"[0-9a-f]{40}", commit) and isinstance(env["git_dirty"], bool)
  train.main(config, workdir)  # a second session (already finished: nothing to train)
  again = provenance.read(workdir)
  assert [s["started_at"] for s in again["previous_sessions"]] == [env["started_at"]]


def test_command_line_reads_as_typed():
  argv = ["/repo/medjax/main.py", "--config", "experiments/x.py:quick", "--workdir", "runs/a b"]
  assert provenance.command_line(argv, "medjax.main").endswith(
      " -m medjax.main --config experiments/x.py:quick --workdir 'runs/a b'")
  assert provenance.command_line(["run.py", "--x"], "").endswith(" run.py --x")


def test_git_state_outside_a_checkout(tmp_path):
  assert provenance.git_state(str(tmp_path)) == {"git_commit": None, "git_dirty": None}
  assert provenance.short_commit({"git_commit": "0123456789abcdef", "git_dirty": True}) == "0123456+dirty"
  assert provenance.short_commit(None) == ""


# ------------------------------------------------------------------ validation (moved from test_config_lib)


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_every_experiment_validates_in_quick_mode(path):
  config = config_lib.load_config(f"{path}:quick=true")
  build.validate(config)
  assert config.total_steps <= 20


@pytest.fixture
def demo_config():
  return _demo("quick=true")


def test_validate_unknown_model_suggests(demo_config):
  demo_config.model_name = "unett"
  with pytest.raises(config_lib.ConfigError, match=r"config\.model_name: Unknown model 'unett'\. Did you mean 'unet'"):
    build.validate(demo_config)


def test_validate_bad_model_kwarg(demo_config):
  demo_config.model.featurs = (4, 8)
  with pytest.raises(config_lib.ConfigError, match=r"config\.model: unknown key 'featurs'.*Did you mean 'features'"):
    build.validate(demo_config)


def test_validate_unknown_dataset_loss_optimizer(demo_config):
  bad = mlc.ConfigDict(demo_config.to_dict())
  bad.sharding = "fsdpp"
  with pytest.raises(config_lib.ConfigError, match=r"config\.sharding: Unknown sharding preset 'fsdpp'\. Did you mean 'fsdp'"):
    build.validate(bad)
  bad = mlc.ConfigDict(demo_config.to_dict())
  bad.loss.name = "dice_xnet"
  with pytest.raises(config_lib.ConfigError, match=r"config\.loss: Unknown loss 'dice_xnet'\. Did you mean 'dice_xent'"):
    build.validate(bad)
  bad = mlc.ConfigDict(demo_config.to_dict())
  bad.loss.batch_dcie = True
  with pytest.raises(config_lib.ConfigError, match=r"config\.loss: unknown key 'batch_dcie'.*Did you mean 'batch_dice'"):
    build.validate(bad)
  bad = mlc.ConfigDict(demo_config.to_dict())
  bad.data.name = "synthetic_phantom"
  with pytest.raises(config_lib.ConfigError, match="Did you mean 'synthetic_phantoms'"):
    build.validate(bad)
  bad = mlc.ConfigDict(demo_config.to_dict())
  bad.optim.name = "adamww"
  with pytest.raises(config_lib.ConfigError, match="config.optim.name: .*Did you mean 'adamw'"):
    build.validate(bad)


def test_validate_types(demo_config):
  bad = mlc.ConfigDict({**demo_config.to_dict(), "total_steps": "100"})
  with pytest.raises(config_lib.ConfigError, match=r"config\.total_steps must be int"):
    build.validate(bad)


def test_validate_accumulation_divides_batch(demo_config):
  demo_config.grad_accum_steps = 3
  demo_config.input.batch_size = 4
  with pytest.raises(config_lib.ConfigError, match="multiple of config.grad_accum_steps=3"):
    build.validate(demo_config)
