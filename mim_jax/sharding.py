"""Device mesh, logical-axis rules and batch placement: one code path for 1 CPU, 8 forced CPU
devices, a GPU node and a TPU pod.

Parameters carry logical axis names ('embed', 'mlp', 'heads', ...); `config.sharding_rules`
maps each name to mesh axes ('data', 'fsdp', 'tensor'). A mesh axis is used at most once per
array, and a dimension that its mesh axes do not divide stays replicated, so any model runs on
any mesh (tiny test models included).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import NamedSharding, PartitionSpec

from mim_jax import pytree
from mim_jax.config_lib import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def make_mesh(
    mesh_config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None
) -> jax.sharding.Mesh:
    """Mesh with axes (data, fsdp, tensor); a size of -1 takes the remaining devices.

    With `mesh_config.dcn_data` = S > 1 (a multi-slice job: S TPU slices, or S processes on
    other platforms, joined by the data-center network) the `data` axis spans the S slices
    and every other axis stays inside a slice, the layout `create_hybrid_device_mesh` builds.
    """
    devices = list(devices if devices is not None else jax.devices())
    shape = _mesh_shape(mesh_config, len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    slices = int(mesh_config.get("dcn_data", 1))
    if slices <= 1:
        return jax.sharding.Mesh(device_grid(shape, devices), MESH_AXES, axis_types=auto)
    if shape[0] % slices:
        raise ConfigError(
            f"config.mesh.dcn_data={slices} must divide the data axis ({shape[0]} devices)"
        )
    per_slice = (shape[0] // slices, *shape[1:])
    # TPU slices carry distinct slice indices; elsewhere (CPU, GPU) processes are the slices.
    by_process = _slice_count(devices) == 1
    try:
        grid = mesh_utils.create_hybrid_device_mesh(
            per_slice, (slices, 1, 1), devices, process_is_granule=by_process
        )
    except (AssertionError, ValueError) as e:
        unit = "processes" if by_process else "slices"
        raise ConfigError(
            f"config.mesh.dcn_data={slices} does not match the job's {unit}: {e}"
        ) from None
    return jax.sharding.Mesh(grid, MESH_AXES, axis_types=auto)


def _slice_count(devices: Sequence[jax.Device]) -> int:
    """Slices the devices span: distinct `slice_index` values (1 where devices have none)."""
    return len({getattr(d, "slice_index", 0) for d in devices})


def device_grid(shape: tuple[int, ...], devices: Sequence[jax.Device]) -> np.ndarray:
    """`devices` arranged as `shape`, following the TPU torus (`mesh_utils.create_device_mesh`,
    what `jax.make_mesh` uses). An axis size that is no product of the torus's dimensions (data=8
    on a 4x4x4 v5p) splits a physical axis, with a warning, where `jax.make_mesh` raises; a
    mesh over several TPU slices needs `config.mesh.dcn_data`."""
    spanned = _slice_count(devices)
    if spanned > 1:
        raise ConfigError(
            f"the devices span {spanned} slices (TPU slices or GPU nodes): set "
            f"config.mesh.dcn_data={spanned} (the data axis across slices)"
        )
    try:
        grid = mesh_utils.create_device_mesh(shape, devices)
    except NotImplementedError as e:
        logging.warning(
            "mesh %s does not follow the device torus (%s); splitting a physical axis, so some "
            "collectives travel farther",
            dict(zip(MESH_AXES, shape, strict=True)),
            str(e).split(". ")[0],
        )
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    return grid


def _mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
    """(data, fsdp, tensor) sizes with the one -1 axis resolved."""
    sizes = {axis: int(mesh_config[axis]) for axis in MESH_AXES}
    fixed = int(np.prod([s for s in sizes.values() if s != -1]))
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ConfigError(f"config.mesh: only one axis may be -1, got {free}")
    if free:
        if num_devices % fixed:
            raise ConfigError(
                f"config.mesh: {num_devices} devices are not divisible by the fixed axes ({fixed})"
            )
        sizes[free[0]] = num_devices // fixed
    shape = tuple(sizes[a] for a in MESH_AXES)
    if int(np.prod(shape)) != num_devices:
        raise ConfigError(
            f"config.mesh: data*fsdp*tensor = {int(np.prod(shape))} but there are "
            f"{num_devices} devices"
        )
    return shape


def check_batch_size(batch_size: int, mesh: jax.sharding.Mesh) -> None:
    """The global batch must split evenly over the data x fsdp shards."""
    shards = batch_shards(mesh)
    if batch_size % shards:
        raise ConfigError(f"config.batch_size={batch_size} must be divisible by data*fsdp={shards}")


def logical_to_mesh(
    names: Sequence[str | None],
    shape: Sequence[int],
    rules: Sequence[tuple[str, str | Sequence[str] | None]],
    mesh: jax.sharding.Mesh,
) -> PartitionSpec:
    """PartitionSpec for an array with logical axis `names` and `shape` under `rules`."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, dim in zip(names, shape, strict=True):
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
        if axes and dim % int(np.prod([mesh.shape[a] for a in axes])) == 0:
            used.update(axes)
            spec.append(axes[0] if len(axes) == 1 else axes)
        else:
            spec.append(None)
    return PartitionSpec(*spec)


