"""Swin V1 encoder (SPEC 1.3, 1.6): (shifted) window attention, masks, merging, mask token.

Every check compares against a float64 numpy reference written here from the SPEC. The window
attention reference does not partition or roll anything: for each token it lists, in original
image coordinates, the tokens it may attend to (same window after the cyclic roll by -shift,
and the same side of the wrap-around seam on both axes, which is what Swin's region mask
encodes), and attends over exactly those.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import special

from mim_jax.models import layers, swin

EPS = 1e-5


def _np(param) -> np.ndarray:
    return np.asarray(param[...], np.float64)


def _random(ctor, seed: int = 1, scale: float = 0.3):
    """Builds `ctor()` abstractly and gives every parameter random normal values.

    Zero-initialized biases and the relative position bias tables become non-trivial, and
    skipping the eager initializers keeps the tests fast on a small CPU.
    """
    graphdef, state = nnx.split(nnx.eval_shape(ctor))
    rng = np.random.default_rng(seed)
    state = jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, scale, s.shape), s.dtype), state)
    return nnx.merge(graphdef, state)


@nnx.jit
def _call(module, *args):
    return module(*args)


@nnx.jit
def _embed(model, images, mask=None):
    return model.embed(images, mask)


# --- independent numpy references -------------------------------------------------------------


def np_layer_norm(x, norm):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + EPS) * _np(norm.scale) + _np(norm.bias)


def np_linear(x, linear):
    y = x @ _np(linear.kernel)
    return y + _np(linear.bias) if linear.bias is not None else y


def np_gelu(x):
    return 0.5 * x * (1.0 + special.erf(x / math.sqrt(2.0)))


def expected_window(resolution: int, window_size: int, shift: bool) -> tuple[int, int]:
    """SPEC 1.6: a stage no larger than the window uses one unshifted window of its size."""
    if resolution <= window_size:
        return resolution, 0
    return window_size, window_size // 2 if shift else 0


def np_window_attention(attn, h, heads, window, shift):
    """Naive (shifted) window attention over `[B, R, R, C]` tokens, token by token."""
    b, res, _, c = h.shape
    d = c // heads
    qkv = np_linear(h, attn.qkv)
    q = qkv[..., :c].reshape(b, res, res, heads, d)
    k = qkv[..., c : 2 * c].reshape(b, res, res, heads, d)
    v = qkv[..., 2 * c :].reshape(b, res, res, heads, d)
    table = _np(attn.relative_position_bias_table)
    assert table.shape == ((2 * window - 1) ** 2, heads)
    out = np.zeros((b, res, res, heads, d))
    for yi in range(res):
        for xi in range(res):
            # Position of token i in the cyclically rolled grid (roll by -shift).
            ryi, rxi = (yi - shift) % res, (xi - shift) % res
            keys, bias = [], []
            for yj in range(res):
                for xj in range(res):
                    ryj, rxj = (yj - shift) % res, (xj - shift) % res
                    same_window = ryi // window == ryj // window and rxi // window == rxj // window
                    # Tokens rolled across the image border form their own region.
                    same_region = (yi < shift) == (yj < shift) and (xi < shift) == (xj < shift)
                    if same_window and same_region:
                        dy, dx = ryi - ryj, rxi - rxj
                        keys.append((yj, xj))
                        bias.append(table[(dy + window - 1) * (2 * window - 1) + (dx + window - 1)])
            ky = np.array([p[0] for p in keys])
            kx = np.array([p[1] for p in keys])
            kk = k[:, ky, kx]  # [B, n, heads, d]
            vv = v[:, ky, kx]
            logits = np.einsum("bhd,bnhd->bhn", q[:, yi, xi] * d**-0.5, kk)
            logits = logits + np.stack(bias, axis=-1)[None]  # [1, heads, n]
            logits = logits - logits.max(-1, keepdims=True)
            weights = np.exp(logits)
            weights = weights / weights.sum(-1, keepdims=True)
            out[:, yi, xi] = np.einsum("bhn,bnhd->bhd", weights, vv)
    return np_linear(out.reshape(b, res, res, c), attn.proj)


def np_block(block, x, heads, window, shift):
    x = x + np_window_attention(block.attn, np_layer_norm(x, block.norm1), heads, window, shift)
    h = np_gelu(np_linear(np_layer_norm(x, block.norm2), block.mlp.fc1))
    return x + np_linear(h, block.mlp.fc2)


def np_patch_merging(merge, x):
    b, hh, ww, c = x.shape
    out = np.zeros((b, hh // 2, ww // 2, 4 * c))
    for i in range(hh // 2):
        for j in range(ww // 2):
            out[:, i, j] = np.concatenate(
                [
                    x[:, 2 * i, 2 * j],  # x0 = [0::2, 0::2]
                    x[:, 2 * i + 1, 2 * j],  # x1 = [1::2, 0::2]
                    x[:, 2 * i, 2 * j + 1],  # x2 = [0::2, 1::2]
                    x[:, 2 * i + 1, 2 * j + 1],  # x3 = [1::2, 1::2]
                ],
                axis=-1,
            )
    assert merge.reduction.bias is None
    return np_layer_norm(out, merge.norm) @ _np(merge.reduction.kernel)


def np_patch_embed(embed, images, patch):
    """Conv p x p / p as a matmul over flattened (row, col, channel) patches, then LayerNorm."""
    b, hh, ww, _ = images.shape
    h, w = hh // patch, ww // patch
    kernel = _np(embed.proj.kernel)  # [p, p, cin, C]
    out = np.zeros((b, h, w, kernel.shape[-1]))
    for i in range(h):
        for j in range(w):
            tile = images[:, i * patch : (i + 1) * patch, j * patch : (j + 1) * patch]
            out[:, i, j] = np.einsum("byxc,yxco->bo", tile, kernel) + _np(embed.proj.bias)
    return np_layer_norm(out, embed.norm)


def np_swin_forward(model, images, mask, *, patch, depths, heads, window_size, grid):
    x = np_patch_embed(model.patch_embed, images, patch)
    if mask is not None:
        m = mask[..., None].astype(np.float64)
        x = x * (1 - m) + _np(model.mask_token) * m
    for i, stage in enumerate(model.layers):
        res = grid // 2**i
        for j in range(depths[i]):
            window, shift = expected_window(res, window_size, bool(j % 2))
            x = np_block(stage.blocks[j], x, heads[i], window, shift)
        if i < len(depths) - 1:
            x = np_patch_merging(stage.downsample, x)
    return np_layer_norm(x, model.norm)


def reference_index(height, width):
    """SPEC 1.6 pair by pair: (dy + h - 1) * (2w - 1) + (dx + w - 1)."""
    coords = [(y, x) for y in range(height) for x in range(width)]
    n = len(coords)
    index = np.empty((n, n), np.int64)
    for i, (yi, xi) in enumerate(coords):
        for j, (yj, xj) in enumerate(coords):
            index[i, j] = (yi - yj + height - 1) * (2 * width - 1) + (xi - xj + width - 1)
    return index


def reference_region_mask(resolution, window, shift):
    """Swin's attn_mask construction: label regions by slices, partition, compare labels."""
    img = np.zeros((resolution, resolution), np.int64)
    slices = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    count = 0
    for hs in slices:
        for ws in slices:
            img[hs, ws] = count
            count += 1
    n = resolution // window
    windows = []
    for wy in range(n):
        for wx in range(n):
            tokens = [
                img[wy * window + ty, wx * window + tx]
                for ty in range(window)
                for tx in range(window)
            ]
            windows.append(tokens)
    labels = np.array(windows)  # [windows, window**2]
    return labels[:, :, None] != labels[:, None, :]  # True = blocked


