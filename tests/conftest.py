"""Test setup: 8 forced CPU devices (set before jax is imported) and small shared helpers."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pathlib

import jax
import pytest
from absl import flags

REFERENCE_DIR = pathlib.Path(__file__).parent / "fixtures"

# grain worker processes and absl-based code need parsed flags.
if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


@pytest.fixture(scope="session", autouse=True)
def _eight_devices() -> None:
    """Every test session sees 8 CPU devices."""
    assert jax.device_count() == 8, jax.devices()
