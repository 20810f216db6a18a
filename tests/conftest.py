"""Shared test setup: 8 fake CPU devices, so sharding tests run on any machine.

XLA reads the flag when the CPU backend starts, so it is set here, before any test module imports JAX.
Tests that want one device use a mesh of `(("data", 1),)`.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