# --- tests ------------------------------------------------------------------------------------

SWIN_KWARGS = dict(img_size=32, patch_size=4, in_chans=3, embed_dim=8, depths=(2, 1))


@pytest.mark.parametrize(
    ("dim", "resolution", "window_size", "shift"),
    [
        (8, 8, 4, False),
        (8, 8, 4, True),
        (12, 6, 3, True),  # odd window: shift 1
        (16, 8, 2, True),  # four windows per side, shift 1
        (8, 4, 4, True),  # resolution == window: one window, no shift
        (8, 4, 6, True),  # resolution < window: the window shrinks to the resolution
    ],
)
def test_swin_block_matches_naive_reference(dim, resolution, window_size, shift):
    heads = 2
    block = _random(
        lambda: swin.SwinBlock(dim, heads, resolution, window_size, shift, rngs=nnx.Rngs(0))
    )
    window, shift_px = expected_window(resolution, window_size, shift)
    assert (block.window, block.shift) == (window, shift_px)
    table = _np(block.attn.relative_position_bias_table)
    assert table.shape == ((2 * window - 1) ** 2, heads)
    assert np.abs(table).min() > 0  # the bias table is non-zero everywhere
    x = np.random.default_rng(2).normal(size=(2, resolution, resolution, dim))
    out = np.asarray(_call(block, jnp.asarray(x, jnp.float32)))
    expected = np_block(block, x, heads, window, shift_px)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    if shift_px:  # the reference tells shifted from unshifted attention apart
        unshifted = np_block(block, x, heads, window, 0)
        assert np.abs(out - unshifted).max() > 1e-2


