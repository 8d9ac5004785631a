"""ViT encoder (SPEC 1.3): BEiT relative position index, attention block, mask token, init."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import special

from mim_jax.models import vit

TINY = dict(img_size=32, patch_size=8, in_chans=3, embed_dim=32, depth=2, num_heads=2)


def _model(**overrides) -> vit.VisionTransformer:
    kwargs = {**TINY, **overrides}
    seed = kwargs.pop("seed", 0)
    return vit.VisionTransformer(**kwargs, rngs=nnx.Rngs(seed))


def _randomize(model: nnx.Module, seed: int = 1, scale: float = 0.3) -> None:
    """Gives every parameter random values so zero-initialized tables and biases matter."""
    rng = np.random.default_rng(seed)
    for _, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        shape = variable.shape
        variable[...] = jnp.asarray(rng.normal(0.0, scale, shape), jnp.float32)


def _np(param) -> np.ndarray:
    return np.asarray(param[...], np.float64)


# --- independent numpy references -------------------------------------------------------------


def reference_index(height: int, width: int) -> np.ndarray:
    """SPEC 1.3, pair by pair: offsets shifted non-negative, `dy*(2w-1) + dx`, 3 cls rows."""
    rows = (2 * height - 1) * (2 * width - 1) + 3
    coords = [(y, x) for y in range(height) for x in range(width)]
    n = len(coords) + 1
    index = np.empty((n, n), np.int64)
    for i in range(n):
        for j in range(n):
            if i == 0 and j == 0:
                index[i, j] = rows - 1  # cls -> cls
            elif i == 0:
                index[i, j] = rows - 3  # cls -> token
            elif j == 0:
                index[i, j] = rows - 2  # token -> cls
            else:
                (yi, xi), (yj, xj) = coords[i - 1], coords[j - 1]
                index[i, j] = (yi - yj + height - 1) * (2 * width - 1) + (xi - xj + width - 1)
    return index


def np_layer_norm(x, scale, bias, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def np_gelu(x):
    return 0.5 * x * (1.0 + special.erf(x / math.sqrt(2.0)))


def np_softmax(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def np_bias(table, grid):
    """`[rows, heads]` -> `[heads, n, n]` through the reference index."""
    return np.moveaxis(table[reference_index(grid, grid)], -1, 0)


def np_attention(attn, x, shared_bias, heads, grid):
    """Naive BEiT attention from the module's own parameters (float64)."""
    b, n, c = x.shape
    d = c // heads
    bias = np.concatenate([_np(attn.q_bias), np.zeros(c), _np(attn.v_bias)])
    qkv = x @ _np(attn.qkv.kernel) + bias
    qkv = qkv.reshape(b, n, 3, heads, d).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    logits = (q * d**-0.5) @ np.swapaxes(k, -1, -2)
    if shared_bias is not None:
        logits = logits + shared_bias
    if attn.relative_position_bias_table is not None:
        logits = logits + np_bias(_np(attn.relative_position_bias_table), grid)
    out = (np_softmax(logits) @ v).transpose(0, 2, 1, 3).reshape(b, n, c)
    return out @ _np(attn.proj.kernel) + _np(attn.proj.bias)


def np_block(block, x, shared_bias, heads, grid, eps):
    h = np_layer_norm(x, _np(block.norm1.scale), _np(block.norm1.bias), eps)
    x = x + _np(block.gamma_1) * np_attention(block.attn, h, shared_bias, heads, grid)
    h = np_layer_norm(x, _np(block.norm2.scale), _np(block.norm2.bias), eps)
    h = np_gelu(h @ _np(block.mlp.fc1.kernel) + _np(block.mlp.fc1.bias))
    h = h @ _np(block.mlp.fc2.kernel) + _np(block.mlp.fc2.bias)
    return x + _np(block.gamma_2) * h


def np_forward(model, images, mask, heads, eps):
    """Whole encoder in float64: conv-as-matmul patch embed, mask token, cls, APE, blocks."""
    p = model.patch_size
    b, hh, ww, cin = images.shape
    h, w = hh // p, ww // p
    patches = images.reshape(b, h, p, w, p, cin).transpose(0, 1, 3, 2, 4, 5).reshape(b, h * w, -1)
    kernel = _np(model.patch_embed.proj.kernel).reshape(p * p * cin, -1)
    x = patches @ kernel + _np(model.patch_embed.proj.bias)
    m = mask.reshape(b, h * w, 1).astype(np.float64)
    x = x * (1 - m) + _np(model.mask_token) * m
    cls = np.broadcast_to(_np(model.cls_token), (b, 1, x.shape[-1]))
    x = np.concatenate([cls, x], axis=1)
    if model.pos_embed is not None:
        x = x + _np(model.pos_embed)
    shared = np_bias(_np(model.rel_pos_bias.relative_position_bias_table), h)
    for block in model.blocks:
        x = np_block(block, x, shared, heads, h, eps)
    x = np_layer_norm(x, _np(model.norm.scale), _np(model.norm.bias), eps)
    return x[:, 1:].reshape(b, h, w, -1)


