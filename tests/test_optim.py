"""Tests for mim_jax/optim.py against independent numpy references.

The schedule reference re-derives timm 0.4.12 `CosineLRScheduler` / SimMIM
`MultiStepLRScheduler` (`_get_lr(t)`) and simulates SimMIM's loop, which sets the lr with
`step_update(t)` after update t. The optimizer reference is PyTorch's AdamW with
`clip_grad_norm_`, written out in float64 numpy.
"""

import bisect
import json
import math
import pathlib
import typing

import helpers
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from mim_jax import config_lib, convert, optim, pytree
from mim_jax.methods import classification
from mim_jax.models import encoders


def _config(**optim_fields) -> ml_collections.ConfigDict:
    c = config_lib.base_config()
    c.batch_size = 2048
    c.optim.update(optim_fields)
    return c


def _timm_lr(t, *, schedule, peak, warmup_lr, min_lr, warmup_t, t_initial, milestones, gamma):
    """timm 0.4.12 `_get_lr(t)` as configured by SimMIM's `build_scheduler`."""
    if t < warmup_t:
        return warmup_lr + t * (peak - warmup_lr) / warmup_t
    if schedule == "cosine":  # warmup_prefix=False, t_mul=1, cycle_limit=1
        cycle = t // t_initial
        if cycle >= 1:
            return min_lr
        t_curr = t - cycle * t_initial
        return min_lr + 0.5 * (peak - min_lr) * (1 + math.cos(math.pi * t_curr / t_initial))
    return peak * gamma ** bisect.bisect_right(milestones, t)


def _simmim_lrs(config, steps_per_epoch, total_steps, num_updates, scale=1.0):
    """The lr each optimizer update uses in SimMIM's training loop (peak lr times `scale`)."""
    o = config.optim
    factor = config.batch_size / o.lr_batch_base
    kw = dict(
        schedule=o.schedule,
        peak=o.base_lr * factor * scale,
        warmup_lr=o.warmup_lr * factor,
        min_lr=o.min_lr * factor,
        warmup_t=int(o.warmup_epochs * steps_per_epoch),
        t_initial=total_steps,
        milestones=[e * steps_per_epoch for e in o.decay_epochs],
        gamma=o.decay_rate,
    )
    # The scheduler's constructor sets warmup_lr_init (or the peak lr without warmup).
    lr = kw["warmup_lr"] if kw["warmup_t"] else kw["peak"]
    used = []
    for t in range(num_updates):
        used.append(lr)  # optimizer.step() with the current lr ...
        lr = _timm_lr(t, **kw)  # ... then lr_scheduler.step_update(t).
    return np.asarray(used)


def _eval(schedule, counts):
    return np.asarray(jax.jit(jax.vmap(schedule))(jnp.asarray(counts, jnp.int32)))


def test_scaled_lrs():
    c = _config(base_lr=2e-4, warmup_lr=1e-6, min_lr=1e-5, lr_batch_base=512)
    np.testing.assert_allclose(optim.scaled_lrs(c), (8e-4, 4e-6, 4e-5), rtol=1e-12)
    c.batch_size = 256
    np.testing.assert_allclose(optim.scaled_lrs(c), (1e-4, 5e-7, 5e-6), rtol=1e-12)


@pytest.mark.parametrize(
    ("fields", "steps_per_epoch", "epochs"),
    [
        (dict(schedule="cosine", warmup_epochs=2.5), 7, 10),  # warmup int(17.5) = 17
        (dict(schedule="cosine", warmup_epochs=0.29), 100, 3),  # int(28.999...) = 28
        (dict(schedule="cosine", warmup_epochs=0.0), 5, 4),
        (dict(schedule="multistep", warmup_epochs=2.0, decay_epochs=(5, 8)), 6, 10),
    ],
)
def test_schedule_matches_simmim_every_step(fields, steps_per_epoch, epochs):
    c = _config(**fields)
    total = epochs * steps_per_epoch
    counts = np.arange(total + 4)  # also past the end: cosine holds the min lr
    ref = _simmim_lrs(c, steps_per_epoch, total, len(counts))
    ours = _eval(optim.learning_rate_schedule(c, steps_per_epoch, total), counts)
    np.testing.assert_allclose(ours, ref, rtol=2e-6)