def test_swin_transformer_matches_naive_reference():
    """Two stages at 32 px: stage 1 (8x8, window 4, shifted 2nd block), merge, stage 2 (4x4,
    one window), final norm, with a mask. (Without a mask only
    `embed` differs: see the mask-token test.)"""
    model = _random(
        lambda: swin.SwinTransformer(
            **SWIN_KWARGS, num_heads=(1, 2), window_size=4, use_mask_token=True, rngs=nnx.Rngs(0)
        ),
        scale=0.25,
    )
    assert model.num_features == 16 and model.stride == 8
    assert [(b.window, b.shift) for b in model.layers[0].blocks] == [(4, 0), (4, 2)]
    assert [(b.window, b.shift) for b in model.layers[1].blocks] == [(4, 0)]
    rng = np.random.default_rng(4)
    images = rng.normal(size=(2, 32, 32, 3))
    mask = rng.integers(0, 2, size=(2, 8, 8))
    kwargs = dict(patch=4, depths=(2, 1), heads=(1, 2), window_size=4, grid=8)
    out = np.asarray(_call(model, jnp.asarray(images, jnp.float32), jnp.asarray(mask)))
    assert out.shape == (2, 4, 4, 16)
    expected = np_swin_forward(model, images, mask, **kwargs)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize(("resolution", "window", "shift"), [(8, 4, 2), (6, 3, 1), (12, 4, 2)])
def test_shifted_window_mask_matches_slice_construction(resolution, window, shift):
    mask = swin.shifted_window_mask(resolution, window, shift)
    per_side = resolution // window
    assert mask.shape == (per_side**2, window**2, window**2)
    assert mask.dtype == np.float32
    blocked = reference_region_mask(resolution, window, shift)
    np.testing.assert_array_equal(mask[blocked], layers.MASK_VALUE)
    np.testing.assert_array_equal(mask[~blocked], 0.0)
    # Only the last window row / column mixes regions; every interior window is unmasked.
    for wy in range(per_side):
        for wx in range(per_side):
            border = wy == per_side - 1 or wx == per_side - 1
            assert blocked[wy * per_side + wx].any() == border


@pytest.mark.parametrize(("height", "width"), [(1, 1), (2, 2), (3, 4), (4, 3), (4, 4), (7, 7)])
def test_relative_position_index_matches_pairwise_loop(height, width):
    index = layers.relative_position_index(height, width)
    np.testing.assert_array_equal(index, reference_index(height, width))
    assert index.min() == 0
    assert index.max() == (2 * height - 1) * (2 * width - 1) - 1


