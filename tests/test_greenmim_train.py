"""GreenMIM in the train loop: mask groups sharded like the batch equal a single-device run,
one compilation over 50 steps of different masks, exact resume, reconstructions."""

import os

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import tiny_greenmim_config
from test_train import _interrupt_after, _InterruptedError

from mim_jax import checkpoint, config_checks, config_lib, pytree, sharding, train
from mim_jax.data import input as data_input
from mim_jax.methods import greenmim


def _host_batch(config, mesh, step: int = 0) -> dict:
    batches = data_input.make_pretrain_iterator(
        config, start_step=step, batch_transform=greenmim.make_batch_transform(config, mesh)
    )
    batch = next(batches)
    batches.close()
    return {k: v for k, v in batch.items() if k not in train.HOST_ONLY_KEYS}


def _one_step(config, mesh):
    s = train.setup(config, mesh, num_examples=64)
    batch = _host_batch(config, mesh)
    with jax.set_mesh(mesh):
        placed = s.place_batch(batch)
        state, metrics = s.train_step(s.init_state(), placed)
    return batch, placed, jax.device_get(nnx.to_pure_dict(state.params)), jax.device_get(metrics)


@pytest.mark.parametrize("groups, plans_sharded", [(16, True), (2, False)], ids=["16", "2"])
def test_sharded_mask_groups_equal_single_device(groups, plans_sharded):
    """8 devices (plans split like the batch, or replicated when 8 does not divide the group
    count) vs one device with the same mask groups: same masks, loss and updated params."""
    config = tiny_greenmim_config(**{"mask.groups": groups})
    one = sharding.make_mesh(config.mesh, jax.devices()[:1])
    eight = sharding.make_mesh(config.mesh)
    ref_batch, _, ref_params, ref_metrics = _one_step(config, one)
    batch, placed, params, metrics = _one_step(config, eight)
    np.testing.assert_array_equal(batch["unit_mask"], ref_batch["unit_mask"])
    masks = batch["unit_mask"].reshape(groups, -1, batch["unit_mask"].shape[-1])
    assert (masks == masks[:, :1]).all()  # Batch-wise within a group ...
    assert len({m.tobytes() for m in masks[:, 0]}) == groups  # ... distinct across groups.
    plan_leaf = jax.tree.leaves(placed["plans"])[0]
    assert plan_leaf.shape[0] == groups
    assert sharding.mask_groups_sharded(groups, eight) == plans_sharded
    shard_rows = {s.data.shape[0] for s in plan_leaf.addressable_shards}
    assert shard_rows == ({groups // 8} if plans_sharded else {groups})
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], atol=1e-5, rtol=0)
    flat_ref = pytree.flatten(ref_params)
    for path, value in pytree.flatten(params).items():
        np.testing.assert_allclose(value, flat_ref[path], atol=1e-5, err_msg=path)


def test_mask_groups_must_divide_the_batch():
    config = tiny_greenmim_config(**{"mask.groups": 3})
    with pytest.raises(Exception, match="divisible by the mask groups"):
        train.setup(config, sharding.make_mesh(config.mesh), num_examples=64)


def test_per_stage_group_counts_from_the_config():
    config = tiny_greenmim_config(**{"mask.num_groups": (3, 0)})
    specs = greenmim.plan_specs_from_config(config)
    assert specs[0][0].num_groups == 3 and specs[1][0].num_groups == 1
    config_checks.validate(config)
    config.mask.num_groups = (3, 0, 0)
    with pytest.raises(config_lib.ConfigError, match="one value >= 0 per stage"):
        config_checks.validate(config)


def test_decoder_needs_a_block():
    config = tiny_greenmim_config(**{"decoder.depth": 0})
    with pytest.raises(config_lib.ConfigError, match=r"config.decoder: depth=0 must be >= 1"):
        config_checks.validate(config)


def test_one_compilation_over_50_steps_of_different_masks():
    config = tiny_greenmim_config(total_steps=50)
    config.model.drop_path_rate = 0.1
    mesh = sharding.make_mesh(config.mesh)
    s = train.setup(config, mesh, num_examples=64)
    batches = data_input.make_pretrain_iterator(
        config, batch_transform=greenmim.make_batch_transform(config, mesh)
    )
    state = s.init_state()
    visible = set()
    with jax.set_mesh(mesh):
        for _ in range(50):
            host = {k: v for k, v in next(batches).items() if k not in train.HOST_ONLY_KEYS}
            visible.add(host["plans"]["visible"].tobytes())
            state, metrics = s.train_step(state, s.place_batch(host))
    batches.close()
    assert int(state.step) == 50 and np.isfinite(float(metrics["loss"]))
    assert len(visible) == 50  # Every step saw new masks (and new plans) ...
    assert s.train_step._cache_size() == 1  # ... with one compiled step.


def _restore(workdir: str, config):
    s = train.setup(config, sharding.make_mesh(config.mesh), num_examples=64)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=5)
    state = ckpt.restore(ckpt.latest_step(), s.abstract_state)
    ckpt.close()
    return int(state.step), jax.device_get(nnx.to_pure_dict(state.params))


def test_resume_after_interruption_is_exact_and_writes_images(tmp_path, monkeypatch):
    n = 3
    config = tiny_greenmim_config(total_steps=2 * n, checkpoint_every_steps=n, image_every_steps=n)
    straight = train.train(config, str(tmp_path / "straight"))
    with monkeypatch.context() as m:
        _interrupt_after(m, n)
        with pytest.raises(_InterruptedError):
            train.train(config, str(tmp_path / "resumed"))
    resumed = train.train(config, str(tmp_path / "resumed"))
    assert sorted(resumed) == list(range(n + 1, 2 * n + 1))
    for step in resumed:
        assert resumed[step]["loss"] == straight[step]["loss"], step
        assert resumed[step]["mask_redraws"] == 0
    step_a, params_a = _restore(str(tmp_path / "straight"), config)
    step_b, params_b = _restore(str(tmp_path / "resumed"), config)
    assert step_a == step_b == 2 * n
    jax.tree.map(np.testing.assert_array_equal, params_a, params_b)
    for step in (n, 2 * n):
        assert (tmp_path / "straight" / "reconstructions" / f"step_{step:08d}.png").exists()
