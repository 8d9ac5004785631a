"""BEiT-style Vision Transformer as used by SimMIM (SPEC 1.3, 1.7, 1.8).

Pre-norm blocks with q/v biases (k bias fixed at 0), LayerScale (`gamma_1`, `gamma_2`), a
relative position bias over the cls token plus the patch grid (one table shared by all blocks
for pretraining, or one per block for fine-tuning) and an optional SimMIM mask token.

Parameter names follow the official PyTorch model (`patch_embed.proj`, `cls_token`,
`rel_pos_bias.relative_position_bias_table`, `blocks.{i}.attn.qkv`, `blocks.{i}.attn.q_bias`,
`blocks.{i}.gamma_1`, `blocks.{i}.mlp.fc1`, `norm`, ...), so checkpoints convert with one name
table. `cls_token`, `mask_token` and `pos_embed` drop PyTorch's leading singleton axes.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mim_jax.models import layers, pos_resize
from mim_jax.models import remat as remat_lib


def num_relative_distances(height: int, width: int) -> int:
    """Rows of a BEiT bias table: `(2h-1)(2w-1)` offsets + cls->token, token->cls, cls->cls."""
    return (2 * height - 1) * (2 * width - 1) + 3


@functools.lru_cache(maxsize=64)
def relative_position_index_with_cls(height: int, width: int) -> np.ndarray:
    """Index `[1 + h*w, 1 + h*w]` into a BEiT bias table for the cls token (first) + patches.

    Patch pairs use the Swin index; the last three table rows hold cls->token (row 0 of the
    index: the cls token as query), token->cls (column 0) and cls->cls (entry [0, 0]).
    """
    rows = num_relative_distances(height, width)
    n = height * width
    index = np.zeros((n + 1, n + 1), np.int32)
    index[1:, 1:] = layers.relative_position_index(height, width)
    index[0, :] = rows - 3
    index[:, 0] = rows - 2
    index[0, 0] = rows - 1
    index.setflags(write=False)
    return index


def relative_position_bias(table: jax.Array, height: int, width: int) -> jax.Array:
    """Bias table `[rows, heads]` -> `[heads, 1 + h*w, 1 + h*w]` (float32)."""
    bias = table[relative_position_index_with_cls(height, width)]
    return jnp.moveaxis(bias, -1, 0).astype(jnp.float32)


def _bias_table(rngs: nnx.Rngs, grid: int, num_heads: int) -> nnx.Param:
    return layers.param(
        rngs,
        nnx.initializers.zeros_init(),
        (num_relative_distances(grid, grid), num_heads),
        ("table", None),
    )


class RelativePositionBias(nnx.Module):
    """The bias table shared by every block (SimMIM pretraining, `USE_SHARED_RPB`)."""

    def __init__(self, grid: int, num_heads: int, *, rngs: nnx.Rngs):
        self.grid = grid
        self.relative_position_bias_table = _bias_table(rngs, grid, num_heads)

    def __call__(self) -> jax.Array:
        """`[heads, 1 + grid**2, 1 + grid**2]` (float32)."""
        return relative_position_bias(self.relative_position_bias_table[...], self.grid, self.grid)


class Attention(nnx.Module):
    """Global multi-head self-attention; qkv Linear without bias plus learned q and v biases."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        grid: int,
        *,
        rngs: nnx.Rngs,
        qkv_bias: bool = True,
        use_rel_pos_bias: bool = False,
        dtype: jnp.dtype = jnp.float32,
    ):
        self.num_heads = num_heads
        self.grid = grid
        self.qkv = layers.Linear(
            dim, 3 * dim, ("embed", "heads"), rngs=rngs, use_bias=False, dtype=dtype
        )
        zeros = nnx.initializers.zeros_init()
        self.q_bias = layers.param(rngs, zeros, (dim,), ("heads",)) if qkv_bias else None
        self.v_bias = layers.param(rngs, zeros, (dim,), ("heads",)) if qkv_bias else None
        self.relative_position_bias_table = (
            _bias_table(rngs, grid, num_heads) if use_rel_pos_bias else None
        )
        self.proj = layers.Linear(dim, dim, ("heads", "embed"), rngs=rngs, dtype=dtype)

    def qkv_heads(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """`[batch, tokens, C]` -> q, k, v each `[batch, heads, tokens, head_dim]`."""
        qkv = self.qkv(x)
        if self.q_bias is not None:
            q_bias = self.q_bias[...]
            bias = jnp.concatenate([q_bias, jnp.zeros_like(q_bias), self.v_bias[...]])
            qkv = qkv + bias.astype(qkv.dtype)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        return tuple(layers.split_heads(t, self.num_heads) for t in (q, k, v))

    def __call__(self, x: jax.Array, rel_pos_bias: jax.Array | None = None) -> jax.Array:
        """x `[batch, 1 + h*w, C]`; rel_pos_bias `[heads, 1 + h*w, 1 + h*w]` (shared) or None."""
        q, k, v = self.qkv_heads(x)
        bias = rel_pos_bias
        if self.relative_position_bias_table is not None:
            table = self.relative_position_bias_table[...]
            own = relative_position_bias(table, self.grid, self.grid)
            bias = own if bias is None else bias + own
        return self.proj(layers.merge_heads(layers.dot_product_attention(q, k, v, bias)))


class Block(nnx.Module):
    """Pre-norm block: x + drop_path(gamma_1 * attn(norm1(x))), then the same with the MLP."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        grid: int,
        *,
        rngs: nnx.Rngs,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        eps: float = 1e-6,
        init_values: float = 0.1,
        use_rel_pos_bias: bool = False,
        dtype: jnp.dtype = jnp.float32,
    ):
        self.drop_path = drop_path
        self.norm1 = layers.LayerNorm(dim, rngs=rngs, eps=eps, dtype=dtype)
        self.attn = Attention(
            dim,
            num_heads,
            grid,
            rngs=rngs,
            qkv_bias=qkv_bias,
            use_rel_pos_bias=use_rel_pos_bias,
            dtype=dtype,
        )
        self.norm2 = layers.LayerNorm(dim, rngs=rngs, eps=eps, dtype=dtype)
        self.mlp = layers.Mlp(dim, int(dim * mlp_ratio), rngs=rngs, dtype=dtype)
        scale = nnx.initializers.constant(init_values)
        use_scale = init_values is not None and init_values > 0
        self.gamma_1 = layers.param(rngs, scale, (dim,), ("embed",)) if use_scale else None
        self.gamma_2 = layers.param(rngs, scale, (dim,), ("embed",)) if use_scale else None

    @staticmethod
    def _scaled(h: jax.Array, gamma: nnx.Param | None) -> jax.Array:
        return h if gamma is None else h * gamma[...].astype(h.dtype)

    def __call__(
        self, x: jax.Array, rel_pos_bias: jax.Array | None = None, rngs: nnx.Rngs | None = None
    ) -> jax.Array:
        """x `[batch, tokens, C]` -> same shape."""
        h = self._scaled(self.attn(self.norm1(x), rel_pos_bias), self.gamma_1)
        x = x + layers.drop_path(h, self.drop_path, rngs)
        h = self._scaled(self.mlp(x, self.norm2), self.gamma_2)
        x = x + layers.drop_path(h, self.drop_path, rngs)
        return layers.constrain_batch(x)


class VisionTransformer(nnx.Module):
    """ViT encoder: images `[batch, H, W, 3]` (+ optional SimMIM mask) -> `[batch, h, w, C]`.

    With `use_mask_token`, patch embeddings at masked positions (mask `[batch, H/p, W/p]`,
    1 = masked) are replaced by a learned token right after the patch projection, before the
    cls token is prepended and before any absolute position embedding (SPEC 1.3). The output
    drops the cls token and follows the final LayerNorm (none with `use_mean_pooling`, where
    the official model's `norm` is Identity and the classifier's `fc_norm` follows the mean).
    `remat` (none | full | dots) rematerializes every block (models/remat.py).

    Init (official `_init_weights` + `fix_init_weight`): Linear/Conv weights, `cls_token`,
    `pos_embed` and `mask_token` truncated normal std 0.02, biases 0, LayerNorm (1, 0),
    `gamma_*` = init_values, bias tables 0; block i's (1-based) `attn.proj` and `mlp.fc2`
    kernels divided by sqrt(2 i). Truncation is at `trunc_bound` std: the SimMIM encoder
    (`use_mask_token`, the default for it is 1) overrides `_trunc_normal_` with a=-std, b=std
    for every one of these inits, not only the mask token; otherwise 2 (timm's bounds of ±2 are
    absolute, i.e. ±100 std, so this is a near-equivalent).
    """

    def __init__(
        self,
        *,
        img_size: int,
        patch_size: int,
        in_chans: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
        init_values: float = 0.1,
        use_abs_pos: bool = False,
        use_shared_rel_pos_bias: bool = True,
        use_rel_pos_bias: bool = False,
        use_mask_token: bool = False,
        use_mean_pooling: bool = False,
        trunc_bound: float | None = None,
        dtype: jnp.dtype = jnp.float32,
        remat: str = "none",
        rngs: nnx.Rngs,
    ):
        if img_size % patch_size:
            raise ValueError(f"img_size={img_size} is not divisible by patch_size={patch_size}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
        self.remat = remat_lib.check(remat)
        self.patch_size = patch_size
        self.stride = patch_size
        self.num_features = embed_dim
        self.grid = img_size // patch_size
        bound = trunc_bound if trunc_bound is not None else (1.0 if use_mask_token else 2.0)
        init = nnx.initializers.truncated_normal(0.02, lower=-bound, upper=bound)

        self.patch_embed = layers.PatchEmbed(
            patch_size, in_chans, embed_dim, rngs=rngs, norm=False, dtype=dtype
        )
        self.cls_token = layers.param(rngs, init, (embed_dim,), ("embed",))
        self.mask_token = (
            layers.param(rngs, init, (embed_dim,), ("embed",)) if use_mask_token else None
        )
        self.pos_embed = (
            layers.param(rngs, init, (1 + self.grid**2, embed_dim), (None, "embed"))
            if use_abs_pos
            else None
        )
        self.rel_pos_bias = (
            RelativePositionBias(self.grid, num_heads, rngs=rngs)
            if use_shared_rel_pos_bias
            else None
        )
        rates = np.linspace(0.0, drop_path_rate, depth).tolist()
        self.blocks = nnx.List(
            [
                Block(
                    embed_dim,
                    num_heads,
                    self.grid,
                    rngs=rngs,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    drop_path=rates[i],
                    eps=norm_eps,
                    init_values=init_values,
                    use_rel_pos_bias=use_rel_pos_bias,
                    dtype=dtype,
                )
                for i in range(depth)
            ]
        )
        self.norm = (
            None
            if use_mean_pooling
            else layers.LayerNorm(embed_dim, rngs=rngs, eps=norm_eps, dtype=dtype)
        )
        self._init_weights(init, rngs)

    def _init_weights(self, init: nnx.Initializer, rngs: nnx.Rngs) -> None:
        """Redraws every Linear/Conv kernel with `init`, then rescales proj / fc2 by depth."""
        kernels = [self.patch_embed.proj.kernel]
        for block in self.blocks:
            kernels += [block.attn.qkv.kernel, block.attn.proj.kernel]
            kernels += [block.mlp.fc1.kernel, block.mlp.fc2.kernel]
        keys = jax.random.split(rngs.params(), len(kernels))
        for key, kernel in zip(keys, kernels, strict=True):
            kernel.set_value(init(key, kernel.shape, jnp.float32))
        for layer_id, block in enumerate(self.blocks, start=1):
            for kernel in (block.attn.proj.kernel, block.mlp.fc2.kernel):
                kernel.set_value(kernel[...] / math.sqrt(2.0 * layer_id))

    def embed(self, images: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """Patch embedding with mask-token replacement: `[batch, H/p, W/p, C]`."""
        x = self.patch_embed(images)
        if mask is not None:
            x = layers.replace_masked(x, mask, self.mask_token, type(self).__name__)
        return layers.constrain_batch(x)

    def tokens(
        self, images: jax.Array, mask: jax.Array | None = None, *, rngs: nnx.Rngs | None = None
    ) -> jax.Array:
        """All tokens after the blocks, before the final norm: `[batch, 1 + h*w, C]` (cls first)."""
        x = self.embed(images, mask)
        b, h, w, c = x.shape
        x = x.reshape(b, h * w, c)
        cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (b, 1, c))
        x = jnp.concatenate([cls, x], axis=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed[...].astype(x.dtype)
        x = layers.constrain_batch(x)
        rel_pos_bias = self.rel_pos_bias() if self.rel_pos_bias is not None else None
        for block in self.blocks:
            x = remat_lib.call(self.remat, Block.__call__, block, x, rel_pos_bias, rngs)
        return x

    def __call__(
        self, images: jax.Array, mask: jax.Array | None = None, *, rngs: nnx.Rngs | None = None
    ) -> jax.Array:
        """images `[batch, H, W, C_in]`, mask `[batch, H/p, W/p]` -> `[batch, H/p, W/p, C]`."""
        x = self.tokens(images, mask, rngs=rngs)
        if self.norm is not None:
            x = self.norm(x)
        b, _, c = x.shape
        h = images.shape[1] // self.patch_size
        return x[:, 1:].reshape(b, h, -1, c)


SHARED_TABLE = "encoder.rel_pos_bias.relative_position_bias_table"
_BLOCK_TABLE = re.compile(r"^encoder\.blocks\.\d+\.attn\.relative_position_bias_table$")


def remap_pretrained(
    source: dict[str, np.ndarray], target: Mapping[str, tuple[int, ...]]
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Key surgery for loading ViT encoder weights (paths under `encoder.`) into a model whose
    parameter shapes are `target` (SimMIM `remap_pretrained_keys_vit`, SPEC 1.6): the shared
    relative position bias of pretraining is copied into every block's own table when the
    target has per-block tables only; tables whose patch grid differs are resized by the
    geometric-progression cubic interpolation (the 3 cls rows kept); an absolute position
    embedding whose grid differs is resized bicubically (the cls row kept). Returns the new
    weights and notes. A table with another head or channel count is left as it is (the
    caller reports it); ValueError names a table that cannot be resized."""
    out, notes = dict(source), []
    blocks = sorted(k for k in target if _BLOCK_TABLE.match(k))
    if SHARED_TABLE in out and SHARED_TABLE not in target and blocks:
        shared = out.pop(SHARED_TABLE)
        out.update({key: shared.copy() for key in blocks})
        notes.append(f"{SHARED_TABLE} copied into {len(blocks)} blocks")
    for key, value in list(out.items()):
        want = target.get(key)
        if not want or value.shape == want or value.shape[1:] != tuple(want[1:]):
            continue
        try:
            if key.endswith("relative_position_bias_table"):
                grid = (math.isqrt(want[0] - 3) + 1) // 2
                out[key] = pos_resize.resize_rel_pos_table_with_extra(value, grid, num_extra=3)
            elif key == "encoder.pos_embed":
                grid = math.isqrt(want[0] - 1)
                out[key] = pos_resize.resize_abs_pos_embed(value, grid, num_extra=1)
            else:
                continue
        except ValueError as e:
            raise ValueError(f"{key} {value.shape} cannot be resized to {want}: {e}") from e
        notes.append(f"{key} {value.shape}->{out[key].shape}")
    return out, notes
