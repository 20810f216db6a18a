"""Config parsing, overrides and JSON round trip (validation: tests/test_build.py)."""

import ml_collections as mlc
import pytest

from medjax import config_lib


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


def test_parse_arg_bare_key_means_true():
  assert config_lib.parse_arg("quick", quick=False, dims=3).quick is True
  assert config_lib.parse_arg("dims=2,quick", quick=False, dims=3).to_dict() == {"quick": True, "dims": 2}
  with pytest.raises(config_lib.ConfigError, match=r"'dims' needs a value \(dims=\.\.\.\)"):
    config_lib.parse_arg("dims", quick=False, dims=3)
  with pytest.raises(config_lib.ConfigError, match="Unknown experiment argument 'quik'. Did you mean 'quick'"):
    config_lib.parse_arg("quik", quick=False)


def test_config_lib_loads_without_medjax_or_jax():
  import subprocess
  import sys
  code = ("import sys; from medjax import config_lib; "
          "print(sorted(m for m in sys.modules if m.startswith(('jax', 'medjax.', 'flax')) and m != 'medjax.config_lib'))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
  assert out.strip() == "[]"


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
