"""Gradient accumulation (`config.accum_steps`) and block rematerialization (`config.remat`):
k micro-batches of b rows give the loss and update of one step at batch k*b, on 8 devices and
one, with one compilation and no batch moved between devices; remat leaves loss and gradients
unchanged, wraps every block, and lowers the compiled temp memory."""

import functools
import re

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import load_config, tiny_greenmim_config, tiny_simmim_config
from test_classification import tiny_finetune_config
from test_itpn import tiny_config as tiny_itpn_config

from mim_jax import config_lib, pytree, sharding, train
from mim_jax.data import input as data_input
from mim_jax.methods import get_method

# Collectives that would move batch rows between devices (parameters are replicated on a
# data-only mesh, so a correct split needs none of them).
MOVES = ("all-gather", "all-to-all", "collective-permute")


def _config(kind: str, **overrides):
    if kind == "simmim":
        c = tiny_simmim_config(**overrides)
    elif kind == "greenmim":
        c = tiny_greenmim_config(**{"mask.groups": 8, **overrides})
    else:
        c = tiny_finetune_config(**{"mixup.prob": 0.0, **overrides})
    c.model.drop_path_rate = 0.0  # Micro-batches draw other drop-path bits than the full batch.
    return c


def _steps(config, mesh, num_steps: int = 1, init: train.TrainState | None = None):
    """`num_steps` train steps from `init` (host arrays; else the config's own init): the
    initial state, the first step's metrics and params, its compiled HLO text and the jit
    cache size after all steps."""
    s = train.setup(config, mesh, num_examples=64)
    method = get_method(config.method)
    batches = data_input.make_pretrain_iterator(
        config, batch_transform=method.make_batch_transform(config, mesh)
    )
    shardings = jax.tree.map(lambda x: x.sharding, s.abstract_state)
    with jax.set_mesh(mesh):
        state = s.init_state() if init is None else jax.device_put(init, shardings)
        out = {"init": jax.device_get(state)}
        for step in range(num_steps):
            host = {k: v for k, v in next(batches).items() if k not in train.HOST_ONLY_KEYS}
            batch = s.place_batch(host)
            if step == 0:
                out["hlo"] = s.train_step.lower(state, batch).compile().as_text()
            state, metrics = s.train_step(state, batch)
            if step == 0:
                out["metrics"] = jax.device_get(metrics)
                out["params"] = pytree.flatten(jax.device_get(nnx.to_pure_dict(state.params)))
    batches.close()
    out["cache_size"] = s.train_step._cache_size()
    return out


@functools.cache
def _full_batch_step(kind: str) -> dict:
    """One step at batch 16 on the 8-device data mesh: the reference of every accumulation."""
    return _steps(_config(kind), sharding.make_mesh(_config(kind).mesh))


@pytest.mark.parametrize(
    "kind, devices",
    [("simmim", 8), ("simmim", 1), ("greenmim", 8), ("greenmim", 1), ("classification", 8)],
)
def test_accumulation_equals_one_full_batch_step(kind, devices):
    """Batch 16 as 2 micro-batches of 8 vs one step at 16 (8 devices): the same loss (the mean
    of the micro-batch losses; SimMIM's per-micro-batch L1 normalization matches because every
    image masks the same number of patches), gradient norm and updated parameters, on 8
    devices and on one; compiled once, and the split moves no rows between devices (no
    collective beyond the full step's in the HLO)."""
    full = _full_batch_step(kind)
    config = _config(kind, accum_steps=2)
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:devices])
    accum = _steps(config, mesh, num_steps=2 if devices > 1 else 1, init=full["init"])
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(accum["metrics"][key], full["metrics"][key], rtol=1e-5)
    for path, value in full["params"].items():
        np.testing.assert_allclose(accum["params"][path], value, atol=1e-5, err_msg=path)
    assert "while" in accum["hlo"] and "while" not in full["hlo"]  # Really scanned.
    if devices > 1:
        assert accum["cache_size"] == 1
        for op in MOVES:  # GreenMIM's full step already gathers some int32 indices.
            count = [len(re.findall(rf"\b{op}(-start)?\(", r["hlo"])) for r in (accum, full)]
            assert count[0] <= count[1], (op, count)