def test_cosine_schedule_full_scale():
    """Swin-B 100 ep recipe at batch 2048 (625 steps/epoch): warmup, middle, end."""
    c = _config(schedule="cosine", base_lr=2e-4, warmup_lr=1e-6, min_lr=1e-5, warmup_epochs=10)
    spe, total = 625, 100 * 625
    warm = 10 * spe
    counts = [0, 1, 2, 3, warm - 1, warm, warm + 1, warm + 2, total // 2, total - 1, total]
    ref = _simmim_lrs(c, spe, total, total + 1)[counts]
    ours = _eval(optim.learning_rate_schedule(c, spe, total), counts)
    np.testing.assert_allclose(ours, ref, rtol=1e-5)
    # Spot values: first two updates use the warmup lr; cosine is not restarted after warmup.
    np.testing.assert_allclose(ours[:2], 4e-6, rtol=1e-6)
    cos_at_warm = 4e-5 + 0.5 * (8e-4 - 4e-5) * (1 + math.cos(math.pi * warm / total))
    np.testing.assert_allclose(ours[counts.index(warm + 1)], cos_at_warm, rtol=1e-5)


def test_multistep_schedule_milestones():
    """ViT-B 800 ep recipe: x0.1 at epoch 700; the milestone step itself is decayed."""
    c = _config(schedule="multistep", base_lr=1e-4, warmup_lr=5e-7, warmup_epochs=10)
    spe, total = 100, 800 * 100
    m = 700 * spe
    counts = [0, 1, 999, 1000, 1001, 1002, m - 1, m, m + 1, m + 2, total - 1]
    ref = _simmim_lrs(c, spe, total, total)[counts]
    ours = _eval(optim.learning_rate_schedule(c, spe, total), counts)
    np.testing.assert_allclose(ours, ref, rtol=1e-6)
    np.testing.assert_allclose(ours[counts.index(m + 1)], 4e-4 * 0.1, rtol=1e-6)
    np.testing.assert_allclose(ours[counts.index(m)], 4e-4, rtol=1e-6)


def test_multistep_rejects_warmup_past_milestone():
    c = _config(schedule="multistep", warmup_epochs=10, decay_epochs=(5,))
    with pytest.raises(ValueError, match="warmup_epochs"):
        optim.learning_rate_schedule(c, 10, 200)


class _Tiny(nnx.Module):
    """Swin-like parameter names: patch_embed, layers.{s}.blocks.{j}, downsample, norm."""

    def __init__(self, rngs: nnx.Rngs, dim: int = 4):
        self.patch_embed = _linear(3, dim, rngs)
        self.mask_token = nnx.Param(jnp.zeros((1, 1, dim)))
        self.layers = nnx.List([_Stage(rngs, dim, 2, True), _Stage(rngs, dim, 1, False)])
        self.norm = nnx.LayerNorm(dim, rngs=rngs)


class _Stage(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, dim: int, depth: int, downsample: bool):
        self.blocks = nnx.List([_Block(rngs, dim) for _ in range(depth)])
        self.downsample = _linear(dim, dim, rngs, use_bias=False) if downsample else None


class _Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, dim: int):
        self.qkv = _linear(dim, 3 * dim, rngs)
        self.relative_position_bias_table = nnx.Param(jnp.zeros((9, 2)))


def _linear(d_in: int, d_out: int, rngs: nnx.Rngs, use_bias: bool = True) -> nnx.Linear:
    # Zero init, values set in _params(): compiling random initializers takes seconds on CPU.
    return nnx.Linear(d_in, d_out, use_bias=use_bias, kernel_init=nnx.initializers.zeros, rngs=rngs)


def _params() -> nnx.State:
    """The Param state of `_Tiny`, filled with fixed normal values."""
    _, params, _ = nnx.split(_Tiny(nnx.Rngs(0)), nnx.Param, ...)
    rng = np.random.default_rng(1)
    return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.5, x.dtype), params)


def _flat(tree) -> dict[str, typing.Any]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {pytree.param_path(path): leaf for path, leaf in leaves}


