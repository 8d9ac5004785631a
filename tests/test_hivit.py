"""HiViT (SPEC 3.1): token dropping is exact, early stages are local, merge order, variants.

The reference is a dense float64 numpy HiViT written here from the SPEC: the stride-4 conv as
a matmul over 4x4 pixel patches on the whole image, every main patch through stages 1-2, and
stage-3 attention over all patches with a key mask that blocks the removed ones (plus the full
relative position bias). The library instead drops removed patches before the conv.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import special

from mim_jax import convert, pytree
from mim_jax.models import heads, hivit, layers

IMG, PATCH, GRID = 64, 16, 4


def _np(param) -> np.ndarray:
    return np.asarray(param[...], np.float64)


def _random(ctor, seed: int = 1, scale: float = 0.3):
    """`ctor()` built abstractly with random normal parameters (bias tables included)."""
    graphdef, state = nnx.split(nnx.eval_shape(ctor))
    rng = np.random.default_rng(seed)
    state = jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, scale, s.shape), s.dtype), state)
    return nnx.merge(graphdef, state)


TINY = dict(img_size=IMG, embed_dim=32, mlp_depth=2, depth=2, num_heads=2, rpe=True)


def _tiny(**kw) -> hivit.HiViT:
    return _random(lambda: hivit.HiViT(**{**TINY, **kw}, rngs=nnx.Rngs(0)))


@nnx.jit
def _call(model, images, ids_keep):
    return model(images, ids_keep)


def _images(seed: int, batch: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, IMG, IMG, 3)).astype(np.float32)


def _ids_keep(seed: int, batch: int = 2, keep: int = 5) -> np.ndarray:
    """Per-sample kept main patches in shuffled (not raster) order, as MAE's ids_shuffle."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(GRID * GRID)[:keep] for _ in range(batch)]).astype(np.int32)


# --- dense numpy reference -----------------------------------------------------------------------


def np_layer_norm(x, norm):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + norm.epsilon) * _np(norm.scale) + _np(norm.bias)


def np_linear(x, linear):
    y = x @ _np(linear.kernel)
    return y + _np(linear.bias) if linear.bias is not None else y


def np_mlp(x, mlp):
    h = np_linear(x, mlp.fc1)
    return np_linear(0.5 * h * (1 + special.erf(h / np.sqrt(2))), mlp.fc2)


def np_merge(x, merge):
    x = np.concatenate(
        [
            x[..., 0::2, 0::2, :],
            x[..., 1::2, 0::2, :],
            x[..., 0::2, 1::2, :],
            x[..., 1::2, 1::2, :],
        ],
        axis=-1,
    )
    return np_linear(np_layer_norm(x, merge.norm), merge.reduction)


def np_rel_index(grid):
    ys, xs = np.divmod(np.arange(grid * grid), grid)
    return (ys[:, None] - ys[None] + grid - 1) * (2 * grid - 1) + (
        xs[:, None] - xs[None] + grid - 1
    )


