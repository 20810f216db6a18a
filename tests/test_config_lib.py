"""Config parsing, overrides, JSON round trip, validation and the experiment files."""

import glob
import os

import ml_collections as mlc
import pytest

from medjax import build, config_lib

EXPERIMENTS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "experiments", "*.py")))
EXPERIMENTS = [p for p in EXPERIMENTS if not os.path.basename(p).startswith(("_", "common"))]


def test_parse_arg_types_from_defaults():
  arg = config_lib.parse_arg("dims=2,quick=true,lr=1e-3,name=abc,shape=(4,5)", dims=3, quick=False, lr=0.1,
                             name="x", shape=(1, 2))
  assert (arg.dims, arg.quick, arg.lr, arg.name, arg.shape) == (2, True, 1e-3, "abc", (4, 5))
  assert isinstance(arg.lr, float) and isinstance(arg.shape, tuple)


def test_parse_arg_defaults_when_empty():
  assert config_lib.parse_arg(None, dims=3).dims == 3
  assert config_lib.parse_arg("", dims=3).dims == 3


@pytest.mark.parametrize("text", ["yes", "1", "TRUE"])
def test_parse_arg_bools_are_strict(text):
  with pytest.raises(config_lib.ConfigError, match="expected a bool"):
    config_lib.parse_arg(f"quick={text}", quick=False)


def test_parse_arg_unknown_key_suggests():
  with pytest.raises(config_lib.ConfigError, match=r"Unknown experiment argument 'dim'\. Did you mean 'dims'"):
    config_lib.parse_arg("dim=2", dims=3, quick=False)


def test_parse_arg_bad_int():
  with pytest.raises(config_lib.ConfigError, match="'dims': expected an int, got 'two'"):
    config_lib.parse_arg("dims=two", dims=3)


def _config():
  c = mlc.ConfigDict()
  c.lr = 0.1
  c.model = dict(features=(4, 8), depth=3, norm="instance")
  return c


def test_apply_overrides_types_and_locks():
  c = config_lib.apply_overrides(_config(), ["lr=1", "model.features=(3,4,5)", "model.norm=batch"])
  assert c.lr == 1.0 and isinstance(c.lr, float)
  assert c.model.features == (3, 4, 5) and c.model.norm == "batch"
  with pytest.raises(AttributeError):
    c.new_key = 1


def test_apply_overrides_mistyped_key_names_it_and_suggests():
  with pytest.raises(config_lib.ConfigError,
                     match=r"Unknown config key 'model\.depht'.*Did you mean 'model\.depth'"):
    config_lib.apply_overrides(_config(), ["model.depht=3"])


def test_apply_overrides_bad_value_names_key():
  with pytest.raises(config_lib.ConfigError, match=r"config\.model\.depth: expected an int"):
    config_lib.apply_overrides(_config(), ["model.depth=deep"])


def test_json_round_trip_restores_tuples():
  c = _config()
  c.mesh = (("data", -1),)
  back = config_lib.from_json(config_lib.to_json(c))
  assert back.model.features == (4, 8) and back.mesh == (("data", -1),)
  assert back.to_dict() == c.to_dict()


def test_steps_from():
  c = mlc.ConfigDict(dict(total_epochs=2.5))
  assert config_lib.steps_from(c, "total", steps_per_epoch=10) == 25
  c = mlc.ConfigDict(dict(total_steps=7, total_epochs=1))
  assert config_lib.steps_from(c, "total") == 7
  with pytest.raises(config_lib.ConfigError, match="neither warmup_steps nor warmup_epochs"):
    config_lib.steps_from(c, "warmup")


def test_load_config_missing_file():
  with pytest.raises(config_lib.ConfigError, match="does not exist"):
    config_lib.load_config("experiments/nope.py:quick=true")


@pytest.mark.parametrize("path", EXPERIMENTS, ids=os.path.basename)
def test_every_experiment_validates_in_quick_mode(path):
  config = config_lib.load_config(f"{path}:quick=true")
  build.validate(config)
  assert config.total_steps <= 20


@pytest.fixture
def demo_config():
  path = os.path.join(os.path.dirname(__file__), "..", "experiments", "synthetic_unet.py")
  return config_lib.load_config(f"{path}:quick=true")


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
