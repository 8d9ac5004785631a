"""iTPN (SPEC 3.2, 3.3): HiViT + feature pyramid built inside each main patch, and the pixel
pretraining model (multi-scale fusion into an MAE decoder at stride 16).

The pyramid uses only Linear, LayerNorm and MLP-only blocks (the paper's C-MLP), so it runs
on the kept main patches like the encoder: P16 `[batch, N_keep, 1, 1, F]`, P8 `[.., 2, 2, F]`,
P4 `[.., 4, 4, F]` with F = fpn_dim.

Parameter names follow sunsmarterjie/iTPN `itpn_pixel/models/models_itpn_mim.py`, with the
encoder under `encoder.` and the pyramid under `pyramid.`; `TORCH_TABLE` maps them to the
official flat names (registered as `convert.TABLES["itpn"]`). The official decoder blocks are
the encoder's `BlockWithRPE` without bias table, initialized trunc_normal(0.02) like every
Linear (MAE's xavier init is not used), so the decoder reuses `hivit.Block`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mim_jax import convert
from mim_jax.models import hivit, layers
from mim_jax.models import remat as remat_lib

Pyramid = tuple[jax.Array, jax.Array, jax.Array]


def split_inner(x: jax.Array, channels: int) -> jax.Array:
    """PatchSplit's reshape: `[..., h, w, 4F]` -> `[..., 2h, 2w, F]`; the 4F channels of a token
    hold its 2x2 block in (row, col, channel) order: out[2i+r, 2j+s, c] = x[i, j, (2r+s)F + c]."""
    *lead, h, w, _ = x.shape
    x = x.reshape(*lead, h, w, 2, 2, channels)
    x = jnp.moveaxis(x, -3, -4)  # [..., h, 2, w, 2, F]
    return x.reshape(*lead, 2 * h, 2 * w, channels)


class PatchSplit(nnx.Module):
    """Inverse of a merge inside each main patch: LN(dim) -> Linear(4F, no bias) -> 2x2 split."""

    def __init__(
        self, dim: int, fpn_dim: int, *, rngs: nnx.Rngs, eps: float = 1e-6, dtype=jnp.float32
    ):
        self.fpn_dim = fpn_dim
        self.norm = layers.LayerNorm(dim, rngs=rngs, eps=eps, dtype=dtype)
        self.reduction = layers.Linear(
            dim, 4 * fpn_dim, ("embed", None), rngs=rngs, use_bias=False, dtype=dtype
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """`[batch, N, h, w, dim]` -> `[batch, N, 2h, 2w, F]`."""
        return split_inner(self.reduction(self.norm(x)), self.fpn_dim)


class FeaturePyramid(nnx.Module):
    """Top-down pyramid on HiViT stage features (SPEC 3.2), per main patch.

    P16 = align(stage 3); P8 = blocks(split(stage 3) + align(stage 2));
    P4 = blocks(split(P8) + align(stage 1)); each output then passes one more MLP block
    (`fpn_modules[i]`). `remat` rematerializes every block (models/remat.py).
    """

    def __init__(
        self,
        dims: tuple[int, int, int],
        fpn_dim: int,
        *,
        rngs: nnx.Rngs,
        fpn_depth: int = 2,
        mlp_ratio: float = 4.0,
        eps: float = 1e-6,
        dtype=jnp.float32,
        remat: str = "none",
    ):
        self.remat = remat_lib.check(remat)
        c1, c2, c3 = dims
        kw = dict(rngs=rngs, eps=eps, dtype=dtype)

        def mlp_blocks(count: int) -> nnx.List:
            return nnx.List([hivit.Block(fpn_dim, 0, mlp_ratio, **kw) for _ in range(count)])

        self.align_dim_16tofpn = (
            layers.Linear(c3, fpn_dim, ("embed", None), rngs=rngs, dtype=dtype)
            if c3 != fpn_dim
            else None
        )
        self.align_dim_16to8 = layers.Linear(
            c2, fpn_dim, ("embed", None), rngs=rngs, use_bias=False, dtype=dtype
        )
        self.split_16to8 = PatchSplit(c3, fpn_dim, **kw)
        self.block_16to8 = mlp_blocks(fpn_depth)
        self.align_dim_8to4 = layers.Linear(
            c1, fpn_dim, ("embed", None), rngs=rngs, use_bias=False, dtype=dtype
        )
        self.split_8to4 = PatchSplit(fpn_dim, fpn_dim, **kw)
        self.block_8to4 = mlp_blocks(fpn_depth)
        self.fpn_modules = mlp_blocks(3)

    def __call__(self, stage1: jax.Array, stage2: jax.Array, stage3: jax.Array) -> Pyramid:
        """stage1 `[B, N, 4, 4, C1]`, stage2 `[B, N, 2, 2, C2]`, stage3 `[B, N, C3]` ->
        (P16 `[B, N, 1, 1, F]`, P8 `[B, N, 2, 2, F]`, P4 `[B, N, 4, 4, F]`)."""
        x = stage3[:, :, None, None, :]
        p16 = x if self.align_dim_16tofpn is None else self.align_dim_16tofpn(x)
        p8 = self.split_16to8(x) + self.align_dim_16to8(stage2)
        for block in self.block_16to8:
            p8 = self._block(block, p8)
        p4 = self.split_8to4(p8) + self.align_dim_8to4(stage1)
        for block in self.block_8to4:
            p4 = self._block(block, p4)
        return tuple(
            self._block(m, p) for m, p in zip(self.fpn_modules, (p16, p8, p4), strict=True)
        )

    def _block(self, block: hivit.Block, x: jax.Array) -> jax.Array:
        return remat_lib.call(self.remat, hivit.Block.__call__, block, x)


class DecoderEmbed(nnx.Module):
    """LN(F) + Linear(F -> D / k**2) for a level with k x k tokens per main patch."""

    def __init__(self, fpn_dim: int, out_dim: int, *, rngs: nnx.Rngs, eps: float, dtype):
        self.norm = layers.LayerNorm(fpn_dim, rngs=rngs, eps=eps, dtype=dtype)
        self.proj = layers.Linear(fpn_dim, out_dim, (None, "embed"), rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """`[B, N, k, k, F]` -> `[B, N, k*k*D/k**2]`, flattened in (row, col, channel) order."""
        x = self.proj(self.norm(x))
        return x.reshape(*x.shape[:2], -1)


def place_kept(tokens: jax.Array, ids_keep: jax.Array, num_patches: int, fill: jax.Array):
    """`tokens [B, N_keep, D]` of patches `ids_keep [B, N_keep]` -> `[B, L, D]` in raster order,
    `fill [D]` at the other slots. Equals the official append-then-`ids_restore` gather (whose
    ids_keep is the shuffled prefix); built from comparisons, no scatter."""
    onehot = ids_keep[:, :, None] == jnp.arange(num_patches, dtype=ids_keep.dtype)
    kept = jnp.any(onehot, axis=1)
    rank = jnp.sum(onehot * jnp.arange(ids_keep.shape[1], dtype=jnp.int32)[:, None], axis=1)
    gathered = jnp.take_along_axis(tokens, rank[..., None], axis=1)
    return jnp.where(kept[..., None], gathered, fill.astype(tokens.dtype))


def removed_mask(ids_keep: jax.Array, num_patches: int) -> jax.Array:
    """int32 `[B, L]`, 1 for main patches not in ids_keep (MAE's `mask`)."""
    kept = jnp.any(ids_keep[:, :, None] == jnp.arange(num_patches, dtype=ids_keep.dtype), axis=1)
    return 1 - kept.astype(jnp.int32)


class PixelOutputs(NamedTuple):
    """pred `[B, L, p*p*C]`; decoded `[B, L, D]` (decoder output after its LN, the pixel
    head's input, where extra heads attach); pyramid (P16, P8, P4) of kept patches."""

    pred: jax.Array
    decoded: jax.Array
    pyramid: Pyramid


class iTPNPixelModel(nnx.Module):  # noqa: N801 (the paper's spelling)
    """HiViT + pyramid on kept patches, multi-scale MAE decoder on all patches (SPEC 3.3).

    Decoder input: each level's `decoder_embed` output placed at its patches with
    `mask_token` elsewhere; x = P16 level + fixed 2-D sin-cos position + P8 level + P4 level
    (masked slots get 3 mask tokens); `decoder_depth` attention blocks (no bias table),
    `decoder_norm`, `decoder_pred` Linear(D -> patch_size**2 * in_chans). `remat` (none | full
    | dots) rematerializes every pyramid and decoder block (models/remat.py; the encoder has
    its own).
    """

    def __init__(
        self,
        encoder: hivit.HiViT,
        *,
        fpn_dim: int = 256,
        fpn_depth: int = 2,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        mlp_ratio: float = 4.0,
        in_chans: int = 3,
        norm_eps: float = 1e-6,
        dtype=jnp.float32,
        remat: str = "none",
        rngs: nnx.Rngs,
    ):
        if decoder_dim % 16:
            raise ValueError(f"decoder_dim={decoder_dim} must divide by 16 (4x4 P4 tokens)")
        self.encoder = encoder
        self.remat = remat_lib.check(remat)
        self.patch_size = encoder.patch_size
        self.num_patches = encoder.num_patches
        kw = dict(rngs=rngs, eps=norm_eps, dtype=dtype)
        self.pyramid = FeaturePyramid(
            encoder.dims, fpn_dim, fpn_depth=fpn_depth, mlp_ratio=mlp_ratio, remat=remat, **kw
        )
        self.decoder_embed = nnx.List(
            [DecoderEmbed(fpn_dim, decoder_dim // k**2, **kw) for k in (1, 2, 4)]
        )
        self.mask_token = layers.param(
            rngs, nnx.initializers.normal(0.02), (decoder_dim,), ("embed",)
        )
        self.decoder_blocks = nnx.List(
            [hivit.Block(decoder_dim, decoder_heads, mlp_ratio, **kw) for _ in range(decoder_depth)]
        )
        self.decoder_norm = layers.LayerNorm(decoder_dim, **kw)
        self.decoder_pred = layers.Linear(
            decoder_dim, self.patch_size**2 * in_chans, ("embed", None), rngs=rngs, dtype=dtype
        )

    @property
    def pos_embed(self) -> np.ndarray:
        """The decoder's fixed 2-D sin-cos position embedding `[L, D]` (a constant)."""
        return layers.sincos_pos_embed(self.mask_token.shape[0], self.encoder.grid)

    def decode(self, pyramid: Pyramid, ids_keep: jax.Array) -> jax.Array:
        """Pyramid of kept patches -> decoder output after its LN, `[B, L, D]`."""
        mask_token = self.mask_token[...]
        levels = [
            place_kept(embed(level), ids_keep, self.num_patches, mask_token)
            for embed, level in zip(self.decoder_embed, pyramid, strict=True)
        ]
        x = levels[0] + jnp.asarray(self.pos_embed, levels[0].dtype)
        for level in levels[1:]:
            x = x + level
        x = layers.constrain_batch(x)
        for block in self.decoder_blocks:
            x = remat_lib.call(self.remat, hivit.Block.__call__, block, x)
        return self.decoder_norm(x)

    def __call__(
        self, images: jax.Array, ids_keep: jax.Array, *, rngs: nnx.Rngs | None = None
    ) -> PixelOutputs:
        """images `[B, H, W, C]`, ids_keep int `[B, N_keep]` -> PixelOutputs (pred per main patch
        in raster order, vector order (row, col, channel) as MAE's patchify)."""
        pyramid = self.pyramid(*self.encoder(images, ids_keep, rngs=rngs))
        decoded = self.decode(pyramid, ids_keep)
        return PixelOutputs(self.decoder_pred(decoded), decoded, pyramid)


# --- PyTorch import ---------------------------------------------------------------------------

_W = r"(weight|bias)"
_BLOCK = hivit.TORCH_BLOCK
TORCH_TABLE = (
    *hivit.ENCODER_TABLE,
    (rf"^pyramid\.(align_dim_\w+)\.{_W}$", r"\1.\2"),
    (rf"^pyramid\.(split_16to8|split_8to4)\.(norm|reduction)\.{_W}$", r"\1.\2.\3"),
    (rf"^pyramid\.(block_16to8|block_8to4|fpn_modules)\.(\d+)\.{_BLOCK}$", r"\1.\2.\3.\4"),
    (rf"^decoder_embed\.(\d+)\.norm\.{_W}$", r"decoder_embed.\1.0.\2"),
    (rf"^decoder_embed\.(\d+)\.proj\.{_W}$", r"decoder_embed.\1.1.\2"),
    (r"^mask_token$", "mask_token"),
    (rf"^decoder_blocks\.(\d+)\.{_BLOCK}$", r"decoder_blocks.\1.\2.\3"),
    (rf"^(decoder_norm|decoder_pred)\.{_W}$", r"\1.\2"),
)
convert.TABLES["itpn"] = TORCH_TABLE


def load_torch(model: iTPNPixelModel, state_dict: Mapping[str, np.ndarray]) -> None:
    """Loads an official `iTPNMaskedAutoencoder` state_dict into `model`.

    Its recomputed buffers must be present and equal ours: `decoder_pos_embed` (2-D sin-cos,
    always in the official state_dict) and, with rpe, `relative_position_index`.
    """
    state = dict(state_dict)
    if "decoder_pos_embed" not in state:
        raise convert.ConversionError("decoder_pos_embed missing in state_dict")
    theirs = np.asarray(state.pop("decoder_pos_embed")).reshape(model.pos_embed.shape)
    if not np.allclose(theirs, model.pos_embed, atol=1e-6, rtol=0):
        raise convert.ConversionError("decoder_pos_embed differs from the 2-D sin-cos table")
    for key in [k for k in state if re.match(r"(.*\.)?relative_position_index$", k)]:
        grid = model.encoder.grid
        if not np.array_equal(state.pop(key), layers.relative_position_index(grid, grid)):
            raise convert.ConversionError(f"{key} differs from the relative position index")
    convert.load_into(model, state, "itpn")
