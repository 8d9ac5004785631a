"""The train loop: sharded steps equal the single-device step, one compilation, exact resume
after an interruption, and no checkpoint of a non-finite state."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import load_config, tiny_simmim_config

from mim_jax import checkpoint, evaluate, nonfinite, pytree, sharding, train
from mim_jax.data import input as data_input
from mim_jax.methods import simmim


def _host_batch(config, step: int = 0) -> dict[str, np.ndarray]:
    batches = data_input.make_pretrain_iterator(
        config, start_step=step, batch_transform=simmim.make_batch_transform(config)
    )
    batch = next(batches)
    batches.close()
    return {k: v for k, v in batch.items() if k not in train.HOST_ONLY_KEYS}


def _mesh(data: int, fsdp: int, tensor: int, devices=None):
    config = tiny_simmim_config()
    config.mesh.update(data=data, fsdp=fsdp, tensor=tensor)
    return sharding.make_mesh(config.mesh, devices)


def _one_step(mesh, batch):
    config = tiny_simmim_config()
    s = train.setup(config, mesh, num_examples=64)
    with jax.set_mesh(mesh):
        state, metrics = s.train_step(s.init_state(), sharding.global_batch(batch, mesh))
    return state, jax.device_get(metrics)


@pytest.fixture(scope="module")
def single_device_step():
    batch = _host_batch(tiny_simmim_config())
    state, metrics = _one_step(_mesh(1, 1, 1, jax.devices()[:1]), batch)
    return batch, jax.device_get(nnx.to_pure_dict(state.params)), metrics


@pytest.mark.parametrize(
    "shape, sharded_axis",
    [((8, 1, 1), None), ((1, 8, 1), "fsdp"), ((2, 2, 2), "tensor")],
    ids=["data8", "fsdp8", "data2_fsdp2_tensor2"],
)
def test_sharded_step_equals_single_device(single_device_step, shape, sharded_axis):
    batch, ref_params, ref_metrics = single_device_step
    state, metrics = _one_step(_mesh(*shape), batch)
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=1e-5)
    params = jax.device_get(nnx.to_pure_dict(state.params))
    for path, value in pytree.flatten(params).items():
        np.testing.assert_allclose(value, pytree.flatten(ref_params)[path], atol=1e-5, err_msg=path)

    fc1 = state.params["encoder"]["layers"][0]["blocks"][0]["mlp"]["fc1"]["kernel"][...]
    assert len(fc1.sharding.device_set) == 8
    if sharded_axis is not None:
        spec = fc1.sharding.spec
        assert sharded_axis in jax.tree.leaves(tuple(spec)), spec
        assert fc1.addressable_shards[0].data.size < fc1.size
    adam = state.opt_state[1][0]
    adam_mu = adam.mu["encoder"]["layers"][0]["blocks"][0]["mlp"]["fc1"]["kernel"][...]
    assert adam_mu.sharding == fc1.sharding


def test_no_recompilation_across_steps():
    config = tiny_simmim_config()
    config.model.drop_path_rate = 0.1  # The dropout RNG path must trace inside the grad too.
    mesh = sharding.make_mesh(config.mesh)
    s = train.setup(config, mesh, num_examples=64)
    batches = data_input.make_pretrain_iterator(
        config, batch_transform=simmim.make_batch_transform(config)
    )
    state = s.init_state()
    masks = []
    with jax.set_mesh(mesh):
        for _ in range(20):
            host = {k: v for k, v in next(batches).items() if k not in train.HOST_ONLY_KEYS}
            masks.append(host["mask"])
            state, _ = s.train_step(state, sharding.global_batch(host, mesh))
    batches.close()
    assert int(state.step) == 20
    assert len({m.tobytes() for m in masks}) == 20  # every step really saw new masks
    assert s.train_step._cache_size() == 1


class _InterruptedError(Exception):
    pass


def _interrupt_after(monkeypatch, stop_step: int):
    """Makes the data pipeline fail when batch `stop_step` (0-based) is requested."""
    real = data_input.make_pretrain_iterator

    def fake(config, *, start_step=0, **kwargs):
        inner = real(config, start_step=start_step, **kwargs)

        class Iterator:
            def __init__(self):
                self.step = start_step

            def __next__(self):
                if self.step == stop_step:
                    raise _InterruptedError(f"killed before step {stop_step}")
                self.step += 1
                return next(inner)

            def close(self):
                inner.close()

        return Iterator()

    monkeypatch.setattr(data_input, "make_pretrain_iterator", fake)


def _restore_params(workdir: str, config) -> dict:
    mesh = sharding.make_mesh(config.mesh)
    s = train.setup(config, mesh, num_examples=64)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=5)
    state = ckpt.restore(ckpt.latest_step(), s.abstract_state)
    ckpt.close()
    return int(state.step), jax.device_get(nnx.to_pure_dict(state.params))


def test_resume_after_interruption_is_exact(tmp_path, monkeypatch):
    n = 3
    config = tiny_simmim_config(total_steps=2 * n, checkpoint_every_steps=n)
    straight = train.train(config, str(tmp_path / "straight"))

    with monkeypatch.context() as m:
        _interrupt_after(m, n)
        with pytest.raises(_InterruptedError):
            train.train(config, str(tmp_path / "resumed"))
    first = _restore_params(str(tmp_path / "resumed"), config)
    assert first[0] == n
    resumed = train.train(config, str(tmp_path / "resumed"))

    assert sorted(resumed) == list(range(n + 1, 2 * n + 1))
    for step in range(n + 1, 2 * n + 1):
        assert resumed[step]["loss"] == straight[step]["loss"], step
    step_a, params_a = _restore_params(str(tmp_path / "straight"), config)
    step_b, params_b = _restore_params(str(tmp_path / "resumed"), config)
    assert step_a == step_b == 2 * n
    jax.tree.map(np.testing.assert_array_equal, params_a, params_b)


def test_non_finite_loss_never_reaches_a_checkpoint(tmp_path, monkeypatch):
    config = tiny_simmim_config(total_steps=8, checkpoint_every_steps=2, log_every_steps=100)
    real = data_input.make_pretrain_iterator

    def poisoned(config, *, start_step=0, **kwargs):
        inner = real(config, start_step=start_step, **kwargs)

        class Iterator:
            step = start_step

            def __next__(self):
                batch = next(inner)
                self.step += 1
                if self.step == 5:
                    batch = {**batch, "image": np.full_like(batch["image"], np.nan)}
                return batch

            def close(self):
                inner.close()

        return Iterator()

    monkeypatch.setattr(data_input, "make_pretrain_iterator", poisoned)
    with pytest.raises(nonfinite.NonFiniteLossError, match="at step 5"):
        train.train(config, str(tmp_path))
    step, params = _restore_params(str(tmp_path), config)
    assert step == 4
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_restore_with_other_shapes_fails_with_one_line(tmp_path):
    config = tiny_simmim_config(total_steps=1)
    train.train(config, str(tmp_path))
    bigger = tiny_simmim_config(total_steps=2)
    bigger.model.embed_dim = 32
    with pytest.raises(checkpoint.CheckpointMismatchError, match="does not match the config") as e:
        train.train(bigger, str(tmp_path))
    assert "\n" not in str(e.value)


def test_knn_monitor_during_pretraining(tmp_path):
    """`eval.knn_every_steps`: the current encoder's kNN top-1 on the labeled split, logged and
    in eval_results.json, equal to a kNN job on the saved checkpoint."""
    config = tiny_simmim_config(total_steps=2, checkpoint_every_steps=2)
    config.eval.update(knn_every_steps=2, batch_size=16, max_train_examples=48)
    config.eval.max_val_examples = 40
    train.train(config, str(tmp_path / "run"))
    monitored = json.loads((tmp_path / "run" / "eval_results.json").read_text())
    assert set(monitored) == {"knn_top1", "knn_top5"}

    job = load_config("evaluate", "knn")
    job.model = config.model
    job.data.update(num_examples=config.data.num_examples)
    job.eval.update(batch_size=16, max_train_examples=48, max_val_examples=40)
    job.init_from = str(tmp_path / "run")
    assert evaluate.run(job, str(tmp_path / "job")) == monitored
