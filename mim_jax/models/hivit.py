"""HiViT encoder (SPEC 3.1): per-main-patch MLP stages, then global attention at stride 16.

Token layout: the image is cut into main patches of `patch_size` pixels (16: a 14x14 grid at
224 px), and every main patch keeps its own `inner x inner` grid of stride-4 sub-tokens:
`[batch, main_patches, inner, inner, channels]`. Stages 1 and 2 (MLP-only blocks, per-main-
patch PatchMerge) never mix main patches, so masked patches can be dropped right after the
patch projection (`ids_keep`) and cost nothing anywhere, MAE style; stage 3 attends globally
over the kept patches with the absolute position embedding (and optional relative position
bias) gathered at their indices.

Parameter names follow the official PyTorch model (sunsmarterjie/iTPN `models_itpn.py`): one
flat `blocks` list holding `mlp_depth` MLP blocks, a PatchMerge, `mlp_depth` MLP blocks, a
PatchMerge and `depth` attention blocks; `patch_embed.proj` / `patch_embed.norm`;
`absolute_pos_embed` (without PyTorch's leading singleton axis).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mim_jax import convert
from mim_jax.models import layers, pos_resize
from mim_jax.models import remat as remat_lib

# Stage-1/2 MLP block counts are real block counts. mmpretrain's `depths` count Swin-sized
# units of two MLP blocks in the early stages (`hivit.py`: stage_depth * 2), so its HiViT-T
# [1, 1, 10] is mlp_depth 2 here. iTPN's own factories give mlp_depth directly.
ARCHS = {
    "hivit_tiny": dict(embed_dim=384, mlp_depth=2, depth=10, num_heads=6),
    "hivit_small": dict(embed_dim=384, mlp_depth=4, depth=20, num_heads=6),
    "hivit_base": dict(embed_dim=512, mlp_depth=4, depth=24, num_heads=8),
    "hivit_large": dict(embed_dim=768, mlp_depth=4, depth=40, num_heads=12),
    "itpn_base": dict(embed_dim=512, mlp_depth=3, depth=24, num_heads=8),
    "itpn_large": dict(embed_dim=768, mlp_depth=2, depth=40, num_heads=12),
}
INNER_PATCHES = 4  # 4x4 sub-tokens per main patch: two PatchMerges reach one token.


class Attention(nnx.Module):
    """Global multi-head attention: fused qkv Linear, optional relative position bias table.

    The table has `(2 * grid - 1)**2` rows (offsets on the main-patch grid) x heads, zero
    initialized as in the official iTPN code.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        grid: int,
        rngs: nnx.Rngs,
        rpe: bool = False,
        qkv_bias: bool = True,
        dtype: jnp.dtype = jnp.float32,
    ):
        self.num_heads = num_heads
        self.qkv = layers.Linear(
            dim, 3 * dim, ("embed", "heads"), rngs=rngs, use_bias=qkv_bias, dtype=dtype
        )
        self.proj = layers.Linear(dim, dim, ("heads", "embed"), rngs=rngs, dtype=dtype)
        self.relative_position_bias_table = (
            layers.param(
                rngs,
                nnx.initializers.zeros_init(),
                ((2 * grid - 1) ** 2, num_heads),
                ("table", None),
            )
            if rpe
            else None
        )

    def __call__(self, x: jax.Array, rpe_index: jax.Array | None = None) -> jax.Array:
        """x `[batch, tokens, C]`; rpe_index int `[batch, tokens, tokens]` (table rows) or None."""
        q, k, v = (layers.split_heads(t, self.num_heads) for t in jnp.split(self.qkv(x), 3, -1))
        bias = None
        if self.relative_position_bias_table is not None:
            if rpe_index is None:
                raise ValueError("an attention block with a bias table needs rpe_index")
            table = self.relative_position_bias_table[...]
            bias = jnp.moveaxis(table[rpe_index], -1, -3).astype(jnp.float32)
        return self.proj(layers.merge_heads(layers.dot_product_attention(q, k, v, bias)))


