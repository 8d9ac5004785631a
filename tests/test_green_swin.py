"""GreenSwin (SPEC 0, 2.1-2.5): visible-token Swin with grouped window attention.

The reference here is DENSE and written independently of `grouping` and `green_swin`: the
dense Swin's own modules (shared parameters) on the full token grid, the standard window
partition with Swin's cyclic roll and region mask, plus a key mask that blocks attention to
masked tokens, and patch merging on the full grid. At visible positions (raster order) it
must equal the green model, which only ever sees the visible tokens.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mim_jax import grouping, masking
from mim_jax.models import green_swin, layers, swin

# Stage 1 is in 'grouping' mode with a group size that packs several windows per group;
# later stages are in 'masking' mode (one group holding all visible tokens).
CONFIGS = {
    "two_stages": dict(
        model=dict(
            img_size=32, patch_size=4, embed_dim=8, depths=(2, 2), num_heads=(2, 4), window_size=2
        ),
        mask_unit=8,
        mask_ratio=0.5,
        group_size=(6, None),
    ),
    "three_stages": dict(
        model=dict(
            img_size=64,
            patch_size=4,
            embed_dim=8,
            depths=(2, 2, 2),
            num_heads=(1, 2, 2),
            window_size=4,
        ),
        mask_unit=16,
        mask_ratio=0.5,
        group_size=(20, None, None),
    ),
    # The paper's windows: 7 (stage 1 grouping + shifted, stage 2 masking) and 14.
    "window7": dict(
        model=dict(
            img_size=56, patch_size=4, embed_dim=8, depths=(2, 2), num_heads=(2, 2), window_size=7
        ),
        mask_unit=8,
        mask_ratio=0.25,
        group_size=None,
    ),
    "window14": dict(
        model=dict(
            img_size=112, patch_size=4, embed_dim=8, depths=(2, 2), num_heads=(1, 2), window_size=14
        ),
        mask_unit=8,
        mask_ratio=0.25,
        group_size=None,
    ),
}
NUM_MASKS = 2  # Mask groups: examples [0, 2) use mask 0, [2, 4) mask 1.
BATCH = 4


def _model_kwargs(config: dict) -> dict:
    return dict(config["model"], in_chans=3, mlp_ratio=2.0, norm_eps=1e-6)


def _specs(config: dict) -> list:
    m = config["model"]
    return grouping.plan_specs(
        img_size=m["img_size"],
        patch_size=m["patch_size"],
        depths=m["depths"],
        window_size=m["window_size"],
        mask_unit=config["mask_unit"],
        mask_ratio=config["mask_ratio"],
        group_size=config["group_size"],
    )


def _keep_units(config: dict, count: int) -> tuple[np.ndarray, int]:
    grid = config["model"]["img_size"] // config["mask_unit"]
    mask, _ = masking.batchwise_keep(
        0, 3, np.arange(count), num_units=grid**2, mask_ratio=config["mask_ratio"]
    )
    return 1 - mask, grid


class Setup:
    """Dense Swin with random parameters, a GreenSwin sharing them, and a jitted green call."""

    def __init__(self, name: str):
        self.config = config = CONFIGS[name]
        kwargs = _model_kwargs(config)
        dense = nnx.eval_shape(
            lambda: swin.SwinTransformer(**kwargs, use_mask_token=False, rngs=nnx.Rngs(0))
        )
        rng = np.random.default_rng(1)
        state = jax.tree.map(
            lambda s: jnp.asarray(rng.normal(0.0, 0.3, s.shape), s.dtype), nnx.state(dense)
        )
        nnx.update(dense, state)
        green = nnx.eval_shape(lambda: green_swin.GreenSwinTransformer(**kwargs, rngs=nnx.Rngs(0)))
        nnx.update(green, nnx.state(dense))
        self.dense, self.green = dense, green
        self.specs = _specs(config)
        self.keep, self.unit_grid = _keep_units(config, 3)
        size = config["model"]["img_size"]
        self.images = jnp.asarray(
            np.random.default_rng(2).normal(size=(BATCH, size, size, 3)), jnp.float32
        )
        graphdef, green_state = nnx.split(green)
        self.green_state = green_state
        self.green_fn = jax.jit(
            lambda st, images, plans: nnx.merge(graphdef, st)(images, plans, return_stages=True)
        )

    def plans(self, *indices: int) -> tuple[list, dict]:
        """Raw plans of the masks `indices` and their stacked device pytree."""
        raw = [grouping.plan_mask(self.keep[i], self.specs, self.unit_grid) for i in indices]
        return raw, green_swin.stack_plans([green_swin.device_plans(r) for r in raw])


_SETUPS: dict = {}


def _setup(name: str) -> Setup:
    if name not in _SETUPS:
        _SETUPS[name] = Setup(name)
    return _SETUPS[name]


# --- independent dense reference ---------------------------------------------------------------


def _region_mask(resolution: int, window: int, shift: int) -> np.ndarray:
    """Swin's `img_mask` labels on the rolled grid: `[resolution, resolution]`."""
    labels = np.zeros((resolution, resolution), np.int32)
    if shift:
        spans = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
        count = 0
        for rows in spans:
            for cols in spans:
                labels[rows, cols] = count
                count += 1
    return labels