# --- tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("height", "width"), [(1, 1), (2, 2), (3, 4), (4, 4)])
def test_relative_position_index_with_cls(height, width):
    index = vit.relative_position_index_with_cls(height, width)
    np.testing.assert_array_equal(index, reference_index(height, width))
    assert index.max() == vit.num_relative_distances(height, width) - 1


def test_block_matches_naive_reference():
    heads, grid, eps = TINY["num_heads"], 4, 1e-6
    model = _model(use_rel_pos_bias=True)
    _randomize(model)
    block = model.blocks[1]
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 1 + grid**2, TINY["embed_dim"]))
    shared = model.rel_pos_bias()
    np.testing.assert_allclose(
        np.asarray(shared),
        np_bias(_np(model.rel_pos_bias.relative_position_bias_table), grid),
        rtol=0,
        atol=0,
    )
    xj = jnp.asarray(x, jnp.float32)
    attn = block.attn(block.norm1(xj), shared)
    h = np_layer_norm(x, _np(block.norm1.scale), _np(block.norm1.bias), eps)
    expected = np_attention(block.attn, h, np.asarray(shared, np.float64), heads, grid)
    np.testing.assert_allclose(np.asarray(attn), expected, rtol=1e-4, atol=1e-4)

    out = block(xj, shared)
    expected = np_block(block, x, np.asarray(shared, np.float64), heads, grid, eps)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-4, atol=1e-4)


def test_k_bias_is_zero():
    """With random q_bias/v_bias, k is still the plain projection (its bias is fixed at 0)."""
    model = _model()
    _randomize(model)
    attn = model.blocks[0].attn
    x = jnp.asarray(np.random.default_rng(3).normal(size=(1, 5, TINY["embed_dim"])), jnp.float32)
    _, k, _ = attn.qkv_heads(x)
    kernel = np.asarray(attn.qkv.kernel[...])
    k_plain = np.asarray(x) @ kernel[:, TINY["embed_dim"] : 2 * TINY["embed_dim"]]
    k_plain = k_plain.reshape(1, 5, 2, -1).transpose(0, 2, 1, 3)
    np.testing.assert_allclose(np.asarray(k), k_plain, rtol=1e-5, atol=1e-5)


def test_forward_matches_naive_reference():
    model = _model(use_mask_token=True, use_abs_pos=True)
    _randomize(model, scale=0.2)
    rng = np.random.default_rng(4)
    images = rng.normal(size=(2, 32, 32, 3))
    mask = rng.integers(0, 2, size=(2, 4, 4))
    out = model(jnp.asarray(images, jnp.float32), jnp.asarray(mask))
    assert out.shape == (2, 4, 4, TINY["embed_dim"])
    expected = np_forward(model, images, mask, TINY["num_heads"], 1e-6)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=2e-4, atol=2e-4)


def test_mask_token_replaces_masked_embeddings():
    model = _model(use_mask_token=True)
    rng = np.random.default_rng(5)
    images = jnp.asarray(rng.normal(size=(2, 32, 32, 3)), jnp.float32)
    mask = jnp.asarray(rng.integers(0, 2, size=(2, 4, 4)))
    plain = np.asarray(model.embed(images))
    masked = np.asarray(model.embed(images, mask))
    where = np.asarray(mask).astype(bool)
    np.testing.assert_array_equal(masked[~where], plain[~where])
    token = np.asarray(model.mask_token[...])
    np.testing.assert_allclose(masked[where], np.broadcast_to(token, masked[where].shape))
    with pytest.raises(ValueError, match="mask token"):
        _model()(images, mask)


def test_output_shape_and_attributes():
    model = _model(use_mask_token=True)
    assert (model.num_features, model.stride, model.patch_size) == (32, 8, 8)
    out = model(jnp.zeros((2, 32, 32, 3)), jnp.ones((2, 4, 4), jnp.int32))
    assert out.shape == (2, 4, 4, 32)
    assert out.dtype == jnp.float32


def test_parameter_tree_and_vit_base_count():
    model = _model(use_mask_token=True, use_abs_pos=True, use_rel_pos_bias=True)
    shapes = {
        ".".join(map(str, path)): v.shape
        for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }
    grid, rows, c = 4, 7 * 7 + 3, 32
    for key, shape in {
        "patch_embed.proj.kernel": (8, 8, 3, c),
        "cls_token": (c,),
        "mask_token": (c,),
        "pos_embed": (1 + grid**2, c),
        "rel_pos_bias.relative_position_bias_table": (rows, 2),
        "blocks.1.attn.qkv.kernel": (c, 3 * c),
        "blocks.1.attn.q_bias": (c,),
        "blocks.1.attn.v_bias": (c,),
        "blocks.1.attn.relative_position_bias_table": (rows, 2),
        "blocks.1.gamma_1": (c,),
        "blocks.1.mlp.fc2.kernel": (4 * c, c),
        "norm.scale": (c,),
    }.items():
        assert shapes[key] == shape, key
    assert "blocks.0.attn.qkv.bias" not in shapes
    assert len(shapes) == 8 + 2 * 16  # 8 top-level + 16 per block

    # Official VisionTransformerForSimMIM ViT-B/16 @224 (shared RPB, no APE): 85,666,128.
    abstract = nnx.eval_shape(
        lambda: vit.VisionTransformer(
            img_size=224,
            patch_size=16,
            in_chans=3,
            embed_dim=768,
            depth=12,
            num_heads=12,
            use_mask_token=True,
            rngs=nnx.Rngs(0),
        )
    )
    count = sum(math.prod(v.shape) for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param)))
    assert count == 85_666_128


