"""config.quantization in the one training loop: quantization-aware training runs through the unchanged train
step and reloads as the fake-quantized model; combinations it refuses name the key."""

import json
import os

import numpy as np
import pytest

from medjax import build, checkpoint, config_lib, train
from medjax.compress import quantize

EXPERIMENT = os.path.join(os.path.dirname(__file__), "..", "..", "experiments", "medmnist_dp.py")


def _config(**options):
  config = config_lib.load_config(EXPERIMENT + ":quick=true,eps=0")
  config.mesh = (("data", 1),)
  config.quantization = dict(mode="qat", **options)
  return config


@pytest.mark.slow
def test_qat_run_trains_and_reloads_fake_quantized(tmp_path):
  config = _config()
  train.main(config, str(tmp_path / "qat"))
  results = json.load(open(tmp_path / "qat" / "results.json"))
  assert results["status"] == "finished" and np.isfinite(results["final"]["val/auc"])
  loaded = checkpoint.load(str(tmp_path / "qat"))
  x = np.random.default_rng(0).normal(size=(2, 16, 16, 1)).astype(np.float32)
  fake = np.asarray(loaded.model.apply(loaded.variables, x, train=False)[0])
  plain_config = loaded.config.copy_and_resolve_references()
  plain_config.quantization = None
  plain = np.asarray(build.model(plain_config).apply(loaded.variables, x, train=False)[0])
  assert fake.shape == plain.shape == (2, 3)
  assert not np.array_equal(fake, plain)  # the reloaded model rounds: it is the QAT model, not the float one
  np.testing.assert_allclose(fake, plain, atol=0.2 * np.abs(plain).max() + 1e-3)


def test_quantization_configs_name_the_key():
  config = _config(weight_bit=8)
  with pytest.raises(config_lib.ConfigError, match="unknown key 'weight_bit'. Did you mean 'weight_bits'"):
    build.validate(config)
  config = config_lib.load_config(EXPERIMENT + ":quick=true,eps=8")
  config.quantization = dict(mode="qat")
  with pytest.raises(config_lib.ConfigError, match="mode='qat' cannot be combined with config.privacy"):
    build.validate(config)
  assert quantize.parse(dict(mode="ptq"))["weight_bits"] == 8