def test_patch_merging_concat_order(monkeypatch):
    """Values encode (batch, row, col, channel); `merge` is bypassed to expose the concat."""
    b, hh, ww, c = 2, 4, 6, 3
    y, x, ch = np.meshgrid(np.arange(hh), np.arange(ww), np.arange(c), indexing="ij")
    coded = np.stack([10000 * bi + 100 * y + 10 * x + ch for bi in range(b)]).astype(np.float32)
    merge = _random(lambda: layers.PatchMerging(c, rngs=nnx.Rngs(0)))
    monkeypatch.setattr(layers.PatchMerging, "merge", lambda self, v: v)
    concatenated = np.asarray(merge(jnp.asarray(coded)))
    assert concatenated.shape == (b, hh // 2, ww // 2, 4 * c)
    offsets = [(0, 0), (1, 0), (0, 1), (1, 1)]  # (row, col) of x0, x1, x2, x3
    for i in range(hh // 2):
        for j in range(ww // 2):
            expected = np.concatenate([coded[:, 2 * i + dy, 2 * j + dx] for dy, dx in offsets], -1)
            np.testing.assert_array_equal(concatenated[:, i, j], expected)


def test_patch_merging_matches_numpy():
    c = 4
    merge = _random(lambda: layers.PatchMerging(c, rngs=nnx.Rngs(0)))
    assert merge.reduction.kernel.shape == (4 * c, 2 * c)
    assert merge.norm.scale.shape == (4 * c,)
    x = np.random.default_rng(5).normal(size=(2, 4, 6, c))
    out = np.asarray(_call(merge, jnp.asarray(x, jnp.float32)))
    assert out.shape == (2, 2, 3, 2 * c)
    np.testing.assert_allclose(out, np_patch_merging(merge, x), rtol=1e-5, atol=1e-5)


def test_window_partition_raster_order_and_round_trip():
    b, hh, ww, c, w = 2, 8, 12, 3, 4
    x = np.random.default_rng(6).normal(size=(b, hh, ww, c)).astype(np.float32)
    parts = np.asarray(swin.window_partition(jnp.asarray(x), w))
    assert parts.shape == (b, (hh // w) * (ww // w), w * w, c)
    per_row = ww // w
    for n in range(parts.shape[1]):
        wy, wx = divmod(n, per_row)  # windows in raster order
        for t in range(w * w):
            ty, tx = divmod(t, w)  # tokens in raster order inside the window
            np.testing.assert_array_equal(parts[:, n, t], x[:, wy * w + ty, wx * w + tx])
    back = np.asarray(swin.window_reverse(jnp.asarray(parts), w, hh, ww))
    np.testing.assert_array_equal(back, x)


def test_mask_token_replaces_embeddings_after_patch_norm():
    def build(use_mask_token):
        return lambda: swin.SwinTransformer(
            **SWIN_KWARGS,
            num_heads=(1, 2),
            window_size=4,
            use_mask_token=use_mask_token,
            rngs=nnx.Rngs(0),
        )

    model = _random(build(True))
    rng = np.random.default_rng(7)
    images = rng.normal(size=(2, 32, 32, 3))
    mask = rng.integers(0, 2, size=(2, 8, 8))
    mask[0, 0, 0], mask[0, 0, 1] = 1, 0
    where = mask.astype(bool)
    plain = np.asarray(_embed(model, jnp.asarray(images, jnp.float32)))
    np.testing.assert_allclose(
        plain, np_patch_embed(model.patch_embed, images, 4), rtol=1e-5, atol=1e-5
    )
    masked = np.asarray(_embed(model, jnp.asarray(images, jnp.float32), jnp.asarray(mask)))
    np.testing.assert_array_equal(masked[~where], plain[~where])
    # The token replaces the normalized embedding as is: no LayerNorm after the replacement.
    token = np.asarray(model.mask_token[...])
    np.testing.assert_array_equal(masked[where], np.broadcast_to(token, masked[where].shape))
    with pytest.raises(ValueError, match="mask token"):
        _embed(_random(build(False)), jnp.asarray(images, jnp.float32), jnp.asarray(mask))