def test_optional_parameters_absent():
    model = _model(qkv_bias=False, init_values=0.0, use_shared_rel_pos_bias=False)
    names = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    for absent in ("rel_pos_bias", "mask_token", "pos_embed", "q_bias", "gamma_1"):
        assert not any(absent in n for n in names), absent
    assert model(jnp.zeros((2, 32, 32, 3))).shape == (2, 4, 4, 32)


def test_init_values_and_rescale():
    """Kernels trunc-normal(0.02) cut at ±1 std (SimMIM), proj/fc2 of block i / sqrt(2 i)."""
    c = TINY["embed_dim"]
    model = _model(depth=4, use_mask_token=True, init_values=0.1)
    trunc_std = 0.02 * math.sqrt(
        1 - 2 * math.exp(-0.5) / math.sqrt(2 * math.pi) / math.erf(1 / math.sqrt(2))
    )  # std of N(0, 0.02^2) truncated at ±0.02
    for i, block in enumerate(model.blocks, start=1):
        np.testing.assert_array_equal(np.asarray(block.gamma_1[...]), np.full(c, 0.1, np.float32))
        np.testing.assert_array_equal(np.asarray(block.attn.q_bias[...]), np.zeros(c))
        for kernel, scale in (
            (block.attn.qkv.kernel, 1.0),
            (block.mlp.fc1.kernel, 1.0),
            (block.attn.proj.kernel, 1 / math.sqrt(2 * i)),
            (block.mlp.fc2.kernel, 1 / math.sqrt(2 * i)),
        ):
            w = np.abs(np.asarray(kernel[...]))
            bound = 0.02 * scale
            assert w.max() <= bound * (1 + 1e-6)
            assert w.max() > 0.95 * bound
            assert np.std(kernel[...]) == pytest.approx(trunc_std * scale, rel=0.08)
        np.testing.assert_array_equal(np.asarray(block.mlp.fc2.bias[...]), np.zeros(c))
    np.testing.assert_array_equal(
        np.asarray(model.rel_pos_bias.relative_position_bias_table[...]), 0.0
    )
    assert np.abs(np.asarray(model.mask_token[...])).max() <= 0.02


def test_drop_path_only_with_rngs():
    images = jnp.asarray(np.random.default_rng(6).normal(size=(2, 32, 32, 3)), jnp.float32)
    model = _model(drop_path_rate=0.5)
    _randomize(model, scale=0.2)
    eval_a, eval_b = model(images), model(images)
    np.testing.assert_array_equal(np.asarray(eval_a), np.asarray(eval_b))
    train = model(images, rngs=nnx.Rngs(dropout=0))
    assert not np.allclose(np.asarray(train), np.asarray(eval_a))

    no_drop = _model(drop_path_rate=0.0)
    np.testing.assert_array_equal(
        np.asarray(no_drop(images, rngs=nnx.Rngs(dropout=0))), np.asarray(no_drop(images))
    )
    assert [b.drop_path for b in model.blocks] == [0.0, 0.5]


def test_bfloat16_compute_float32_params():
    images = jnp.asarray(np.random.default_rng(7).normal(size=(2, 32, 32, 3)), jnp.float32)
    mask = jnp.asarray(np.random.default_rng(8).integers(0, 2, size=(2, 4, 4)))
    fp32 = _model(use_mask_token=True, depth=1)
    bf16 = _model(use_mask_token=True, depth=1, dtype=jnp.bfloat16)
    for _, v in nnx.to_flat_state(nnx.state(bf16, nnx.Param)):
        assert v[...].dtype == jnp.float32
    out = nnx.jit(lambda model, images, mask: model(images, mask))(bf16, images, mask)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(out, np.float32), np.asarray(fp32(images, mask)), rtol=0.1, atol=0.1
    )


def test_jit_on_eight_device_mesh():
    """Pure jit over (graphdef, state) with a batch-sharded input on the forced 8-CPU mesh."""
    model = _model(use_mask_token=True, depth=1)
    graphdef, state = nnx.split(model)
    images = jnp.asarray(np.random.default_rng(9).normal(size=(8, 32, 32, 3)), jnp.float32)
    mask = jnp.asarray(np.random.default_rng(10).integers(0, 2, size=(8, 4, 4)))
    expected = model(images, mask)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))

    @jax.jit
    def forward(state, images, mask):
        return nnx.merge(graphdef, state)(images, mask)

    with jax.set_mesh(mesh):
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
        out = forward(state, jax.device_put(images, sharding), jax.device_put(mask, sharding))
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-5, atol=1e-5)
