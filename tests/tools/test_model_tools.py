"""The summary and benchmark tools on tiny models."""

import math

import pytest

from medjax import config_lib
from medjax.tools import benchmark, model_info

UNET = dict(spatial_dims=3, num_classes=3, features=(4, 8))


def test_parse_kwargs():
  assert config_lib.parse_kwargs("features=(8,16),norm=batch,dropout=0.1,residual=True") == dict(
      features=(8, 16), norm="batch", dropout=0.1, residual=True)
  with pytest.raises(config_lib.ConfigError, match="key=value"):
    config_lib.parse_kwargs("features")


def test_summary_counts_blocks_and_flops():
  summary = model_info.summarize("unet", UNET, (8, 12, 16, 1), batch_size=2)
  assert summary["parameters"] == sum(summary["parameters_per_block"].values()) > 0
  assert set(summary["parameters_per_block"]) >= {"enc0", "enc1", "dec0", "up0", "seg_head"}
  assert summary["output_shape"] == [2, 8, 12, 16, 3]
  assert summary["aux_shapes"]["bottleneck"] == [2, 4, 6, 8, 8]
  assert summary["forward_gflops"] > 0
  assert "total" in model_info.format_table(summary)


def test_summary_resnet_keeps_batch_stats_apart():
  summary = model_info.summarize("resnet18", dict(num_classes=10, width=4, small_input=True), (16, 16, 3))
  assert summary["other_collections"]["batch_stats"] > 0 and summary["output_shape"] == [1, 10]


def test_benchmark_reports_both_modes():
  report = benchmark.benchmark("unet", UNET, (8, 8, 8, 1), batch_size=8, steps=2, warmup=0)
  modes = {r["mode"]: r for r in report["results"]}
  assert set(modes) == {"forward", "train"}
  for r in modes.values():
    assert r["median_ms"] > 0 and r["compile_s"] > 0 and math.isfinite(r["samples_per_s"])
  assert report["device_count"] == 8


def test_benchmark_classifier_and_bad_batch():
  report = benchmark.benchmark("resnet18", dict(num_classes=3, width=4, small_input=True), (8, 8, 1),
                               batch_size=8, modes=("train",), steps=1, warmup=0)
  assert report["results"][0]["mode"] == "train"
  with pytest.raises(ValueError, match="--batch_size=3 is not divisible"):
    benchmark.benchmark("unet", UNET, (8, 8, 8, 1), batch_size=3, steps=1)


def test_benchmark_with_the_augmentation_chain():
  from medjax import augment
  report = benchmark.benchmark("unet", UNET, (8, 8, 8, 1), batch_size=8, modes=("train", "augment"), steps=1,
                               warmup=0, augment_config=augment.SEGMENTATION_CHAIN)
  assert [r["mode"] for r in report["results"]] == ["train", "augment"]
  assert all(r["median_ms"] > 0 for r in report["results"])