def test_param_path():
    names = set(_flat(_params()))
    assert "layers.0.blocks.1.qkv.kernel" in names
    assert "layers.0.downsample.kernel" in names
    assert "mask_token" in names

    class Pair(typing.NamedTuple):
        first: jax.Array
        second: jax.Array

    class Opaque:  # registered without keys: FlattenedIndexKey
        def __init__(self, children):
            self.children = children

    jax.tree_util.register_pytree_node(
        Opaque, lambda o: (o.children, None), lambda _, children: Opaque(children)
    )
    tree = {"a": [Pair(1, 2)], "b": (Opaque([3]),)}
    paths = [pytree.param_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    assert paths == ["a.0.first", "a.0.second", "b.0.0"]


def test_weight_decay_mask_nnx_state():
    keywords = config_lib.base_config().optim.no_decay_keywords
    mask = optim.weight_decay_mask(_params(), keywords)
    assert jax.tree.structure(mask) == jax.tree.structure(_params())
    decayed = {name for name, d in _flat(mask).items() if d}
    assert decayed == {
        "patch_embed.kernel",
        "layers.0.blocks.0.qkv.kernel",
        "layers.0.blocks.1.qkv.kernel",
        "layers.0.downsample.kernel",
        "layers.1.blocks.0.qkv.kernel",
    }
    # Not decayed: biases, LayerNorm, the 3-D mask token and the 2-D bias tables (keywords).
    assert not _flat(mask)["mask_token"]
    assert not _flat(mask)["layers.0.blocks.0.relative_position_bias_table"]


def test_weight_decay_mask_plain_dict():
    params = {
        "proj": {"kernel": np.ones((2, 3)), "bias": np.ones((2, 3))},
        "pos_embed": np.ones((1, 4, 3)),
        "w": np.ones((3, 3)),
        "scale": np.ones(3),
        "token_mixer": np.ones((3, 3)),
    }
    mask = optim.weight_decay_mask(params, ("pos_embed", "token"))
    assert mask == {
        "proj": {"kernel": True, "bias": False},
        "pos_embed": False,
        "w": True,
        "scale": False,
        "token_mixer": False,
    }


def test_layer_ids_swin():
    depths = (2, 2, 6, 2)
    expected = {
        "patch_embed.proj.kernel": 0,
        "patch_embed.norm.scale": 0,
        "mask_token": 0,
        "layers.0.blocks.0.attn.qkv.kernel": 1,
        "layers.0.blocks.1.norm1.bias": 2,
        "layers.0.downsample.reduction.kernel": 2,
        "layers.1.blocks.0.mlp.fc1.kernel": 3,
        "layers.1.downsample.norm.scale": 4,
        "layers.2.blocks.5.attn.relative_position_bias_table": 10,
        "layers.2.downsample.reduction.kernel": 10,
        "layers.3.blocks.0.attn.proj.kernel": 11,
        "layers.3.blocks.1.mlp.fc2.bias": 12,
        "norm.scale": 13,
        "head.kernel": 13,
        "absolute_pos_embed": 13,
    }
    assert {p: optim.layer_ids_swin(p, depths) for p in expected} == expected


def test_layer_ids_vit():
    expected = {
        "cls_token": 0,
        "mask_token": 0,
        "pos_embed": 0,
        "patch_embed.proj.kernel": 0,
        "blocks.0.attn.qkv.kernel": 1,
        "blocks.11.mlp.fc2.bias": 12,
        "rel_pos_bias.relative_position_bias_table": 13,
        "fc_norm.scale": 13,
        "head.kernel": 13,
    }
    assert {p: optim.layer_ids_vit(p, 12) for p in expected} == expected


def _torch_adamw_reference(params, grads_per_step, lrs, wd, decay, clip, b1, b2, eps):
    """PyTorch clip_grad_norm_ + AdamW in float64; `lrs[name][k]` is the lr of update k."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for step, grads in enumerate(grads_per_step, start=1):
        g = {k: np.asarray(x, np.float64) for k, x in grads.items()}
        norm = math.sqrt(sum(float(np.sum(x * x)) for x in g.values()))
        coef = clip / (norm + 1e-6)
        if coef < 1:
            g = {k: x * coef for k, x in g.items()}
        for k in p:
            lr = lrs[k][step - 1]
            p[k] = p[k] * (1 - lr * (wd if decay[k] else 0.0))
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
            denom = np.sqrt(v[k]) / math.sqrt(1 - b2**step) + eps
            p[k] = p[k] - lr / (1 - b1**step) * m[k] / denom
    return p


def _run_optimizer(config, params, grad_scales, spe, total):
    tx, schedule = optim.make_optimizer(config, params, spe, total)
    state = jax.jit(tx.init)(params)

    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    rng = np.random.default_rng(0)
    all_grads, p = [], params
    for scale in grad_scales:
        grads = jax.tree.map(
            lambda x, s=scale: jnp.asarray(rng.normal(size=x.shape) * s, x.dtype), p
        )
        all_grads.append(_flat(grads))
        p, state = step(p, state, grads)
    return p, all_grads, schedule


def test_optimizer_steps_match_torch_adamw():
    c = _config(schedule="cosine", warmup_epochs=1.0, weight_decay=0.05, grad_clip=5.0)
    c.optim.b2 = 0.99  # makes the second moment's bias correction visible over few steps
    params = _params()
    spe, total = 2, 6
    # Global grad norms ~30, ~0.3, ~100, ~10, ~3: clipping active on some updates, not others.
    scales = [5.0, 0.05, 20.0, 2.0, 0.5]
    new_params, grads, _ = _run_optimizer(c, params, scales, spe, total)
    flat = _flat(params)
    lrs = _simmim_lrs(c, spe, total, len(scales))
    decay = _flat(optim.weight_decay_mask(params, c.optim.no_decay_keywords))
    o = c.optim
    ref = _torch_adamw_reference(
        flat, grads, {k: lrs for k in flat}, o.weight_decay, decay, 5.0, o.b1, o.b2, o.eps
    )
    for name, value in _flat(new_params).items():
        np.testing.assert_allclose(value, ref[name], atol=1e-6, rtol=0, err_msg=name)
        assert not np.allclose(value, flat[name], atol=1e-5), name  # every param moved


def test_layer_decay_matches_per_group_timm_lr():
    """SimMIM fine-tuning: group lr = lr * scale in timm 0.4.12; warmup and min lr unscaled."""
    c = _config(schedule="cosine", warmup_epochs=1.0, warmup_lr=5e-5, min_lr=2.5e-5)
    c.optim.layer_decay = 0.5
    c.model = ml_collections.ConfigDict(dict(name="swin", depths=(2, 1)))
    params = _params()
    spe, total = 2, 6
    scales = [5.0, 0.05, 20.0, 2.0, 0.5]
    new_params, grads, schedule = _run_optimizer(c, params, scales, spe, total)
    flat = _flat(params)
    num_layers = 3 + 2
    lrs = {
        k: _simmim_lrs(
            c, spe, total, len(scales), 0.5 ** (num_layers - 1 - optim.layer_ids_swin(k, (2, 1)))
        )
        for k in flat
    }
    assert {optim.layer_ids_swin(k, (2, 1)) for k in flat} == {0, 1, 2, 3, 4}
    decay = _flat(optim.weight_decay_mask(params, c.optim.no_decay_keywords))
    o = c.optim
    ref = _torch_adamw_reference(flat, grads, lrs, o.weight_decay, decay, 5.0, o.b1, o.b2, o.eps)
    for name, value in _flat(new_params).items():
        np.testing.assert_allclose(value, ref[name], atol=1e-6, rtol=0, err_msg=name)
    # The returned schedule is the top layer's (scale 1).
    top = _simmim_lrs(c, spe, total, 8)
    np.testing.assert_allclose(_eval(schedule, np.arange(8)), top, rtol=2e-6)


def test_optimizer_init_is_abstract_friendly():
    """Works on shapes only (jax.eval_shape), as the trainer's abstract init needs."""
    c = _config()
    c.optim.layer_decay = 0.9
    c.model = ml_collections.ConfigDict(dict(name="swin", depths=(2, 1)))
    abstract = jax.eval_shape(_params)
    tx, _ = optim.make_optimizer(c, abstract, 10, 100)
    state = jax.eval_shape(tx.init, abstract)
    assert jax.tree.leaves(state)


def _mae_lr(epoch: float, *, lr: float, min_lr: float, warmup_epochs: float, epochs: float):
    """MAE `util/lr_sched.adjust_learning_rate` for a fractional epoch."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    progress = (epoch - warmup_epochs) / (epochs - warmup_epochs)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


@pytest.mark.parametrize(("warmup_epochs", "min_lr"), [(2.0, 0.0), (0.5, 1e-6)])
def test_half_cosine_matches_mae_lr_sched(warmup_epochs, min_lr):
    """GreenMIM / iTPN pixel recipe: lr = blr * B / 256, set before each update (no lag)."""
    c = _config(
        schedule="half_cosine",
        base_lr=1.5e-4,
        lr_batch_base=256,
        min_lr=min_lr,
        warmup_epochs=warmup_epochs,
    )
    spe, total = 7, 70
    schedule = optim.learning_rate_schedule(c, spe, total)
    lr = 1.5e-4 * 2048 / 256
    want = [
        _mae_lr(t / spe, lr=lr, min_lr=min_lr * 8, warmup_epochs=warmup_epochs, epochs=10)
        for t in range(total + 1)
    ]
    np.testing.assert_allclose(_eval(schedule, np.arange(total + 1)), want, rtol=2e-6, atol=1e-9)
    assert _eval(schedule, [0])[0] == 0.0
    # Past the run the lr holds the min (MAE's formula would rise again).
    np.testing.assert_allclose(_eval(schedule, [total + 5]), [min_lr * 8], atol=1e-9)


def test_half_cosine_run_shorter_than_warmup_stays_in_warmup():
    c = _config(schedule="half_cosine", base_lr=1e-4, lr_batch_base=2048, warmup_epochs=12.0)
    got = _eval(optim.learning_rate_schedule(c, 7, 70), np.arange(71))
    np.testing.assert_allclose(got, 1e-4 * np.arange(71) / 7 / 12, rtol=2e-6)


OFFICIAL_GROUPS = pathlib.Path(__file__).parent / "fixtures" / "simmim_finetune_param_groups.json"


def _groups(config: ml_collections.ConfigDict) -> dict[str, tuple[int, float, float]]:
    """Official PyTorch name -> (layer id, lr scale, weight decay) of our fine-tuning optimizer,
    for the classifier of `config` built abstractly."""
    model = nnx.eval_shape(lambda: classification.build_classifier(config, 1000, nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    ids, scales = optim.layer_scales(config, params)
    decays = optim.weight_decay_mask(params, config.optim.no_decay_keywords)
    table = encoders.TORCH_TABLES[config.model.name]
    flat = [pytree.flatten(nnx.to_pure_dict(t)) for t in (ids, scales, decays)]
    return {
        convert.torch_name(path, table): (
            flat[0][path],
            flat[1][path],
            config.optim.weight_decay if flat[2][path] else 0.0,
        )
        for path in flat[0]
    }


@pytest.mark.parametrize(
    "variant, official",
    [("simmim_swin_base_224", "swin_base_224_w7"), ("simmim_vit_base_224", "vit_base_224")],
)
def test_finetune_param_groups_equal_the_official_ones(variant, official):
    """Every parameter of Swin-B / ViT-B: layer id, lr scale and weight decay as SimMIM's
    `get_finetune_param_groups` (dumped from the official code), through the name tables."""
    want = json.loads(OFFICIAL_GROUPS.read_text())[official]
    c = helpers.load_config("finetune", variant)
    assert c.optim.layer_decay == want["layer_decay"]
    ours = _groups(c)
    assert set(ours) == set(want["params"])
    for name, group in want["params"].items():
        layer_id, scale, decay = ours[name]
        assert layer_id == group["layer_id"], name
        assert scale == pytest.approx(group["lr_scale"], rel=1e-9), name
        assert decay == group["weight_decay"], name


def test_hivit_param_groups_follow_itpn_lr_decay():
    """iTPN-B (blocks: 3 MLP, merge, 3 MLP, merge, 24 attention) by iTPN's `param_groups_lrd`:
    30 non-merge blocks -> num_layers 31, decay 0.6 ** (13 / 31), scale = decay ** (31 - id);
    a merge shares its preceding block's id; no decay on 1-D parameters, the absolute position
    table and relative position tables. Written out by hand."""
    c = helpers.load_config("finetune", "itpn_base")
    decay = 0.6 ** (13 / 31)
    expected_ids = {
        "patch_embed.proj.weight": 0,
        "absolute_pos_embed": 0,
        "blocks.0.mlp.fc1.weight": 1,
        "blocks.2.norm2.bias": 3,
        "blocks.3.reduction.weight": 3,
        "blocks.3.norm.weight": 3,
        "blocks.4.mlp.fc2.weight": 4,
        "blocks.7.reduction.weight": 6,
        "blocks.8.attn.qkv.weight": 7,
        "blocks.8.attn.relative_position_bias_table": 7,
        "blocks.31.mlp.fc2.bias": 30,
        "fc_norm.weight": 31,
        "head.weight": 31,
        "head.bias": 31,
    }
    no_decay = {"absolute_pos_embed", "blocks.8.attn.relative_position_bias_table"}
    ours = _groups(c)
    assert len(ours) == len(set(ours))
    for name, layer_id in expected_ids.items():
        got_id, scale, wd = ours[name]
        assert got_id == layer_id, name
        assert scale == pytest.approx(decay ** (31 - layer_id), rel=1e-9), name
        one_d = name.endswith(("bias", "norm.weight", "norm2.bias")) and "reduction" not in name
        assert wd == (0.0 if name in no_decay or one_d else 0.05), name
