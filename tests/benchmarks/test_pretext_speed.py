"""benchmarks/pretext_speed.py: the cases pair each pretext step with a supervised step of the same encoder,
and a quick SimCLR step compiles and is timed from its experiment config (no timing is asserted)."""

from benchmarks import pretext_speed


def test_cases_pair_every_pretext_step_with_a_supervised_one():
  seen = set()
  for encoder, name, _, _ in pretext_speed.cases(True, 8, 2):
    assert name == "supervised" or encoder in seen
    if name == "supervised":
      seen.add(encoder)
  assert seen == {"ResNet-18 2D", "UNETR 3D"}


def test_a_quick_simclr_step_is_timed():
  _, name, spec, _ = pretext_speed.cases(True, 8, 2)[1]
  assert name == "simclr"
  result = pretext_speed.time_step(spec, 8, warmup=0, repeats=2)
  assert result["shape"] == (28, 28, 3)
  assert result["images_per_s"] == 8 / result["median_s"] > 0
