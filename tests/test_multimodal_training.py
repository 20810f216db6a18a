"""A fusion run end to end: the quick synthetic_fusion experiment trains with modality dropout, resumes from its
checkpoint, and evaluates with a modality absent; model/data mismatches and unsupported combinations are refused
naming the key."""

import json
import os

import pytest

from medjax import build, config_lib, train
from medjax.data import datasets
from medjax.tools import evaluate

EXPERIMENT = os.path.join(os.path.dirname(__file__), "..", "experiments", "synthetic_fusion.py")


def _config(arg="quick=true"):
  config = config_lib.load_config(f"{EXPERIMENT}:{arg}")
  config.mesh = (("data", 1),)
  return config


def test_fusion_run_trains_and_evaluates_with_a_modality_absent(tmp_path):
  config = _config("quick=true,dropout=0.5,fusion=attention")
  workdir = str(tmp_path / "run")
  train.main(config, workdir)
  results = json.load(open(os.path.join(workdir, "results.json")))
  assert results["step"] == 6 and 0 <= results["test"]["test/auc"] <= 1
  full = evaluate.run(workdir, num_samples=0)
  without = evaluate.run(workdir, num_samples=0, absent=["t2"])
  assert without["absent"] == ["t2"] and without["out"].endswith("eval_test_without_t2")
  assert full["metrics"]["auc"]["value"] == pytest.approx(results["test_best"]["test_best/auc"], abs=1e-6)
  assert without["metrics"]["auc"]["value"] != full["metrics"]["auc"]["value"]
  with pytest.raises(ValueError, match="--absent: absent modality 'pet'"):
    evaluate.run(workdir, num_samples=0, absent=["pet"])


def test_model_and_data_must_agree():
  info = build.dataset(_config()).info
  config = _config()
  build.check_model_inputs(config, info)
  config.model.modalities = ("t1", "flair")
  with pytest.raises(config_lib.ConfigError, match=r"config.model.modalities: \['flair'\] not among"):
    build.check_model_inputs(config, info)
  config = _config()
  config.model.categorical_sizes = (4,)
  with pytest.raises(config_lib.ConfigError, match=r"config.model.categorical_sizes=\(4,\), but the dataset's"):
    build.check_model_inputs(config, info)
  config = _config()
  config.model_name, config.model = "resnet18", dict(num_classes=2)
  with pytest.raises(config_lib.ConfigError, match="holds multimodal examples .* takes one image"):
    build.check_model_inputs(config, info)
  one_image = datasets.build_dataset("synthetic_lesions", dict(spatial_dims=2, image_size=16, num_train=2,
                                                               num_val=2, num_test=2)).info
  with pytest.raises(config_lib.ConfigError, match="fuses named modalities, but config.data holds one image"):
    build.check_model_inputs(_config(), one_image)
  config = _config()
  config.input.patch_size = (16, 16)
  with pytest.raises(config_lib.ConfigError, match="config.input.patch_size: patches are not cut from multimodal"):
    build.check_model_inputs(config, info)
  config = _config()
  config.eval_flips = ((), (1,))
  with pytest.raises(config_lib.ConfigError, match="config.eval_flips is not supported with the multimodal model"):
    build.validate(config)
