"""benchmarks/hospital_tables.py: runs grouped by their tags over seeds, mean ± sample std, quick runs left out."""

import json
import os

from benchmarks import hospital_tables


def _run(root, name, config, results):
  path = os.path.join(root, name)
  os.makedirs(path)
  for file, content in (("config.json", config), ("results.json", results)):
    with open(os.path.join(path, file), "w") as f:
      json.dump(content, f)


def test_tables_group_seeds_and_skip_quick_runs(tmp_path):
  root = str(tmp_path)
  for seed, auc in ((0, 0.8), (1, 0.9)):
    _run(root, f"e8_s{seed}", dict(seed=seed, model=dict(width=32), tags=dict(experiment="medmnist_dp",
                                                                             subset="breastmnist", eps=8.0)),
         dict(test={"test/auc": auc, "test/accuracy": 0.7}, test_best={"test_best/auc": auc},
              privacy=dict(epsilon=7.99, noise_multiplier=1.5), wall_s=120.0))
  _run(root, "np_s0", dict(seed=0, model=dict(width=32), tags=dict(experiment="medmnist_dp", subset="breastmnist",
                                                                   eps=0.0)),
       dict(test={"test/auc": 0.95}, wall_s=60.0))
  _run(root, "quick", dict(seed=0, tags=dict(experiment="medmnist_dp", subset="breastmnist", eps=8.0, quick=True)),
       dict(test={"test/auc": 0.1}))
  _run(root, "dann_s0", dict(seed=0, tags=dict(experiment="sites_dann", method="dann", harmonise="", skew=1.0,
                                               holdout=3)),
       dict(test={"test/auc": 0.93}, extra_tests={"external_test/auc": 0.91, "external_test/accuracy": 0.8}))
  os.makedirs(os.path.join(root, "running"))
  with open(os.path.join(root, "running", "config.json"), "w") as f:
    f.write("{}")
  text = hospital_tables.main(["--runs", root])
  rows = {line.split(" | ")[1]: line for line in text.splitlines() if line.startswith("| breastmnist")}
  assert "| 0,1 | 0.850 ± 0.071 | 0.700 ± 0.000 |" in rows["8"] and "| 7.990 ± 0.000 | 1.500 ± 0.000 | 2.0 ± 0.0 |" in rows["8"]
  assert "| 0 | 0.950 | - |" in rows["non-private"] and "0.100" not in text
  assert "| dann | none | 1.0 | 3 | 0 | 0.930 | - | 0.910 | 0.800 | - |" in text
  assert text.rstrip().endswith("Unfinished (no results.json yet): " + os.path.join(root, "running") + ".")