def _windows(x, window: int):
    """`[B, R, R, ...]` -> `[B, nW, window**2, ...]` (raster windows, raster inside)."""
    b, r = x.shape[0], x.shape[1]
    rest = x.shape[3:]
    x = x.reshape(b, r // window, window, r // window, window, *rest)
    x = jnp.moveaxis(x, 2, 3)
    return x.reshape(b, (r // window) ** 2, window * window, *rest)


def _unwindows(x, window: int, resolution: int):
    b, rest = x.shape[0], x.shape[3:]
    n = resolution // window
    x = x.reshape(b, n, n, window, window, *rest)
    x = jnp.moveaxis(x, 3, 2)
    return x.reshape(b, resolution, resolution, *rest)


def _rel_index(window: int) -> np.ndarray:
    ys, xs = np.meshgrid(np.arange(window), np.arange(window), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    dy, dx = ys[:, None] - ys[None], xs[:, None] - xs[None]
    return (dy + window - 1) * (2 * window - 1) + (dx + window - 1)


def _dense_block(block, x, keep, window: int, shift: int, heads: int):
    """x `[B, R, R, C]` full grid; keep `[R, R]` bool (visible tokens)."""
    b, r, _, c = x.shape
    h = block.norm1(x)
    keep = jnp.asarray(keep)
    if shift:
        h = jnp.roll(h, (-shift, -shift), axis=(1, 2))
        keep = jnp.roll(keep, (-shift, -shift), axis=(0, 1))
    labels = _windows(jnp.asarray(_region_mask(r, window, shift))[None], window)[0]
    key_keep = _windows(keep[None], window)[0]  # [nW, w*w]
    allowed = (labels[:, :, None] == labels[:, None, :]) & key_keep[:, None, :]
    table = block.attn.relative_position_bias_table[...]
    bias = jnp.moveaxis(table[_rel_index(window)], -1, 0)  # [heads, w*w, w*w]
    bias = bias[None] + jnp.where(allowed, 0.0, layers.MASK_VALUE)[:, None]  # [nW, heads, ...]
    qkv = _windows(block.attn.qkv(h), window)  # [B, nW, w*w, 3C]
    d = c // heads
    qkv = qkv.reshape(*qkv.shape[:3], 3, heads, d)
    q, k, v = (qkv[:, :, :, i].transpose(0, 1, 3, 2, 4) for i in range(3))  # [B, nW, H, T, d]
    logits = jnp.einsum("bwhqd,bwhkd->bwhqk", q * d**-0.5, k) + bias
    out = jnp.einsum("bwhqk,bwhkd->bwhqd", jax.nn.softmax(logits, axis=-1), v)
    out = block.attn.proj(out.transpose(0, 1, 3, 2, 4).reshape(b, -1, window * window, c))
    h = _unwindows(out, window, r)
    if shift:
        h = jnp.roll(h, (shift, shift), axis=(1, 2))
    x = x + h
    return x + block.mlp(block.norm2(x))


def dense_reference(model, images, keep_units: np.ndarray, unit_grid: int, config: dict):
    """Full-grid stage outputs (before merging) and the final normed output, `[B, R, R, C]`."""
    m = config["model"]
    x = model.patch_embed(images)
    outputs, keeps = [], []
    for i, stage in enumerate(model.layers):
        r = x.shape[1]
        keep = np.kron(keep_units.reshape(unit_grid, unit_grid), np.ones((r // unit_grid,) * 2))
        keep = keep.astype(bool)
        window = min(r, m["window_size"])
        for j, block in enumerate(stage.blocks):
            shift = m["window_size"] // 2 if (j % 2 and r > m["window_size"]) else 0
            x = _dense_block(block, x, keep, window, shift, m["num_heads"][i])
        outputs.append(x)
        keeps.append(keep)
        if stage.downsample is not None:
            cat = [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]]
            x = stage.downsample.norm(jnp.concatenate(cat, axis=-1))
            x = stage.downsample.reduction(x)
    return outputs, model.norm(x), keeps


def _visible(x, keep: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    return x.reshape(x.shape[0], -1, x.shape[-1])[:, keep.reshape(-1)]


# --- tests -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parameter_tree_equals_dense_swin(name):
    s = _setup(name)

    def paths(model):
        return [
            (jax.tree_util.keystr(p), v.shape)
            for p, v in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))
        ]

    assert paths(s.green) == paths(s.dense)
    # Every variable is a parameter, and the full trees (all variable types) agree.
    assert len(paths(s.green)) == len(jax.tree.leaves(nnx.state(s.green)))
    assert jax.tree.structure(nnx.state(s.dense)) == jax.tree.structure(nnx.state(s.green))
    assert any("relative_position_bias_table" in p for p, _ in paths(s.green))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_dense_masked_reference(name):
    """Two mask groups, each checked at every stage against the dense reference of its mask."""
    s = _setup(name)
    raw, plans = s.plans(0, 1)
    stage1 = s.specs[0][0]
    assert stage1.mode == grouping.GROUPING and raw[0][0][0].num_groups_used > 1
    assert len(s.specs[0]) == 2  # Both shift parities are exercised.
    assert all(spec.mode == grouping.MASKING for spec in s.specs[-1])
    out, stages = s.green_fn(s.green_state, s.images, plans)
    assert out.shape == (BATCH, s.specs[-1][0].num_visible, s.green.num_features)
    per_mask = BATCH // NUM_MASKS
    for m in range(NUM_MASKS):
        rows = slice(m * per_mask, (m + 1) * per_mask)
        ref_stages, ref_out, keeps = dense_reference(
            s.dense, s.images[rows], s.keep[m], s.unit_grid, s.config
        )
        for i, (got, want, keep) in enumerate(zip(stages, ref_stages, keeps, strict=True)):
            assert got.shape[1] == s.specs[i][0].num_visible
            np.testing.assert_allclose(
                np.asarray(got[rows]),
                _visible(want, keep),
                rtol=1e-5,
                atol=1e-5,
                err_msg=f"mask {m} stage {i}",
            )
        np.testing.assert_allclose(
            np.asarray(out[rows]), _visible(ref_out, keeps[-1]), rtol=1e-5, atol=1e-5
        )


def test_one_compile_for_different_masks():
    s = _setup("two_stages")
    _, plans0 = s.plans(0, 1)
    _, plans1 = s.plans(2, 0)
    assert not np.array_equal(plans0["visible"], plans1["visible"])
    out0, _ = s.green_fn(s.green_state, s.images, plans0)
    out1, _ = s.green_fn(s.green_state, s.images, plans1)
    assert s.green_fn._cache_size() == 1
    assert not np.allclose(np.asarray(out0), np.asarray(out1))
    # The second call also matches the dense reference (last stage, first mask group).
    _, ref_out, keeps = dense_reference(s.dense, s.images[:2], s.keep[2], s.unit_grid, s.config)
    np.testing.assert_allclose(
        np.asarray(out1[:2]), _visible(ref_out, keeps[-1]), rtol=1e-5, atol=1e-5
    )


def test_plans_need_the_mask_group_axis():
    s = _setup("two_stages")
    single = green_swin.device_plans(grouping.plan_mask(s.keep[0], s.specs, s.unit_grid))
    with pytest.raises(ValueError, match="mask-group axis"):
        s.green(s.images, single)


def test_device_plans_structure_and_merge_order():
    s = _setup("three_stages")
    plans = green_swin.device_plans(grouping.plan_mask(s.keep[0], s.specs, s.unit_grid))
    assert [len(entry["attn"]) for entry in plans["stages"]] == [2, 2, 1]
    assert ["merge" in entry for entry in plans["stages"]] == [True, True, False]
    for i, entry in enumerate(plans["stages"]):
        for spec, attn in zip(s.specs[i], entry["attn"], strict=True):
            g, G, n = spec.group_size, spec.num_groups, spec.num_visible
            assert attn["gather"].shape == (G * g,) and attn["slot_of_token"].shape == (n,)
            assert attn["slot_window"].shape == attn["slot_pos"].shape == (G, g)
    # Merge indices: sub-token (2r + dy, 2c + dx) in Swin order (0,0), (1,0), (0,1), (1,1).
    for i in range(2):
        fine = grouping.visible_coords(s.keep[0], s.unit_grid, s.specs[i][0].resolution)
        coarse = grouping.visible_coords(s.keep[0], s.unit_grid, s.specs[i + 1][0].resolution)
        got = fine[plans["stages"][i]["merge"]]  # [N_next, 4, 2]
        want = 2 * coarse[:, None] + np.array([(0, 0), (1, 0), (0, 1), (1, 1)])
        np.testing.assert_array_equal(got, want)
    r = s.specs[0][0].resolution
    coords = grouping.visible_coords(s.keep[0], s.unit_grid, r)
    np.testing.assert_array_equal(plans["visible"], coords[:, 0] * r + coords[:, 1])
    stacked = green_swin.stack_plans([plans, plans])
    shifted = plans["stages"][0]["attn"][1]["slot_window"]
    assert stacked["stages"][0]["attn"][1]["slot_window"].shape == (2, *shifted.shape)


def test_reference_without_mask_is_dense_swin():
    """Sanity check of the reference itself: nothing masked -> the dense Swin's output."""
    s = _setup("two_stages")
    keep = np.ones_like(s.keep[0])
    _, ref_out, _ = dense_reference(s.dense, s.images, keep, s.unit_grid, s.config)
    np.testing.assert_allclose(
        np.asarray(ref_out), np.asarray(s.dense(s.images)), rtol=1e-5, atol=1e-5
    )


def test_gradients_are_finite():
    """Pad slots (fully masked rows) give finite values and no NaN gradients."""
    s = _setup("two_stages")
    _, plans = s.plans(0, 1)
    graphdef = nnx.graphdef(s.green)

    def loss(state):
        return jnp.sum(nnx.merge(graphdef, state)(s.images, plans) ** 2)

    grads = jax.jit(jax.grad(loss))(s.green_state)
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.isfinite(g).all()) for g in leaves)
    table = grads["layers"][0]["blocks"][0]["attn"]["relative_position_bias_table"]
    assert float(jnp.abs(table[...]).sum()) > 0


@pytest.mark.parametrize("patch", ["permute_tokens", "grouped_core", "both"])
def test_hand_written_backwards_equal_autodiff(monkeypatch, patch):
    """`permute_tokens`'s gather-only backward and `grouped_core`'s backward (unpadded
    residuals, q/k/v gathered again) equal autodiff through plain gathers (scatter-add) and
    plain attention for every parameter, with two mask groups and pad slots."""
    s = _setup("two_stages")
    _, plans = s.plans(0, 1)
    graphdef = nnx.graphdef(s.green)

    def grads():
        def loss(state):
            out, stages = nnx.merge(graphdef, state)(s.images, plans, return_stages=True)
            return jnp.sum(out**2) + sum(jnp.sum(jnp.sin(x)) for x in stages)

        return jax.grad(loss)(s.green_state)

    fast = grads()
    if patch in ("permute_tokens", "both"):
        monkeypatch.setattr(
            green_swin, "permute_tokens", lambda x, index, *_: green_swin.take_tokens(x, index)
        )
    if patch in ("grouped_core", "both"):
        monkeypatch.setattr(
            green_swin,
            "grouped_core",
            lambda qkv, bias, gather, slots, valid, heads: green_swin._core_forward(
                qkv, bias, gather, slots, heads
            )[0],
        )
    reference = grads()
    for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(reference), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("dtype", "atol"), [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_grouped_core_backward_matches_autodiff(dtype, atol):
    """`grouped_core`'s hand-written backward gives autodiff's qkv and bias gradients (autodiff
    through the same forward), in float32 and bfloat16, on a grouping-stage plan with pads."""
    s = _setup("two_stages")
    _, plans = s.plans(0, 1)
    plan = plans["stages"][0]["attn"][0]
    num_masks, num_groups, g = plan["slot_window"].shape
    assert (plan["slot_window"] < 0).any()  # pad slots present
    heads, dim = 2, 8
    rng = np.random.default_rng(3)
    qkv = jnp.asarray(rng.normal(size=(BATCH, plan["slot_of_token"].shape[1], 3 * heads * dim)))
    qkv = qkv.astype(dtype)
    mask = grouping.group_attention_mask(jnp.asarray(plan["slot_window"]))
    bias = jnp.asarray(rng.normal(size=(num_masks, num_groups, heads, g, g)), jnp.float32)
    bias = bias + jnp.where(mask, 0.0, layers.MASK_VALUE)[:, :, None]
    valid = jnp.asarray(plan["slot_window"].reshape(num_masks, -1) >= 0)
    index = (jnp.asarray(plan["gather"]), jnp.asarray(plan["slot_of_token"]))
    weights = jnp.asarray(rng.normal(size=(BATCH, qkv.shape[1], heads * dim)), jnp.float32)

    def loss(core, qkv, bias):
        out = core(qkv, bias, *index, valid, heads).astype(jnp.float32)
        return jnp.sum(jnp.sin(out) * weights)

    def autodiff_core(qkv, bias, gather, slots, valid, heads):
        return green_swin._core_forward(qkv, bias, gather, slots, heads)[0]

    ours = jax.grad(lambda q, b: loss(green_swin.grouped_core, q, b), argnums=(0, 1))(qkv, bias)
    ref = jax.grad(lambda q, b: loss(autodiff_core, q, b), argnums=(0, 1))(qkv, bias)
    for a, b in zip(ours, ref, strict=True):
        assert a.dtype == b.dtype
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(a, b, atol=atol * np.abs(b).max(), rtol=0)
