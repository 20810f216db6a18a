import pytest

from medjax.registry import Registry


def test_register_get_and_names():
  r = Registry("widget")
  r.register("b")(int)
  r.add("a", float)
  assert r.get("a") is float and r.names() == ["a", "b"] and "b" in r and len(r) == 2


def test_duplicate_refused():
  r = Registry("widget")
  r.add("a", 1)
  with pytest.raises(ValueError, match="registered twice"):
    r.add("a", 2)


def test_unknown_lists_all_and_suggests():
  r = Registry("widget")
  for name in ["resnet18", "resnet50", "unet"]:
    r.add(name, name)
  with pytest.raises(KeyError, match=r"Unknown widget 'resnet19'\. Did you mean 'resnet18'.*Known widget names: resnet18, resnet50, unet\."):
    r.get("resnet19")


def test_check_kwargs():
  r = Registry("fn")

  @r.register("f")
  def f(x, *, alpha=1.0, beta=2):
    return x

  r.check_kwargs("f", ["alpha"])
  with pytest.raises(ValueError, match=r"unknown key 'alpah' for fn 'f'\. Did you mean 'alpha'"):
    r.check_kwargs("f", ["alpah"], where="config.f")


def test_build_checks_keys_then_calls():
  r = Registry("thing")

  @r.register("pair")
  def pair(a, *, b=2):
    return (a, b)

  assert r.build("pair", {"a": 1, "b": 3}) == (1, 3)
  with pytest.raises(ValueError, match=r"config\.x: unknown key 'c' for thing 'pair'"):
    r.build("pair", {"a": 1, "c": 3}, where="config.x")
  with pytest.raises(ValueError, match=r"cannot build thing 'pair' from keys \['b'\].*missing a required argument: 'a'"):
    r.build("pair", {"b": 3})
