"""Swin Transformer V1 encoder with dense (shifted) window attention, as in SimMIM (SPEC 1.3, 1.6).

Parameter names follow the official PyTorch model (`patch_embed`, `layers.{i}.blocks.{j}.attn.qkv`,
`layers.{i}.downsample.reduction`, ...), so official checkpoints convert with one name table.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mim_jax.models import layers, pos_resize
from mim_jax.models import remat as remat_lib


def stage_window(resolution: int, window_size: int, shift: bool) -> tuple[int, int]:
    """(window, shift) of a block: a stage no larger than the window uses one unshifted window."""
    if resolution <= window_size:
        return resolution, 0
    return window_size, (window_size // 2 if shift else 0)


@functools.lru_cache(maxsize=64)
def shifted_window_mask(resolution: int, window: int, shift: int) -> np.ndarray:
    """Additive mask `[windows, window**2, window**2]` blocking pairs from different regions.

    After the cyclic shift by (-shift, -shift), border windows hold tokens from up to four
    image regions that must not attend to each other (Swin's region mask).
    """
    region = np.zeros((resolution, resolution), np.int32)
    bounds = (
        (0, resolution - window),
        (resolution - window, resolution - shift),
        (resolution - shift, resolution),
    )
    label = 0
    for y0, y1 in bounds:
        for x0, x1 in bounds:
            region[y0:y1, x0:x1] = label
            label += 1
    n = resolution // window
    win = region.reshape(n, window, n, window).transpose(0, 2, 1, 3).reshape(n * n, window**2)
    mask = np.where(win[:, :, None] == win[:, None, :], 0.0, layers.MASK_VALUE)
    mask = mask.astype(np.float32)
    mask.setflags(write=False)
    return mask


def window_partition(x: jax.Array, window: int) -> jax.Array:
    """`[batch, H, W, C]` -> `[batch, windows, window**2, C]`, windows in raster order."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // window, window, w // window, window, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // window) * (w // window), window**2, c)


def window_reverse(x: jax.Array, window: int, height: int, width: int) -> jax.Array:
    """Inverse of `window_partition`."""
    b, _, _, c = x.shape
    x = x.reshape(b, height // window, width // window, window, window, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, height, width, c)


class WindowAttention(nnx.Module):
    """Multi-head self-attention inside windows with a learned relative position bias.

    The qkv projection, bias lookup and output projection are separate methods so that other
    token layouts (e.g. visible tokens packed in groups) can wrap their own attention core.
    """

    def __init__(
        self,
        dim: int,
        window_size: int,
        num_heads: int,
        *,
        rngs: nnx.Rngs,
        qkv_bias: bool = True,
        dtype: jnp.dtype = jnp.float32,
    ):
        self.num_heads = num_heads
        self.window_size = window_size
        self.qkv = layers.Linear(
            dim, 3 * dim, ("embed", "heads"), rngs=rngs, use_bias=qkv_bias, dtype=dtype
        )
        self.proj = layers.Linear(dim, dim, ("heads", "embed"), rngs=rngs, dtype=dtype)
        self.relative_position_bias_table = layers.param(
            rngs, layers.trunc_normal(), ((2 * window_size - 1) ** 2, num_heads), ("table", None)
        )

    def qkv_heads(
        self, x: jax.Array, norm: layers.LayerNorm | None = None
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """`[..., tokens, C]` -> q, k, v each `[..., heads, tokens, head_dim]` (of `norm(x)`
        with `norm`, through `layers.norm_linear`)."""
        q, k, v = jnp.split(layers.norm_linear(norm, self.qkv, x), 3, axis=-1)
        return tuple(layers.split_heads(t, self.num_heads) for t in (q, k, v))

    def position_bias(self, index: jax.Array | np.ndarray) -> jax.Array:
        """Bias for an index array `[..., q, k]` -> `[..., heads, q, k]` (float32)."""
        bias = self.relative_position_bias_table[...][index]
        return jnp.moveaxis(bias, -1, -3)

    def output(self, attended: jax.Array) -> jax.Array:
        """`[..., heads, tokens, head_dim]` -> output projection `[..., tokens, C]`."""
        return self.proj(layers.merge_heads(attended))

    def __call__(
        self,
        x: jax.Array,
        mask: np.ndarray | None = None,
        norm: layers.LayerNorm | None = None,
    ) -> jax.Array:
        """x `[batch, windows, window**2, C]`; mask `[windows, window**2, window**2]` (additive);
        `norm` applied to x first (see `qkv_heads`)."""
        q, k, v = self.qkv_heads(x, norm)
        index = layers.relative_position_index(self.window_size, self.window_size)
        bias = self.position_bias(index)
        if mask is not None:
            bias = bias + mask[:, None]
        return self.output(layers.dot_product_attention(q, k, v, bias))


class SwinBlock(nnx.Module):
    """Pre-norm Swin block: (shifted) window attention and MLP, each with a residual."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        resolution: int,
        window_size: int,
        shift: bool,
        *,
        rngs: nnx.Rngs,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        eps: float = 1e-5,
        dtype: jnp.dtype = jnp.float32,
    ):
        self.resolution = resolution
        self.window, self.shift = stage_window(resolution, window_size, shift)
        self.drop_path = drop_path
        self.norm1 = layers.LayerNorm(dim, rngs=rngs, eps=eps, dtype=dtype)
        self.attn = WindowAttention(
            dim, self.window, num_heads, rngs=rngs, qkv_bias=qkv_bias, dtype=dtype
        )
        self.norm2 = layers.LayerNorm(dim, rngs=rngs, eps=eps, dtype=dtype)
        self.mlp = layers.Mlp(dim, int(dim * mlp_ratio), rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        """x `[batch, H, W, C]` -> same shape."""
        h = x  # norm1 is per token, so it runs after the shift and partition, with the qkv.
        mask = None
        if self.shift:
            h = jnp.roll(h, (-self.shift, -self.shift), axis=(1, 2))
            mask = shifted_window_mask(self.resolution, self.window, self.shift)
        h = self.attn(window_partition(h, self.window), mask, self.norm1)
        h = window_reverse(h, self.window, self.resolution, self.resolution)
        if self.shift:
            h = jnp.roll(h, (self.shift, self.shift), axis=(1, 2))
        x = x + layers.drop_path(h, self.drop_path, rngs)
        x = x + layers.drop_path(self.mlp(x, self.norm2), self.drop_path, rngs)
        return layers.constrain_batch(x)


class SwinStage(nnx.Module):
    """`depth` blocks alternating unshifted / shifted windows, then optional patch merging."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        resolution: int,
        window_size: int,
        drop_paths: list[float],
        *,
        rngs: nnx.Rngs,
        downsample: bool,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        eps: float = 1e-5,
        dtype: jnp.dtype = jnp.float32,
        remat: str = "none",
    ):
        self.remat = remat_lib.check(remat)
        self.blocks = nnx.List(
            [
                SwinBlock(
                    dim,
                    num_heads,
                    resolution,
                    window_size,
                    shift=bool(j % 2),
                    rngs=rngs,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    drop_path=drop_paths[j],
                    eps=eps,
                    dtype=dtype,
                )
                for j in range(depth)
            ]
        )
        self.downsample = (
            layers.PatchMerging(dim, rngs=rngs, eps=eps, dtype=dtype) if downsample else None
        )

    def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        for block in self.blocks:
            x = remat_lib.call(self.remat, SwinBlock.__call__, block, x, rngs)
        return self.downsample(x) if self.downsample is not None else x


class SwinTransformer(nnx.Module):
    """Swin encoder: images `[batch, H, W, 3]` (+ optional SimMIM mask) -> `[batch, h, w, C]`.

    With `use_mask_token`, patch embeddings at masked positions (mask `[batch, H/p, W/p]`,
    1 = masked) are replaced by a learned token after the patch-embed LayerNorm (SPEC 1.3).
    `remat` (none | full | dots) rematerializes every block (models/remat.py).
    """

    def __init__(
        self,
        *,
        img_size: int,
        patch_size: int,
        in_chans: int,
        embed_dim: int,
        depths: tuple[int, ...],
        num_heads: tuple[int, ...],
        window_size: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-5,
        use_mask_token: bool = False,
        dtype: jnp.dtype = jnp.float32,
        remat: str = "none",
        rngs: nnx.Rngs,
    ):
        self.remat = remat_lib.check(remat)
        self.patch_size = patch_size
        self.num_features = embed_dim * 2 ** (len(depths) - 1)
        self.stride = patch_size * 2 ** (len(depths) - 1)
        self.patch_embed = layers.PatchEmbed(
            patch_size, in_chans, embed_dim, rngs=rngs, norm=True, eps=norm_eps, dtype=dtype
        )
        self.mask_token = (
            layers.param(rngs, layers.trunc_normal(), (embed_dim,), ("embed",))
            if use_mask_token
            else None
        )
        rates = np.linspace(0.0, drop_path_rate, sum(depths)).tolist()
        grid = img_size // patch_size
        self.layers = nnx.List(
            [
                SwinStage(
                    embed_dim * 2**i,
                    depths[i],
                    num_heads[i],
                    grid // 2**i,
                    window_size,
                    rates[sum(depths[:i]) : sum(depths[: i + 1])],
                    rngs=rngs,
                    downsample=i < len(depths) - 1,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    eps=norm_eps,
                    dtype=dtype,
                    remat=remat,
                )
                for i in range(len(depths))
            ]
        )
        self.norm = layers.LayerNorm(self.num_features, rngs=rngs, eps=norm_eps, dtype=dtype)

    def embed(self, images: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """Patch embedding with mask-token replacement: `[batch, H/p, W/p, C]`."""
        x = self.patch_embed(images)
        if mask is not None:
            x = layers.replace_masked(x, mask, self.mask_token, type(self).__name__)
        return layers.constrain_batch(x)

    def __call__(
        self, images: jax.Array, mask: jax.Array | None = None, *, rngs: nnx.Rngs | None = None
    ) -> jax.Array:
        x = self.embed(images, mask)
        for stage in self.layers:
            x = stage(x, rngs)
        return self.norm(x)


def remap_pretrained(
    source: dict[str, np.ndarray], target: Mapping[str, tuple[int, ...]]
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Key surgery for loading Swin encoder weights (paths under `encoder.`) into a model whose
    parameter shapes are `target`: every relative position bias table whose window differs is
    resized by SimMIM's geometric-progression cubic interpolation (window 6 -> 7, 12 -> 14;
    SPEC 1.6). A table with another head count is left as it is (the caller reports it);
    ValueError names a table that cannot be resized. Returns the new weights and one note per
    resized table."""
    out, notes = dict(source), []
    for key, value in source.items():
        want = target.get(key)
        table = key.endswith("relative_position_bias_table")
        if not table or not want or value.shape == want or value.shape[1:] != tuple(want[1:]):
            continue
        try:
            out[key] = pos_resize.resize_rel_pos_table(value, (math.isqrt(want[0]) + 1) // 2)
        except ValueError as e:
            raise ValueError(f"{key} {value.shape} cannot be resized to {want}: {e}") from e
        notes.append(f"{key} {value.shape}->{out[key].shape}")
    return out, notes