def np_attention(x, attn, keep):
    """Global attention over all patches; keys of removed patches (keep False) are blocked."""
    b, n, c = x.shape
    heads = attn.num_heads
    qkv = np_linear(x, attn.qkv).reshape(b, n, 3, heads, c // heads).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv
    logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(c // heads)
    if attn.relative_position_bias_table is not None:
        table = _np(attn.relative_position_bias_table)
        logits = logits + table[np_rel_index(GRID)].transpose(2, 0, 1)[None]
    logits = np.where(keep[:, None, None, :], logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np_linear((weights @ v).transpose(0, 2, 1, 3).reshape(b, n, c), attn.proj)


def np_hivit(model, images, keep):
    """Dense HiViT on every main patch: (stage 1, stage 2, stage 3), `[B, N, ...]`."""
    x = images.astype(np.float64)
    b, h, w, c = x.shape
    q = PATCH // 4
    pixels = x.reshape(b, h // q, q, w // q, q, c).transpose(0, 1, 3, 2, 4, 5)
    conv = model.patch_embed.proj
    y = pixels.reshape(b, h // q, w // q, q * q * c) @ _np(conv.kernel).reshape(q * q * c, -1)
    y = y + _np(conv.bias)
    y = y.reshape(b, GRID, 4, GRID, 4, -1).transpose(0, 1, 3, 2, 4, 5)
    y = np_layer_norm(y.reshape(b, GRID * GRID, 4, 4, -1), model.patch_embed.norm)
    features = []
    bridge = 2 * model.mlp_depth + 2
    for block in model.blocks[:bridge]:
        if isinstance(block, hivit.PatchMerge):
            features.append(y)
            y = np_merge(y, block)
        else:
            y = y + np_mlp(np_layer_norm(y, block.norm2), block.mlp)
    y = y[:, :, 0, 0] + _np(model.absolute_pos_embed)[None]
    for block in model.blocks[bridge:]:
        y = y + np_attention(np_layer_norm(y, block.norm1), block.attn, keep)
        y = y + np_mlp(np_layer_norm(y, block.norm2), block.mlp)
    return features[0], features[1], y


def _kept(ids_keep: np.ndarray) -> np.ndarray:
    keep = np.zeros((ids_keep.shape[0], GRID * GRID), bool)
    np.put_along_axis(keep, ids_keep, True, axis=1)
    return keep


# --- tests ------------------------------------------------------------------------------------


def test_token_dropping_equals_dense_reference_with_key_mask():
    model = _tiny()
    images, ids_keep = _images(0), _ids_keep(1)
    ours = _call(model, jnp.asarray(images), jnp.asarray(ids_keep))
    dense = np_hivit(model, images, _kept(ids_keep))
    shapes = [(2, 5, 4, 4, 8), (2, 5, 2, 2, 16), (2, 5, 32)]
    for got, ref, shape in zip(ours, dense, shapes, strict=True):
        assert got.shape == shape
        expected = np.take_along_axis(ref, ids_keep.reshape(2, 5, *[1] * (ref.ndim - 2)), axis=1)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_all_patches_without_ids_keep():
    model = _tiny(rpe=False, mlp_depth=1)
    images = _images(2)
    ours = _call(model, jnp.asarray(images), None)
    dense = np_hivit(model, images, np.ones((2, GRID * GRID), bool))
    for got, ref in zip(ours, dense, strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_stages_1_2_of_a_patch_depend_only_on_its_pixels():
    model = _tiny()
    images, ids_keep = _images(3), _ids_keep(4)
    base = _call(model, jnp.asarray(images), jnp.asarray(ids_keep))
    # Perturb every pixel outside main patch ids_keep[:, 0] (other kept and removed patches).
    own = np.zeros((2, GRID * GRID), bool)
    own[np.arange(2), ids_keep[:, 0]] = True
    outside = np.repeat(np.repeat(~own.reshape(2, GRID, GRID), PATCH, 1), PATCH, 2)
    noisy = images + 5.0 * outside[..., None] * _images(5)
    moved = _call(model, jnp.asarray(noisy), jnp.asarray(ids_keep))
    for stage in (0, 1):
        np.testing.assert_array_equal(moved[stage][:, 0], base[stage][:, 0])
        assert not np.allclose(moved[stage][:, 1:], base[stage][:, 1:])
    assert not np.allclose(moved[2][:, 0], base[2][:, 0])  # stage 3 attends to other patches
    # Removed patches are never read.
    removed = np.repeat(np.repeat(~_kept(ids_keep).reshape(2, GRID, GRID), PATCH, 1), PATCH, 2)
    hidden = _call(model, jnp.asarray(images + 9.0 * removed[..., None]), jnp.asarray(ids_keep))
    for got, ref in zip(hidden, base, strict=True):
        np.testing.assert_array_equal(got, ref)


def test_merge_inner_order_matches_numpy():
    x = np.random.default_rng(6).normal(size=(2, 3, 4, 4, 5)).astype(np.float32)
    out = np.asarray(hivit.merge_inner(jnp.asarray(x)))
    assert out.shape == (2, 3, 2, 2, 20)
    offsets = [(0, 0), (1, 0), (0, 1), (1, 1)]  # (row, col) of channel blocks 0..3
    for i in range(2):
        for j in range(2):
            for k, (r, s) in enumerate(offsets):
                np.testing.assert_array_equal(
                    out[:, :, i, j, 5 * k : 5 * (k + 1)], x[:, :, 2 * i + r, 2 * j + s]
                )


def test_main_patches_and_rpe_index_gather():
    images = _images(7)
    patches = np.asarray(hivit.main_patches(jnp.asarray(images), PATCH))
    assert patches.shape == (2, 16, 16, 16, 3)
    np.testing.assert_array_equal(patches[:, 6], images[:, 16:32, 32:48])  # row 1, col 2
    model = _tiny()
    ids_keep = _ids_keep(8)
    index = np.asarray(model.position_bias_index(jnp.asarray(ids_keep), 2))
    full = np_rel_index(GRID)
    np.testing.assert_array_equal(full, layers.relative_position_index(GRID, GRID))
    for b in range(2):
        np.testing.assert_array_equal(index[b], full[np.ix_(ids_keep[b], ids_keep[b])])


def test_init_sincos_ape_and_drop_path_schedule():
    model = hivit.HiViT(
        img_size=IMG,
        embed_dim=32,
        mlp_depth=2,
        depth=3,
        num_heads=2,
        drop_path_rate=0.7,
        rngs=nnx.Rngs(0),
    )
    rates = [b.drop_path for b in model.blocks if isinstance(b, hivit.Block)]
    np.testing.assert_allclose(rates, np.linspace(0, 0.7, 7))
    ape = _np(model.absolute_pos_embed)
    assert ape.shape == (16, 32)
    np.testing.assert_allclose(ape[0], np.r_[np.zeros(8), np.ones(8), np.zeros(8), np.ones(8)])
    kinds = [type(b).__name__ for b in model.blocks]
    assert kinds == ["Block", "Block", "PatchMerge", "Block", "Block", "PatchMerge"] + ["Block"] * 3
    assert [b.attn is None for b in model.blocks if isinstance(b, hivit.Block)] == [True] * 4 + [
        False
    ] * 3
    # The official pixel model's patch conv keeps PyTorch's default init U(±1/sqrt(fan_in)).
    assert np.abs(_np(model.patch_embed.proj.kernel)).max() <= 48**-0.5


def test_variant_table():
    """SPEC 3.1 with real MLP-block counts (mmpretrain's early depths count pairs of blocks)."""
    expected = {
        "hivit_tiny": (384, 2, 10, 6),
        "hivit_small": (384, 4, 20, 6),
        "hivit_base": (512, 4, 24, 8),
        "hivit_large": (768, 4, 40, 12),
        "itpn_base": (512, 3, 24, 8),
        "itpn_large": (768, 2, 40, 12),
    }
    keys = ("embed_dim", "mlp_depth", "depth", "num_heads")
    assert {k: tuple(v[n] for n in keys) for k, v in hivit.ARCHS.items()} == expected


def test_variant_builds_abstractly():
    model = nnx.eval_shape(lambda: hivit.hivit("hivit_tiny", img_size=224, rngs=nnx.Rngs(0)))
    assert model.dims == (96, 192, 384)
    assert len(model.blocks) == 2 * 2 + 2 + 10
    assert model.absolute_pos_embed.shape == (196, 384)
    assert model.blocks[-1].attn.num_heads == 6
    assert model.blocks[-1].mlp.fc1.kernel.shape == (384, 4 * 384)
    assert model.blocks[0].mlp.fc1.kernel.shape == (96, 3 * 96)
    assert model.blocks[2].reduction.kernel.shape == (4 * 96, 192)


def test_sharded_jit_forward_on_eight_devices():
    model = _tiny(mlp_depth=1)
    graphdef, state = nnx.split(model)
    images = jnp.asarray(_images(9, batch=8))
    ids_keep = jnp.asarray(_ids_keep(10, batch=8))
    expected = _call(model, images, ids_keep)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))

    @jax.jit
    def forward(state, images, ids_keep):
        return nnx.merge(graphdef, state)(images, ids_keep)

    with jax.set_mesh(mesh):
        batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
        out = forward(state, jax.device_put(images, batch), jax.device_put(ids_keep, batch))
    for got, ref in zip(out, expected, strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_rejects_bad_sizes():
    with pytest.raises(ValueError, match="divisible"):
        hivit.HiViT(img_size=60, embed_dim=32, mlp_depth=1, depth=1, num_heads=2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="unknown HiViT arch"):
        hivit.hivit("hivit_huge", img_size=224, rngs=nnx.Rngs(0))


def _to_torch(path: str, value: np.ndarray) -> np.ndarray:
    """Our parameter in the official PyTorch layout (Linear [out, in], Conv OIHW, APE [1, N, C])."""
    if path.endswith("kernel") and value.ndim == 2:
        return value.T
    if path.endswith("kernel"):
        return value.transpose(3, 2, 0, 1)
    return value[None] if path.endswith("absolute_pos_embed") else value


def test_classifier_forward_and_torch_names():
    encoder = _tiny(mlp_depth=1)
    model = heads.Classifier(encoder, 5, rngs=nnx.Rngs(3), fc_norm=True)
    images = jnp.asarray(_images(11))
    logits = nnx.jit(lambda m, x: m(x))(model, images)
    tokens = _call(encoder, images, None)[2]
    np.testing.assert_allclose(
        logits, model.head(model.fc_norm(tokens.mean(1))), rtol=1e-5, atol=1e-6
    )
    assert logits.shape == (2, 5)
    # Every parameter has an official name; a state_dict in PyTorch layout loads back exactly.
    ours = pytree.flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    table = convert.TABLES["hivit"]
    state = {convert.torch_name(k, table): _to_torch(k, np.asarray(v)) for k, v in ours.items()}
    assert {"blocks.4.attn.relative_position_bias_table", "blocks.1.reduction.weight"} <= set(state)
    assert {"patch_embed.proj.weight", "fc_norm.bias", "head.weight"} <= set(state)
    # Built from other random draws, so a load that changed nothing would fail below.
    other_encoder = _random(lambda: hivit.HiViT(**{**TINY, "mlp_depth": 1}, rngs=nnx.Rngs(0)), 2)
    fresh = heads.Classifier(other_encoder, 5, rngs=nnx.Rngs(4), fc_norm=True)
    assert not np.array_equal(
        fresh.encoder.blocks[0].mlp.fc1.kernel[...], encoder.blocks[0].mlp.fc1.kernel[...]
    )
    convert.load_into(fresh, {**state, "relative_position_index": np.zeros(1)}, "hivit")
    loaded = pytree.flatten(nnx.to_pure_dict(nnx.state(fresh, nnx.Param)))
    for key, value in ours.items():
        np.testing.assert_array_equal(loaded[key], value, err_msg=key)