def tree_shardings(abstract_tree, logical_specs, rules, mesh: jax.sharding.Mesh):
    """NamedShardings for a pytree given its shapes and its logical PartitionSpecs."""

    def one(spec: PartitionSpec, leaf) -> NamedSharding:
        names = tuple(spec) + (None,) * (len(leaf.shape) - len(tuple(spec)))
        return NamedSharding(mesh, logical_to_mesh(names, leaf.shape, rules, mesh))

    return jax.tree.map(
        one, logical_specs, abstract_tree, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )


def shardings_like_params(tree, param_shardings, default: NamedSharding):
    """Shardings for a tree holding per-parameter arrays (an optimizer state: Adam moments,
    also inside optax.multi_transform's per-group states): a leaf whose path ends with a
    parameter's path and has its shape gets that parameter's sharding, other leaves
    `default`."""
    flat = jax.tree_util.tree_flatten_with_path(param_shardings)[0]
    by_path = {pytree.param_path(path): s for path, s in flat}

    def one(path, leaf):
        keys = pytree.param_path(path).split(".")
        for start in range(len(keys)):
            match = by_path.get(".".join(keys[start:]))
            if match is not None and len(match.spec) <= len(leaf.shape):
                return match
        return default

    return jax.tree_util.tree_map_with_path(one, tree)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Fully replicated placement (scalars, step counters)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int = 1) -> NamedSharding:
    """Leading (batch) axis split over data and fsdp; other axes replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def batch_shards(mesh: jax.sharding.Mesh) -> int:
    """Number of data-parallel shards of the batch (data * fsdp)."""
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def mask_groups_sharded(num_groups: int, mesh: jax.sharding.Mesh) -> bool:
    """Whether per-mask-group arrays are split over the batch axes (else replicated)."""
    return num_groups % batch_shards(mesh) == 0


def host_batch_rows(mesh: jax.sharding.Mesh, batch_size: int) -> np.ndarray:
    """The global batch rows this process feeds, ascending: the union of its devices' slices
    under the batch sharding. Host-major meshes give one contiguous block per host; others
    (a TPU mesh from `jax.make_mesh`, a `tensor` axis spanning hosts) may give several blocks,
    or the same rows to several hosts (replicas, which then feed identical data)."""
    indices = batch_sharding(mesh).addressable_devices_indices_map((batch_size,))
    rows = set()
    for (rows_slice,) in indices.values():
        rows.update(range(*rows_slice.indices(batch_size)))
    return np.array(sorted(rows), np.int64)


def global_batch(
    local: dict,
    mesh: jax.sharding.Mesh,
    *,
    batch_size: int | None = None,
    group_keys: Sequence[str] = (),
    num_groups: int = 1,
) -> dict:
    """Host-local numpy batch -> global jax.Arrays on `mesh`.

    `local` holds this process's rows of the global batch of `batch_size` rows, in the order of
    `host_batch_rows` (`batch_size` may be omitted in a single process: the local batch is the
    global one). Every key's leading axis is the batch, split over the data and fsdp axes,
    except the pytrees under `group_keys` (GreenMIM plans), whose leaves lead with the
    `num_groups` mask groups: split like the batch when the shards divide `num_groups` (each
    host then holds its own groups, ascending), else replicated (each host holds all of them).
    """
    if batch_size is None:
        if jax.process_count() > 1:
            raise ValueError("global_batch needs the global batch_size with several processes")
        batch_size = len(next(iter(local.values())))
    per_shard = batch_shards(mesh)
    if batch_size % per_shard:
        raise ValueError(f"global batch {batch_size} is not divisible by data*fsdp = {per_shard}")
    sharded_groups = mask_groups_sharded(num_groups, mesh)

    def place(value: np.ndarray, rows: int, sharded: bool) -> jax.Array:
        where = batch_sharding(mesh, value.ndim) if sharded else replicated(mesh)
        shape = (rows, *value.shape[1:]) if sharded else value.shape
        return jax.make_array_from_process_local_data(where, value, shape)

    out = {}
    for key, value in local.items():
        if key in group_keys:
            out[key] = jax.tree.map(lambda v: place(v, num_groups, sharded_groups), value)
        else:
            out[key] = place(value, batch_size, True)
    return out


def describe(mesh: jax.sharding.Mesh) -> str:
    """One-line mesh summary for the logs."""
    return ", ".join(f"{a}={mesh.shape[a]}" for a in mesh.axis_names) + (
        f" over {mesh.devices.size} {jax.devices()[0].platform} devices"
    )


def log_mesh(mesh: jax.sharding.Mesh) -> None:
    """Logs the mesh shape and process layout."""
    logging.info(
        "mesh: %s; process %d of %d", describe(mesh), jax.process_index(), jax.process_count()
    )
