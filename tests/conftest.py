"""Test setup: 8 forced CPU devices (set before jax is imported) and small shared helpers."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Tests build the same tiny programs many times (and in subprocesses): a persistent XLA cache
# turns the repeats into cache hits. Entries are keyed by program, flags and jax version.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/mim_jax_test_xla_cache")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


import jax
import pytest
from absl import flags

# grain worker processes and absl-based code need parsed flags.
if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


@pytest.fixture(scope="session", autouse=True)
def _eight_devices() -> None:
    """Every test session sees 8 CPU devices."""
    assert jax.device_count() == 8, jax.devices()
