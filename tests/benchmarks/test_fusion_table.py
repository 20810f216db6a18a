"""benchmarks/fusion_table.py: fusion runs grouped over seeds, the AUC lost without t2 read from the absent-t2
evaluation report, quick runs left out."""

import json
import os

from benchmarks import fusion_table


def _run(root, name, tags, auc, absent_auc=None, seed=0):
  path = os.path.join(root, name)
  os.makedirs(path)
  config = dict(seed=seed, tags=dict(experiment="synthetic_fusion", rule="sum", missing=0.0, **tags))
  results = dict(test_best={"test_best/auc": auc, "test_best/accuracy": 0.9}, wall_s=60.0)
  for file, content in (("config.json", config), ("results.json", results)):
    with open(os.path.join(path, file), "w") as f:
      json.dump(content, f)
  if absent_auc is not None:
    os.makedirs(os.path.join(path, "eval_test_without_t2"))
    with open(os.path.join(path, fusion_table.ABSENT_REPORT), "w") as f:
      json.dump({"metrics": {"auc": {"value": absent_auc}}}, f)


def test_rows_group_seeds_and_read_the_absent_evaluation(tmp_path):
  root = str(tmp_path)
  _run(root, "concat_s0", dict(fusion="concat", sources="t1,t2,tabular", dropout=0.0), 0.98, 0.70, seed=0)
  _run(root, "concat_s1", dict(fusion="concat", sources="t1,t2,tabular", dropout=0.0), 0.96, 0.74, seed=1)
  _run(root, "md_s0", dict(fusion="concat", sources="t1,t2,tabular", dropout=0.5), 0.97, 0.95)
  _run(root, "t1_s0", dict(fusion="concat", sources="t1", dropout=0.0), 0.75)
  _run(root, "quick", dict(fusion="concat", sources="t1", dropout=0.0, quick=True), 0.1)
  text = fusion_table.main(["--runs", root])
  assert "| concat | t1,t2,tabular | 0 | 0 | sum | 0,1 | 0.970 ± 0.014 | 0.900 ± 0.000 | 0.720 ± 0.028 | " \
         "0.250 ± 0.042 | 1.0 ± 0.0 |" in text
  assert "| concat | t1,t2,tabular | 0.5 | 0 | sum | 0 | 0.970 | 0.900 | 0.950 | 0.020 | 1.0 |" in text
  assert "| concat | t1 | 0 | 0 | sum | 0 | 0.750 | 0.900 | - | - | 1.0 |" in text and "0.100" not in text
