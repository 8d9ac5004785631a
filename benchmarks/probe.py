"""Shared pieces of the benchmark scripts: synthetic batches through a method's own batch
transform, XLA cost / memory analysis of a compiled step, and host facts."""

from __future__ import annotations

import os
import platform

import jax
import ml_collections
import numpy as np

from mim_jax import train
from mim_jax.methods import get_method


def synthetic_batch(
    config: ml_collections.ConfigDict, local_batch: int, mesh: jax.sharding.Mesh
) -> dict[str, np.ndarray]:
    """Host-local batch shaped like the pipeline's, with the method's host-side fields added."""
    rng = np.random.default_rng(config.seed)
    size, chans = config.model.img_size, config.model.in_chans
    start = jax.process_index() * local_batch
    batch = {
        "image": rng.standard_normal((local_batch, size, size, chans), dtype=np.float32),
        "label": np.zeros((local_batch,), np.int32),
        "index": np.arange(start, start + local_batch, dtype=np.int64),
    }
    batch = get_method(config.method).make_batch_transform(config, mesh)(batch, 0)
    # As in the train loop: host-side bookkeeping (e.g. the int64 'index') stays on the host.
    return {k: v for k, v in batch.items() if k not in train.HOST_ONLY_KEYS}


def cost_analysis(compiled) -> dict[str, float]:
    """The executable's cost dict (older jax versions return a one-element list)."""
    costs = compiled.cost_analysis()
    if isinstance(costs, list | tuple):
        costs = costs[0] if costs else {}
    return dict(costs or {})


def memory_analysis(compiled) -> dict[str, int | None]:
    """Per-device buffer sizes of the executable; None where the backend does not say."""
    try:
        stats = compiled.memory_analysis()
    except (NotImplementedError, RuntimeError):  # Some backends do not implement it.
        stats = None
    fields = ("temp", "argument", "output", "alias")
    return {f"{f}_bytes": getattr(stats, f"{f}_size_in_bytes", None) for f in fields}


def host_info() -> dict[str, object]:
    """CPU model and count of this host."""
    cpu = platform.processor()
    if not cpu and os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else ""
    return {"cpu": cpu or platform.machine(), "cpus": os.cpu_count()}