@pytest.mark.parametrize(
    "kind, overrides, message",
    [
        ("simmim", {"accum_steps": 4}, "split evenly over data"),
        ("greenmim", {"accum_steps": 2, "mask.groups": 16}, "whole mask groups"),
    ],
)
def test_micro_batches_that_cannot_split_are_one_line_errors(kind, overrides, message):
    config = _config(kind, **overrides)
    mesh = sharding.make_mesh(config.mesh)
    s = train.setup(config, mesh, num_examples=64)
    batches = data_input.make_pretrain_iterator(
        config, batch_transform=s.method.make_batch_transform(config, mesh)
    )
    host = {k: v for k, v in next(batches).items() if k not in train.HOST_ONLY_KEYS}
    batches.close()
    with jax.set_mesh(mesh), pytest.raises(config_lib.ConfigError, match=message) as e:
        s.train_step.lower(s.abstract_state, s.place_batch(host))
    assert "\n" not in str(e.value)


# --- rematerialization ---------------------------------------------------------------------------


def _remat_case(kind: str):
    """(config, batch of 4 images with the method's host-side fields, expected wrapped block
    calls) of a tiny model of each encoder/decoder family, drop path on."""
    if kind == "itpn":
        c = tiny_itpn_config(**{"mfm.teacher": "none"})  # The teacher is never rematerialized.
        blocks = 2 * c.model.mlp_depth + c.model.depth + 2 * c.model.fpn_depth + 3
        blocks += c.decoder.depth
    elif kind == "greenmim":
        c = tiny_greenmim_config(**{"mask.groups": 2, "batch_size": 4})
        blocks = sum(c.model.depths) + c.decoder.depth
    else:
        c = tiny_simmim_config()
        if kind == "vit":
            c.model = load_config("simmim", "vit_base_224").model
            c.model.update(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2)
        blocks = c.model.depth if kind == "vit" else sum(c.model.depths)
    c.model.drop_path_rate = 0.2
    size = c.model.img_size
    images = np.random.default_rng(0).normal(size=(4, size, size, 3)).astype(np.float32)
    host = {"image": images, "index": np.arange(4)}
    batch = get_method(c.method).make_batch_transform(c)(host, 0)
    batch = jax.tree.map(jnp.asarray, {k: v for k, v in batch.items() if k != "index"})
    return c, batch, blocks


def _count_remat(jaxpr) -> int:
    """Rematerialized calls (remat.checkpoint's custom_vjp) in a jaxpr, not counting nested
    ones."""
    count = 0
    for eqn in jaxpr.eqns:
        call = eqn.params.get("call_jaxpr")
        if call is not None and call.jaxpr.debug_info.func_name == "rematerialized":
            count += 1
            continue
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            count += _count_remat(sub)
    return count


def _loss_and_grads(config, batch, mode: str):
    """Compiled loss and gradients (drop path on) of the method's model with `remat=mode`, the
    forward's rematerialized block count and the executable's temp bytes."""
    config = config.copy_and_resolve_references()
    config.remat = mode
    method = get_method(config.method)
    model = method.build_model(config, nnx.Rngs(params=0))  # Same parameters for every mode.
    graphdef, params = nnx.split(model, nnx.Param)
    kwargs = {}
    if train.has_teacher(method):
        kwargs["teacher"] = method.build_teacher(config, nnx.Rngs(params=1))

    def loss(params):
        rngs = nnx.Rngs(dropout=3)
        return method.loss_fn(nnx.merge(graphdef, params), batch, rngs, **kwargs)[0]

    blocks = _count_remat(jax.make_jaxpr(loss)(params).jaxpr)
    compiled = jax.jit(jax.value_and_grad(loss)).lower(params).compile()
    value, grads = compiled(params)
    temp = compiled.memory_analysis().temp_size_in_bytes
    return float(value), pytree.flatten(jax.device_get(nnx.to_pure_dict(grads))), blocks, temp


@pytest.mark.parametrize("kind", ["swin", "vit", "greenmim", "itpn"])
def test_remat_keeps_loss_and_gradients_and_saves_memory(kind):
    """remat=full and dots wrap every encoder / pyramid / decoder block, through the
    hand-written custom_vjp layers, with the loss and gradients of remat=none (drop path on:
    the recomputation draws the same bits); the compiled temp memory drops, most with full."""
    config, batch, num_blocks = _remat_case(kind)
    ref_loss, ref_grads, blocks, ref_temp = _loss_and_grads(config, batch, "none")
    assert blocks == 0
    temps = {}
    for mode in ("full", "dots"):
        loss, grads, blocks, temps[mode] = _loss_and_grads(config, batch, mode)
        assert blocks == num_blocks
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
        for path, value in ref_grads.items():
            np.testing.assert_allclose(grads[path], value, atol=1e-6, rtol=1e-6, err_msg=path)
    assert temps["full"] < temps["dots"] < ref_temp, (temps, ref_temp)
