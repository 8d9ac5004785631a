"""OpenAI CLIP image encoder (ViT), the frozen feature teacher of iTPN's CLIP variant (SPEC 3.4).

Architecture as the released CLIP `VisionTransformer`: Conv(p x p, stride p, no bias), a class
token, a learned position embedding, `ln_pre`, pre-norm residual blocks (`ln_1` -> multi-head
attention with a fused `in_proj`, `ln_2` -> `c_fc` -> QuickGELU -> `c_proj`), `ln_post` and the
projection matrix `proj` `[width, output_dim]` (applied as `x @ proj`). QuickGELU
(x * sigmoid(1.702 x)) is CLIP's own activation, not the exact GELU used elsewhere. LayerNorm
eps 1e-5 (PyTorch default).

Parameter names map to the OpenAI state_dict keys under `visual.` with `TORCH_TABLE`
(registered as `convert.TABLES["clip_vit"]`); `load_torch` ignores the text tower's keys.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mim_jax import convert
from mim_jax.models import layers

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ARCHS = {
    "ViT-B/16": dict(patch_size=16, width=768, depth=12, heads=12, output_dim=512),
    "ViT-L/14": dict(patch_size=14, width=1024, depth=24, heads=16, output_dim=768),
}


def quick_gelu(x: jax.Array) -> jax.Array:
    """CLIP's activation: x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


class _Attention(nnx.Module):
    """nn.MultiheadAttention (self-attention): fused `in_proj` (q, k, v order), `out_proj`."""

    def __init__(self, width: int, heads: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.heads = heads
        self.in_proj = layers.Linear(width, 3 * width, ("embed", "heads"), rngs=rngs, dtype=dtype)
        self.out_proj = layers.Linear(width, width, ("heads", "embed"), rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        q, k, v = (layers.split_heads(t, self.heads) for t in jnp.split(self.in_proj(x), 3, -1))
        return self.out_proj(layers.merge_heads(layers.dot_product_attention(q, k, v)))


class _Mlp(nnx.Module):
    def __init__(self, width: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.c_fc = layers.Linear(width, 4 * width, ("embed", "mlp"), rngs=rngs, dtype=dtype)
        self.c_proj = layers.Linear(4 * width, width, ("mlp", "embed"), rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.c_proj(quick_gelu(self.c_fc(x)))


class ResidualAttentionBlock(nnx.Module):
    """x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.ln_1 = layers.LayerNorm(width, rngs=rngs, dtype=dtype)
        self.attn = _Attention(width, heads, rngs=rngs, dtype=dtype)
        self.ln_2 = layers.LayerNorm(width, rngs=rngs, dtype=dtype)
        self.mlp = _Mlp(width, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.ln_1(x))
        return layers.constrain_batch(x + self.mlp(self.ln_2(x)))


class CLIPVisionEncoder(nnx.Module):
    """CLIP ViT: images `[batch, H, W, 3]` (CLIP-normalized) -> projected patch tokens
    `[batch, (H/p)*(W/p), output_dim]` (after `ln_post` and `proj`, class token dropped)."""

    def __init__(
        self,
        *,
        img_size: int,
        patch_size: int,
        width: int,
        depth: int,
        heads: int,
        output_dim: int,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if img_size % patch_size or width % heads:
            raise ValueError(
                f"CLIP ViT: patch_size={patch_size} must divide img_size={img_size} and "
                f"heads={heads} must divide width={width}"
            )
        self.grid = img_size // patch_size
        init = nnx.initializers.normal(width**-0.5)
        self.conv1 = nnx.Conv(
            3,
            width,
            kernel_size=(patch_size, patch_size),
            strides=(patch_size, patch_size),
            padding="VALID",
            use_bias=False,
            dtype=dtype,
            param_dtype=jnp.float32,
            kernel_init=layers.sharded(init, ("patch", "patch", "channels", "embed")),
            rngs=rngs,
        )
        self.class_embedding = layers.param(rngs, init, (width,), ("embed",))
        self.positional_embedding = layers.param(
            rngs, init, (1 + self.grid**2, width), (None, "embed")
        )
        self.ln_pre = layers.LayerNorm(width, rngs=rngs, dtype=dtype)
        self.resblocks = nnx.List(
            [ResidualAttentionBlock(width, heads, rngs=rngs, dtype=dtype) for _ in range(depth)]
        )
        self.ln_post = layers.LayerNorm(width, rngs=rngs, dtype=dtype)
        self.proj = layers.param(rngs, init, (width, output_dim), ("embed", None))

    def __call__(self, images: jax.Array) -> jax.Array:
        x = self.conv1(images)
        b, h, w, c = x.shape
        x = x.reshape(b, h * w, c)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (b, 1, c))
        x = jnp.concatenate([cls, x], axis=1) + self.positional_embedding[...].astype(x.dtype)
        x = layers.constrain_batch(self.ln_pre(x))
        for block in self.resblocks:
            x = block(x)
        x = self.ln_post(x[:, 1:])
        return x @ self.proj[...].astype(x.dtype)


# --- PyTorch import ---------------------------------------------------------------------------

_W = r"(weight|bias)"
_RES = r"^resblocks\.(\d+)\."
_TORCH_RES = r"visual.transformer.resblocks.\1."
TORCH_TABLE = (
    (r"^conv1\.weight$", "visual.conv1.weight"),
    (r"^(class_embedding|positional_embedding|proj)$", r"visual.\1"),
    (rf"^(ln_pre|ln_post)\.{_W}$", r"visual.\1.\2"),
    (rf"{_RES}(ln_1|ln_2)\.{_W}$", rf"{_TORCH_RES}\2.\3"),
    (rf"{_RES}attn\.in_proj\.{_W}$", rf"{_TORCH_RES}attn.in_proj_\2"),
    (rf"{_RES}attn\.out_proj\.{_W}$", rf"{_TORCH_RES}attn.out_proj.\2"),
    (rf"{_RES}mlp\.(c_fc|c_proj)\.{_W}$", rf"{_TORCH_RES}mlp.\2.\3"),
)
convert.TABLES["clip_vit"] = TORCH_TABLE


def visual_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The image tower's entries (`visual.*`) of a full OpenAI CLIP state_dict."""
    return {k: np.asarray(v) for k, v in state_dict.items() if re.match(r"^visual\.", k)}


def import_torch(params: Mapping, state_dict: Mapping[str, np.ndarray]) -> dict:
    """`params` (pure dict of a CLIPVisionEncoder) with values from an OpenAI CLIP state_dict
    (numpy; text-tower keys are ignored, every `visual.*` key must be used)."""
    return convert.import_torch(params, visual_state_dict(state_dict), "clip_vit")
