"""Shared test setup: 8 fake CPU devices, so sharding tests run on any machine.

XLA reads the flag when the CPU backend starts, so it is set here, before any test module imports JAX.
Tests that want one device use a mesh of `(("data", 1),)`.
"""

import os

import pytest

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture
def torch_one_thread(request):
  """torch with one intra-op thread for the test, restored after it; skips without torch or without a module the
  test module names in `PEER_MODULES` (e.g. ("monai",)). Two threads on a loaded 2-core CI machine run far slower."""
  torch = pytest.importorskip("torch")
  for name in getattr(request.module, "PEER_MODULES", ()):
    pytest.importorskip(name)
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield torch
  torch.set_num_threads(threads)