class Block(nnx.Module):
    """Official `BlockWithRPE`: with heads, x + attn(norm1(x)); always x + mlp(norm2(x)).

    `num_heads == 0` makes the MLP-only block of HiViT's stages 1-2 and of the iTPN pyramid
    (no `norm1` / `attn`); it acts per token on any leading shape `[..., C]`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        *,
        rngs: nnx.Rngs,
        grid: int = 1,
        rpe: bool = False,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        eps: float = 1e-6,
        dtype: jnp.dtype = jnp.float32,
    ):
        self.drop_path = drop_path
        with_attn = num_heads > 0
        self.norm1 = layers.LayerNorm(dim, rngs=rngs, eps=eps, dtype=dtype) if with_attn else None
        self.attn = (
            Attention(dim, num_heads, grid=grid, rngs=rngs, rpe=rpe, qkv_bias=qkv_bias, dtype=dtype)
            if with_attn
            else None
        )
        self.norm2 = layers.LayerNorm(dim, rngs=rngs, eps=eps, dtype=dtype)
        self.mlp = layers.Mlp(dim, int(dim * mlp_ratio), rngs=rngs, dtype=dtype)

    def __call__(
        self, x: jax.Array, rpe_index: jax.Array | None = None, rngs: nnx.Rngs | None = None
    ) -> jax.Array:
        """x `[batch, ..., C]` (`[batch, tokens, C]` with attention) -> same shape."""
        if self.attn is not None:
            x = x + layers.drop_path(self.attn(self.norm1(x), rpe_index), self.drop_path, rngs)
        x = x + layers.drop_path(self.mlp(x, self.norm2), self.drop_path, rngs)
        return layers.constrain_batch(x)


def merge_inner(x: jax.Array) -> jax.Array:
    """PatchMerge's concat inside each main patch: `[..., h, w, C]` -> `[..., h/2, w/2, 4C]`,
    channel blocks x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2] (row, col)."""
    return jnp.concatenate(
        [
            x[..., 0::2, 0::2, :],
            x[..., 1::2, 0::2, :],
            x[..., 0::2, 1::2, :],
            x[..., 1::2, 1::2, :],
        ],
        axis=-1,
    )


class PatchMerge(layers.PatchMerging):
    """Per-main-patch 2x2 merge: `[..., h, w, C]` -> LN(4C) -> Linear(2C, no bias)."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.merge(merge_inner(x))


