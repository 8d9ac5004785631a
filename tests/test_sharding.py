"""Sharding rules and placement (mim_jax/sharding.py) on the 8 forced CPU devices: logical
names to mesh axes (a dimension the axes do not divide stays replicated), the teacher sharded
like the student, the batch rows a process feeds, and the mesh errors."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec
from test_itpn import tiny_config

from mim_jax import config_lib, pytree, sharding, train

RULES = config_lib.DEFAULT_SHARDING_RULES


def _mesh(data: int, fsdp: int, tensor: int) -> jax.sharding.Mesh:
    config = config_lib.base_config()
    config.mesh.update(data=data, fsdp=fsdp, tensor=tensor)
    return sharding.make_mesh(config.mesh)


@pytest.mark.parametrize(
    "names, shape, want",
    [
        (("embed", "mlp"), (8, 6), PartitionSpec("fsdp", "tensor")),
        (("embed", "mlp"), (6, 8), PartitionSpec(None, "tensor")),  # 6 % 4: replicated
        (("embed", "mlp"), (8, 5), PartitionSpec("fsdp", None)),  # 5 % 2: replicated
        (("mlp", "heads"), (8, 8), PartitionSpec("tensor", None)),  # 'tensor' used once
        (("table", None), (49, 8), PartitionSpec(None, None)),
    ],
)
def test_logical_names_to_mesh_axes(names, shape, want):
    mesh = _mesh(1, 4, 2)
    assert sharding.logical_to_mesh(names, shape, RULES, mesh) == want


def test_the_teacher_is_sharded_like_the_student():
    """iTPN's EMA teacher (a HiViT like the student's encoder) gets the same sharding per
    parameter, on a mesh where some dimensions split over fsdp and tensor."""
    config = tiny_config()
    config.mesh.update(data=1, fsdp=4, tensor=2)
    mesh = sharding.make_mesh(config.mesh)
    s = train.setup(config, mesh, num_examples=64)
    student = pytree.flatten(s.abstract_state.params["encoder"])
    teacher = pytree.flatten(s.abstract_state.teacher)
    assert teacher.keys() == student.keys()
    split = 0
    for path, leaf in teacher.items():
        assert leaf.sharding == student[path].sharding, path
        split += leaf.sharding.spec != PartitionSpec(*([None] * leaf.ndim))
    assert split > 0  # the check is not vacuous: some teacher parameters are sharded


def test_one_process_feeds_every_row_and_the_batch_lands_in_order():
    mesh = _mesh(2, 2, 2)
    np.testing.assert_array_equal(sharding.host_batch_rows(mesh, 16), np.arange(16))
    local = {"image": np.arange(16 * 3, dtype=np.float32).reshape(16, 3)}
    placed = sharding.global_batch(local, mesh, batch_size=16)["image"]
    for shard in placed.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), local["image"][shard.index])
    with pytest.raises(ValueError, match="not divisible by data\\*fsdp = 4"):
        sharding.global_batch({"image": np.zeros((6, 3))}, mesh, batch_size=6)


def test_mesh_errors_are_one_line():
    config = config_lib.base_config()
    config.mesh.update(data=-1, fsdp=3)
    with pytest.raises(config_lib.ConfigError, match="8 devices are not divisible"):
        sharding.make_mesh(config.mesh)
    config.mesh.update(data=8, fsdp=1, dcn_data=2)
    with pytest.raises(config_lib.ConfigError, match="dcn_data=2 does not match the job"):
        sharding.make_mesh(config.mesh)
    config.mesh.update(data=4, fsdp=2, dcn_data=3)
    with pytest.raises(config_lib.ConfigError, match="dcn_data=3 must divide the data axis"):
        sharding.make_mesh(config.mesh)


class FakeTpuChip:
    """What mesh_utils reads of a TPU device: kind, platform, torus coordinates, slice."""

    def __init__(self, index: int, coords: tuple[int, int, int], slice_index: int = 0):
        self.id, self.coords, self.slice_index = index, coords, slice_index
        self.platform, self.device_kind, self.core_on_chip = "tpu", "TPU v5", 0
        self.process_index = index // 4

    def __repr__(self) -> str:
        return f"chip{self.id}"


def _torus(x: int, y: int, z: int, slice_index: int = 0, start: int = 0) -> list[FakeTpuChip]:
    coords = [(i, j, k) for k in range(z) for j in range(y) for i in range(x)]
    return [FakeTpuChip(start + n, c, slice_index) for n, c in enumerate(coords)]


def test_meshes_that_do_not_follow_the_torus_split_a_physical_axis(caplog):
    """data=8 x fsdp=8 on a 4x4x4 v5p: jax.make_mesh refuses (8 is no product of 4, 4, 4);
    the mesh splits a physical axis instead, with a warning, and holds every chip once."""
    chips = _torus(4, 4, 4)
    with pytest.raises(NotImplementedError):
        jax.make_mesh((8, 8, 1), sharding.MESH_AXES, devices=chips)
    with caplog.at_level("WARNING"):
        grid = sharding.device_grid((8, 8, 1), chips)
    assert grid.shape == (8, 8, 1)
    assert sorted(c.id for c in grid.flat) == list(range(64))
    assert "does not follow the device torus" in caplog.text
    # A mesh that follows the torus is jax.make_mesh's own, without a warning.
    caplog.clear()
    with caplog.at_level("WARNING"):
        grid = sharding.device_grid((4, 16, 1), chips)
    assert not caplog.text
    expected = jax.make_mesh((4, 16, 1), sharding.MESH_AXES, devices=chips).devices
    assert [c.id for c in grid.flat] == [c.id for c in expected.flat]


def test_devices_of_two_slices_need_dcn_data():
    chips = _torus(2, 2, 1, slice_index=0) + _torus(2, 2, 1, slice_index=1, start=4)
    with pytest.raises(config_lib.ConfigError, match=r"span 2 slices .*: set .*dcn_data=2"):
        sharding.device_grid((8, 1, 1), chips)
