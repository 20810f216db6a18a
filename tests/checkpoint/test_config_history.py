"""config.json is the record of a run: a different config is refused, an allowed change is appended to
config_history.jsonl, and the model can never change."""

import json
import os
import re

import ml_collections as mlc
import pytest

from medjax import checkpoint, config_lib
from tests import train_testing


def _config(**changes):
  c = mlc.ConfigDict()
  c.seed, c.lr, c.total_steps, c.model_name = 0, 3e-4, 4, "unet"
  c.model = dict(spatial_dims=2, num_classes=2, features=(4, 8), norm="batch")
  c.input = dict(batch_size=2, patch_size=(16, 12))
  c.augment = dict()
  c.flags = dict(eval_with_ema=True)
  return train_testing.set_dotted(c, **changes)


def _read(path):
  with open(path, "rb") as f:
    return f.read()


def test_config_diff_compares_as_json_key_by_key():
  old = _config()
  new = _config(lr=1e-3, **{"model.features": (8, 16)}).to_dict()  # a JSON-like dict may stand for a config
  new["input"]["patch_size"] = [16, 12]
  new["flags"]["eval_with_ema"] = 1
  new["augment"] = {"flip": True}
  del new["seed"]
  diff = checkpoint.config_diff(old, new)
  # tuples equal lists (JSON); true is not 1; an empty dict is a value of its own
  assert list(diff) == ["augment", "augment.flip", "flags.eval_with_ema", "lr", "model.features", "seed"]
  assert checkpoint.config_history.describe(diff) == (
      "augment: {} -> (absent); augment.flip: (absent) -> true; flags.eval_with_ema: true -> 1; "
      "lr: 0.0003 -> 0.001; model.features: [4, 8] -> [8, 16]; seed: 0 -> (absent)")
  assert checkpoint.config_diff(old, json.loads(config_lib.to_json(old))) == {}


def test_a_new_or_identical_run_has_nothing_to_check(tmp_path):
  assert checkpoint.check_config(tmp_path / "new", _config()) == {}
  checkpoint.record_config(tmp_path, _config())
  assert checkpoint.check_config(tmp_path, _config()) == {}


def test_a_changed_config_is_refused_naming_every_key_and_nothing_is_written(tmp_path):
  path = checkpoint.record_config(tmp_path, _config())
  before, mtime = _read(path), os.stat(path).st_mtime_ns
  changed = _config(lr=1e-3, total_steps=8)
  message = (f"The config differs from the one this run was started with ({path}): lr: 0.0003 -> 0.001; "
             f"total_steps: 4 -> 8. Start a fresh --workdir, or pass --allow_config_change to resume with the new "
             f"values, recorded in config_history.jsonl.")
  for call in (lambda: checkpoint.check_config(tmp_path, changed),
               lambda: checkpoint.record_config(tmp_path, changed, step=4)):
    with pytest.raises(config_lib.ConfigError, match=f"^{re.escape(message)}$"):
      call()
  assert _read(path) == before and os.stat(path).st_mtime_ns == mtime
  assert os.listdir(tmp_path) == ["config.json"]
  checkpoint.record_config(tmp_path, _config(), step=4)  # the same config again: left as it is
  assert os.stat(path).st_mtime_ns == mtime


def test_the_model_cannot_change_even_when_allowed(tmp_path):
  path = checkpoint.record_config(tmp_path, _config())
  before = _read(path)
  changed = _config(lr=1e-3, model_name="resnet", **{"model.features": (8, 16)})
  with pytest.raises(config_lib.ConfigError, match=re.escape(
      '; model_name: "unet" -> "resnet". Start a fresh --workdir, or pass --allow_config_change to resume '
      "with the new values, recorded in config_history.jsonl (model_name and model.* cannot change even then: "
      "they set the parameter shapes).")):
    checkpoint.check_config(tmp_path, changed)
  with pytest.raises(config_lib.ConfigError, match="^" + re.escape(
      f"The config changes the model of the run in {tmp_path}: model.features: [4, 8] -> [8, 16]; model_name: "
      f'"unet" -> "resnet". model_name and model.* set the parameter shapes and cannot change on an existing '
      f"run, even with --allow_config_change; start a fresh --workdir.") + "$"):
    checkpoint.record_config(tmp_path, changed, step=4, allow_change=True)
  assert _read(path) == before and os.listdir(tmp_path) == ["config.json"]


def test_an_allowed_change_is_appended_to_the_history_before_config_json_changes(tmp_path):
  checkpoint.record_config(tmp_path, _config())
  assert checkpoint.read_config_history(tmp_path) == []
  checkpoint.record_config(tmp_path, _config(total_steps=8), step=4, allow_change=True)
  new_key = _config(total_steps=8)
  new_key.input.crop = True
  checkpoint.record_config(tmp_path, new_key, step=8, allow_change=True)
  history = checkpoint.read_config_history(tmp_path)
  for record in history:
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", record.pop("time"))
  assert history == [{"step": 4, "changed": {"total_steps": {"old": 4, "new": 8}}},
                     {"step": 8, "changed": {"input.crop": {"new": True}}}]
  assert checkpoint.load_config(tmp_path).to_dict() == new_key.to_dict()
  with open(tmp_path / checkpoint.CONFIG_HISTORY_FILE) as f:
    assert len(f.read().splitlines()) == 2  # one JSON line per change


def test_checkpoints_without_config_json_are_recorded(tmp_path):
  checkpoint.record_config(tmp_path, _config(), step=6)
  (record,) = checkpoint.read_config_history(tmp_path)
  assert (record["step"], record["changed"], record["note"]) == (
      6, {}, "config.json was missing; written from the config resumed with")


def test_unreadable_config_json_is_named(tmp_path):
  (tmp_path / "config.json").write_text('{"lr": 0.1')
  with pytest.raises(config_lib.ConfigError, match=re.escape(
      f"{tmp_path}/config.json cannot be read as JSON (")):
    checkpoint.check_config(tmp_path, _config())
  with pytest.raises(config_lib.ConfigError, match="it records the run's config"):
    checkpoint.load_config(tmp_path)