def main_patches(images: jax.Array, patch_size: int) -> jax.Array:
    """`[batch, H, W, C]` -> `[batch, (H/p)*(W/p), p, p, C]`, main patches in raster order."""
    b, h, w, c = images.shape
    x = images.reshape(b, h // patch_size, patch_size, w // patch_size, patch_size, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, patch_size, patch_size, c)


def gather_patches(x: jax.Array, ids_keep: jax.Array) -> jax.Array:
    """`[batch, N, ...]` at `ids_keep` int `[batch, N_keep]` -> `[batch, N_keep, ...]`."""
    index = ids_keep.reshape(*ids_keep.shape, *([1] * (x.ndim - 2)))
    return jnp.take_along_axis(x, index, axis=1)


class HiViT(nnx.Module):
    """HiViT encoder on kept main patches: images -> (stage 1, stage 2, stage 3) features.

    Stage widths C1 = embed_dim/4, C2 = embed_dim/2, C3 = embed_dim. Stochastic depth is
    linear over the `2 * mlp_depth + depth` blocks in order (SPEC 3.1).

    Init as the official pixel model: Linear trunc_normal(0.02) / bias 0, LayerNorm (1, 0),
    the patch conv keeps PyTorch's default (its `_init_weights` skips Conv2d), bias tables 0,
    `absolute_pos_embed` a trainable parameter that starts as the 2-D sin-cos table
    (`ape_init="sincos"`) or trunc_normal(0.02) (`"trunc_normal"`, the fine-tuning model).

    The raw APE table is added, with and without token dropping. The released pretraining code
    instead resamples it bicubically by (grid + 0.1) / grid whenever tokens are dropped
    (`interpolate_pos_encoding` compares the kept count with the table size), a slight shift
    the fine-tuning model does not see; tests/test_itpn_model.py reproduces that for parity.

    `remat` (none | full | dots) rematerializes every block (models/remat.py).
    """

    def __init__(
        self,
        *,
        img_size: int,
        embed_dim: int,
        mlp_depth: int,
        depth: int,
        num_heads: int,
        patch_size: int = 16,
        in_chans: int = 3,
        bridge_mlp_ratio: float = 3.0,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
        ape: bool = True,
        ape_init: str = "sincos",
        rpe: bool = False,
        dtype: jnp.dtype = jnp.float32,
        remat: str = "none",
        rngs: nnx.Rngs,
    ):
        if img_size % patch_size or patch_size % INNER_PATCHES:
            raise ValueError(
                f"img_size={img_size} must be divisible by patch_size={patch_size}, "
                f"and patch_size by {INNER_PATCHES}"
            )
        if embed_dim % 4 or embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must divide by 4 and num_heads={num_heads}")
        if ape_init not in ("sincos", "trunc_normal"):
            raise ValueError(f"ape_init must be 'sincos' or 'trunc_normal', got {ape_init!r}")
        self.remat = remat_lib.check(remat)
        self.patch_size = patch_size
        self.grid = img_size // patch_size
        self.num_patches = self.grid**2
        self.mlp_depth = mlp_depth
        self.depth = depth
        self.dims = (embed_dim // 4, embed_dim // 2, embed_dim)
        self.num_features = embed_dim
        self.rpe = rpe

        c1 = self.dims[0]
        self.patch_embed = layers.PatchEmbed(
            patch_size // INNER_PATCHES,
            in_chans,
            c1,
            rngs=rngs,
            norm=True,
            eps=norm_eps,
            dtype=dtype,
        )
        fan_in = in_chans * (patch_size // INNER_PATCHES) ** 2
        for conv_param in (self.patch_embed.proj.kernel, self.patch_embed.proj.bias):
            conv_param.set_value(
                layers.torch_default_init(fan_in)(rngs.params(), conv_param.shape, jnp.float32)
            )
        ape_table = (
            (lambda *_: jnp.asarray(layers.sincos_pos_embed(embed_dim, self.grid)))
            if ape_init == "sincos"
            else layers.trunc_normal()
        )
        self.absolute_pos_embed = (
            layers.param(rngs, ape_table, (self.num_patches, embed_dim), (None, "embed"))
            if ape
            else None
        )

        rates = iter(np.linspace(0.0, drop_path_rate, 2 * mlp_depth + depth).tolist())
        kw = dict(rngs=rngs, qkv_bias=qkv_bias, eps=norm_eps, dtype=dtype)
        blocks: list[nnx.Module] = []
        for dim in self.dims[:2]:
            blocks += [
                Block(dim, 0, bridge_mlp_ratio, drop_path=next(rates), **kw)
                for _ in range(mlp_depth)
            ]
            blocks.append(PatchMerge(dim, rngs=rngs, eps=norm_eps, dtype=dtype))
        blocks += [
            Block(
                embed_dim,
                num_heads,
                mlp_ratio,
                grid=self.grid,
                rpe=rpe,
                drop_path=next(rates),
                **kw,
            )
            for _ in range(depth)
        ]
        self.blocks = nnx.List(blocks)

    def embed(self, images: jax.Array, ids_keep: jax.Array | None = None) -> jax.Array:
        """Patch projection of kept main patches: `[batch, N_keep, 4, 4, C1]` (N_keep = N
        without ids_keep). Masked patches are dropped before the conv: it never runs on them."""
        x = main_patches(images, self.patch_size)
        if ids_keep is not None:
            x = gather_patches(x, ids_keep)
        b, n, p, _, c = x.shape
        x = self.patch_embed(x.reshape(b * n, p, p, c))
        return layers.constrain_batch(x.reshape(b, n, *x.shape[1:]))

    def position_bias_index(self, ids_keep: jax.Array | None, batch: int) -> jax.Array | None:
        """Relative-position table rows for every kept pair: int `[batch, N_keep, N_keep]`."""
        if not self.rpe:
            return None
        index = jnp.asarray(layers.relative_position_index(self.grid, self.grid), jnp.int32)
        if ids_keep is None:
            return jnp.broadcast_to(index, (batch, *index.shape))
        return index[ids_keep[:, :, None], ids_keep[:, None, :]]

    def __call__(
        self,
        images: jax.Array,
        ids_keep: jax.Array | None = None,
        *,
        rngs: nnx.Rngs | None = None,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """images `[batch, H, W, C_in]`, ids_keep int `[batch, N_keep]` (main-patch raster
        indices, any order; None keeps all) -> features of the kept patches in ids_keep order:
        stage 1 `[batch, N_keep, 4, 4, C1]` and stage 2 `[batch, N_keep, 2, 2, C2]` (each taken
        before its PatchMerge), stage 3 `[batch, N_keep, C3]`."""
        x = self.embed(images, ids_keep)
        num_bridge = 2 * self.mlp_depth + 2
        features = []
        for block in self.blocks[:num_bridge]:
            if isinstance(block, PatchMerge):
                features.append(x)
                x = layers.constrain_batch(block(x))
            else:
                x = remat_lib.call(self.remat, Block.__call__, block, x, None, rngs)
        x = x[:, :, 0, 0]
        if self.absolute_pos_embed is not None:
            pos = self.absolute_pos_embed[...].astype(x.dtype)
            x = x + (pos[None] if ids_keep is None else pos[ids_keep])
        rpe_index = self.position_bias_index(ids_keep, x.shape[0])
        for block in self.blocks[num_bridge:]:
            x = remat_lib.call(self.remat, Block.__call__, block, x, rpe_index, rngs)
        return features[0], features[1], x


def hivit(arch: str, **kwargs) -> HiViT:
    """HiViT of a named architecture (`ARCHS`); kwargs override or complete it (img_size,
    rngs, drop_path_rate, rpe, ...)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown HiViT arch {arch!r}; choose from {', '.join(ARCHS)}")
    return HiViT(**{**ARCHS[arch], **kwargs})


# PyTorch names (convert.TABLES format) of the encoder under `encoder.`: official flat names.
# TORCH_BLOCK: the leaves of a `BlockWithRPE` (pyramid and decoder blocks reuse it).
_W = r"(weight|bias)"
TORCH_BLOCK = r"(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\." + _W
ENCODER_TABLE = (
    (rf"^encoder\.patch_embed\.(proj|norm)\.{_W}$", r"patch_embed.\1.\2"),
    (r"^encoder\.absolute_pos_embed$", "absolute_pos_embed"),
    (rf"^encoder\.blocks\.(\d+)\.{TORCH_BLOCK}$", r"blocks.\1.\2.\3"),
    (rf"^encoder\.blocks\.(\d+)\.(norm|reduction)\.{_W}$", r"blocks.\1.\2.\3"),
    (
        r"^encoder\.blocks\.(\d+)\.attn\.relative_position_bias_table$",
        r"blocks.\1.attn.relative_position_bias_table",
    ),
)
convert.TABLES["hivit"] = (*ENCODER_TABLE, (rf"^(fc_norm|head)\.{_W}$", r"\1.\2"))


def remap_pretrained(
    source: dict[str, np.ndarray], target: Mapping[str, tuple[int, ...]]
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Key surgery for loading HiViT encoder weights (paths under `encoder.`) into a model whose
    parameter shapes are `target`: the absolute position table is resized bicubically when the
    main-patch grid differs (MAE's `interpolate_pos_embed`), relative position bias tables by
    the geometric-progression cubic interpolation. A table with another head or channel count
    is left as it is (the caller reports it); ValueError names a table that cannot be resized.
    Returns the new weights and notes."""
    out, notes = dict(source), []
    for key, value in source.items():
        want = target.get(key)
        if not want or value.shape == want or value.shape[1:] != tuple(want[1:]):
            continue
        try:
            if key == "encoder.absolute_pos_embed":
                out[key] = pos_resize.resize_abs_pos_embed(value, math.isqrt(want[0]))
            elif key.endswith("relative_position_bias_table"):
                out[key] = pos_resize.resize_rel_pos_table(value, (math.isqrt(want[0]) + 1) // 2)
            else:
                continue
        except ValueError as e:
            raise ValueError(f"{key} {value.shape} cannot be resized to {want}: {e}") from e
        notes.append(f"{key} {value.shape}->{out[key].shape}")
    return out, notes
