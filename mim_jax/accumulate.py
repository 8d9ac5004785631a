"""Gradient accumulation (`config.accum_steps`): the global batch as k equal micro-batches,
scanned inside the one jitted train step, their losses, metrics and gradients averaged.

Layout: micro-batch j holds the global rows j, j + k, j + 2k, ... (`split_micro_batches`), so
each micro-batch is spread over the data x fsdp shards like the batch itself and the split
moves no rows between devices. GreenMIM's mask groups (contiguous blocks of B/M rows sharing
one mask) then appear in every micro-batch as B/(M k) rows each, in order: every micro-batch
keeps all M groups' plans (the `GROUP_KEYS` leaves go whole to each), which needs M to divide
the micro-batch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mim_jax import sharding
from mim_jax.config_lib import ConfigError


def split_micro_batches(batch: dict[str, Any], k: int) -> dict[str, jax.Array]:
    """Leaves `[B, ...]` -> `[k, B/k, ...]`: micro-batch j holds the rows j, j + k, j + 2k, ...

    The batch is split over the S = data x fsdp shards of the active mesh in blocks of B/S
    rows; as S divides B/k (else ConfigError), k divides B/S and micro-batch j's rows of every
    shard lie in that shard's block: the split moves no data between devices, and the
    constraint keeps each micro-batch sharded like the batch. The rows do not depend on the
    mesh, so neither do the micro-batches.
    """
    mesh = jax.sharding.get_abstract_mesh()
    axes = () if mesh.empty else tuple(a for a in sharding.BATCH_AXES if mesh.shape[a] > 1)
    shards = int(np.prod([mesh.shape[a] for a in axes]))
    for leaf in jax.tree.leaves(batch):
        if leaf.shape[0] % (k * shards):
            raise ConfigError(
                f"config.accum_steps={k}: the micro-batch ({leaf.shape[0]} / {k} rows) must "
                f"split evenly over data*fsdp={shards}"
            )

    def split(x: jax.Array) -> jax.Array:
        x = jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)
        if not axes:
            return x
        spec = jax.sharding.PartitionSpec(None, axes, *([None] * (x.ndim - 2)))
        return jax.lax.with_sharding_constraint(x, spec)

    return jax.tree.map(split, batch)


def _check_micro_groups(shared: dict[str, Any], micro_rows: int, k: int) -> None:
    """ConfigError unless the M mask groups (leading axis of the per-group leaves) divide the
    micro-batch (module docstring)."""
    for leaf in jax.tree.leaves(shared):
        groups = leaf.shape[0]
        if micro_rows % groups:
            raise ConfigError(
                f"config.accum_steps={k}: the micro-batch ({micro_rows} rows) must hold whole "
                f"mask groups ({groups}); make batch_size / accum_steps a multiple of them"
            )


def mean_over_micro_batches(
    grads_of: Callable,
    params: nnx.State,
    batch: dict,
    key: jax.Array,
    k: int,
    group_keys: tuple[str, ...],
) -> tuple[tuple[jax.Array, dict[str, jax.Array]], nnx.State]:
    """((loss, aux), gradients): the means of `grads_of(params, micro_batch, key)` (which returns
    the same) over k micro-batches (`split_micro_batches`), scanned with the gradients summed
    in the parameters' dtype; micro-batch j draws its random bits from fold_in(key, j).
    Per-group leaves (`group_keys`, e.g. GreenMIM plans) go whole to every micro-batch."""
    shared = {name: v for name, v in batch.items() if name in group_keys}
    rows = {name: v for name, v in batch.items() if name not in group_keys}
    micro_rows = next(iter(rows.values())).shape[0] // k
    _check_micro_groups(shared, micro_rows, k)

    def body(grad_sum, xs):
        j, micro = xs
        (loss, aux), grads = grads_of(params, {**micro, **shared}, jax.random.fold_in(key, j))
        return jax.tree.map(jnp.add, grad_sum, grads), (loss, aux)

    zeros = jax.tree.map(jnp.zeros_like, params)
    xs = (jnp.arange(k), split_micro_batches(rows, k))
    grad_sum, (losses, auxes) = jax.lax.scan(body, zeros, xs)
    mean = functools.partial(jnp.mean, axis=0)
    return (mean(losses), jax.tree.map(mean, auxes)), jax.tree.map(lambda g: g / k, grad_sum)
