"""The federated table reads federated, centralised and local-only results.json files."""

import json

from benchmarks import federated_table


def _write(path, results):
  path.mkdir()
  (path / "results.json").write_text(json.dumps(results))


def test_table_rows_from_each_kind_of_run(tmp_path):
  _write(tmp_path / "fedavg", {"test": {"test/auc": 0.9, "test/accuracy": 0.8, "test_site0/auc": 0.85,
                                        "test_site1/auc": 0.95, "test_site0/accuracy": 0.7, "test_site1/accuracy": 0.9}})
  _write(tmp_path / "central", {"test": {"test/auc": 0.91, "test/accuracy": 0.81},
                                "extra_tests": {"site0_test/auc": 0.8, "site1_test/auc": float("nan"),
                                                "site0_test/accuracy": 0.75, "site1_test/accuracy": 0.85}})
  _write(tmp_path / "local0", {"extra_tests": {"site0_test/auc": 0.6, "site0_test/accuracy": 0.5}})
  _write(tmp_path / "local1", {"extra_tests": {"site1_test/auc": 0.7, "site1_test/accuracy": 0.6}})
  lines = federated_table.table(str(tmp_path), num_sites=2).splitlines()
  assert lines[2] == "| fedavg | 0.900 | 0.800 | 0.850 | 0.950 | 0.900 ± 0.050 | 0.800 ± 0.100 |"
  assert lines[3] == "| central | 0.910 | 0.810 | 0.800 | nan | 0.800 ± 0.000 | 0.800 ± 0.050 |"
  assert lines[4] == "| local only (each site its own model) | - | - | 0.600 | 0.700 | 0.650 ± 0.050 | 0.550 ± 0.050 |"
