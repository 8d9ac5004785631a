"""Building blocks shared by every encoder: dense layers with logical sharding names, norms,
MLP, stochastic depth, patch embedding and merging, relative position indices, attention.

Layouts: images are NHWC; token tensors are `[batch, tokens, channels]`; attention tensors are
`[batch, heads, tokens, head_dim]`. Parameters are float32; `dtype` is the compute dtype.
Every parameter carries logical axis names ('embed', 'mlp', 'heads', ...) that
`mim_jax.sharding` maps to mesh axes through the config's rules.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mim_jax.models import backward

Names = tuple[str | None, ...]
MASK_VALUE = -1e9  # Added to blocked attention logits (computed in float32).


def trunc_normal(std: float = 0.02) -> nnx.Initializer:
    """Truncated normal initializer (±2 std), the timm/PyTorch `trunc_normal_` counterpart."""
    return nnx.initializers.truncated_normal(stddev=std)


def torch_default_init(fan_in: int) -> nnx.Initializer:
    """PyTorch's default Linear/Conv weight init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = fan_in**-0.5

    def init(key: jax.Array, shape: Sequence[int], dtype: jnp.dtype = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def sharded(init: nnx.Initializer, names: Names) -> nnx.Initializer:
    """Attaches logical axis names to an initializer (resolved to mesh axes in sharding.py)."""
    return nnx.with_partitioning(init, names, eager_sharding=False)


def param(rngs: nnx.Rngs, init: nnx.Initializer, shape: Sequence[int], names: Names) -> nnx.Param:
    """A float32 parameter with logical axis names."""
    return nnx.Param(
        init(rngs.params(), tuple(shape), jnp.float32), out_sharding=names, eager_sharding=False
    )


class Linear(nnx.Linear):
    """nnx.Linear with trunc_normal(0.02) weights, zero bias, logical axis names and the
    backward of `linear` (same values as autodiff)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        names: Names,
        *,
        rngs: nnx.Rngs,
        use_bias: bool = True,
        dtype: jnp.dtype = jnp.float32,
        kernel_init: nnx.Initializer | None = None,
    ):
        super().__init__(
            in_features,
            out_features,
            use_bias=use_bias,
            dtype=dtype,
            param_dtype=jnp.float32,
            kernel_init=sharded(kernel_init or trunc_normal(), names),
            bias_init=sharded(nnx.initializers.zeros_init(), (names[-1],)),
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """`x @ kernel + bias` in the compute dtype, with `linear`'s backward."""
        dtype = jnp.dtype(self.dtype or x.dtype)
        bias = self.bias[...] if self.bias is not None else jnp.zeros(self.out_features)
        return linear(x.astype(dtype), self.kernel[...], bias, dtype)


def kernel_grad(x: jax.Array, dx: jax.Array, g: jax.Array) -> jax.Array:
    """float32 `x^T g` over all leading axes (a Linear's kernel gradient for input `x`, output
    gradient `g`), computed only once the input gradient `dx` (same shape as x) exists.

    `dx` reads the kernel, so the optimizer's in-place update of the donated kernel, which
    needs this gradient, provably comes after that read; `x + 0 * dx` says so to XLA without
    changing a value. Otherwise XLA's copy insertion keeps a copy of every weight the backward
    reads (XLA:CPU ignores optimization barriers there, openxla/xla#20440) unless gradient
    clipping orders every update after the whole backward. GreenMIM's recipe has none: 367 MB of
    weight copies at Swin-B/224 batch 32 (temp 1.70 -> 1.65 GB without them).
    """
    ordered = x + 0.0 * dx.astype(x.dtype)
    return jnp.dot(_flat(ordered).T, _flat(g), preferred_element_type=jnp.float32)


def _flat(x):
    return x.reshape(-1, x.shape[-1])


def _input_grad(g, kernel, dtype):
    """`g @ kernel^T` over the last axis, in `dtype`."""
    return jax.lax.dot_general(g, kernel.astype(dtype), (((g.ndim - 1,), (1,)), ((), ())))


@functools.partial(backward.custom_vjp, nondiff_argnums=(3,))
def linear(x: jax.Array, kernel: jax.Array, bias: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """`x @ kernel + bias` (x already in `dtype`) whose kernel gradient waits for the input
    gradient (`kernel_grad`); the backward keeps what autodiff would (x and the kernel)."""
    return _affine(x, kernel, bias, dtype)


def _linear_fwd(x, kernel, bias, dtype):
    return _affine(x, kernel, bias, dtype), (x, kernel)


def _linear_bwd(dtype, residuals, g):
    x, kernel = residuals
    dx = _input_grad(g, kernel, dtype)
    return dx, kernel_grad(x, dx, g), jnp.sum(_flat(g).astype(jnp.float32), axis=0)


linear.defvjp(_linear_fwd, _linear_bwd)


class LayerNorm(nnx.LayerNorm):
    """LayerNorm over the last axis with PyTorch's eps default (1e-5) and float32 statistics.

    Its backward keeps only the normalized input (in the compute dtype) and the inverse std;
    autodiff keeps up to three more token-sized buffers per norm (centered input, scaled
    product, ...), a large share of a transformer's activation memory.
    """

    def __init__(
        self, dim: int, *, rngs: nnx.Rngs, eps: float = 1e-5, dtype: jnp.dtype = jnp.float32
    ):
        super().__init__(dim, epsilon=eps, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = jnp.dtype(self.dtype or x.dtype)
        return layer_norm(x, self.scale[...], self.bias[...], self.epsilon, dtype)


def _normalize(x, eps):
    """float32 `(x - mean) / std` over the last axis and `1 / std` (flax's fast variance).

    The divisor is token-shaped on purpose (`std + 0 * x`): XLA keeps a division by a
    full-size operand as a division, which its fusion pass will not duplicate into consumers.
    With `* rstd` (or `/ std` on the broadcast, which XLA rewrites to a product), XLA:CPU
    recomputes the normalized input inside the backward's dx fusion from `x`, so it keeps `x`
    alive beside the stored normalized input (GreenMIM Swin-B/224 batch 32: 2.04 -> 1.90 GB temp,
    SimMIM 7.45 -> 7.40 GB).
    """
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True) - jnp.square(mean)
    std = jnp.sqrt(jnp.maximum(var, 0.0) + eps)
    return (x32 - mean) / (std + 0.0 * x32), 1.0 / std


@functools.partial(backward.custom_vjp, nondiff_argnums=(3, 4))
def layer_norm(
    x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float, dtype: jnp.dtype
) -> jax.Array:
    """`normalize(x) * scale + bias` in `dtype` (statistics in float32), last axis."""
    xhat, _ = _normalize(x, eps)
    return (xhat * scale + bias).astype(dtype)


def _layer_norm_fwd(x, scale, bias, eps, dtype):
    xhat, rstd = _normalize(x, eps)
    # The empty array carries x's dtype to the backward.
    residuals = (xhat.astype(dtype), rstd, scale, jnp.zeros((0,), x.dtype))
    return (xhat * scale + bias).astype(dtype), residuals


def _layer_norm_bwd(eps, dtype, residuals, g):
    xhat, rstd, scale, x_like = residuals
    xhat = xhat.astype(jnp.float32)
    g = g.astype(jnp.float32)
    axes = tuple(range(g.ndim - 1))
    # `scale` and `rstd` are broadcast at a flattened shape: at the forward's shapes XLA's CSE
    # merges these broadcasts with the forward's, which XLA:CPU then keeps token-sized from the
    # forward to here (one buffer per norm each; each fix took about 10% off a dense Swin-B
    # step's temp memory).
    flat = (-1, g.shape[-1])
    gx = (g.reshape(flat) * scale).reshape(g.shape)
    mean_gx = jnp.mean(gx, axis=-1, keepdims=True)
    mean_gxx = jnp.mean(gx * xhat, axis=-1, keepdims=True)
    inner = (gx - mean_gx - xhat * mean_gxx).reshape(flat)
    dx = (rstd.reshape(-1, 1) * inner).reshape(g.shape)
    return dx.astype(x_like.dtype), jnp.sum(g * xhat, axes), jnp.sum(g, axes)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def norm_linear(norm: LayerNorm | None, linear: Linear, x: jax.Array) -> jax.Array:
    """`linear(norm(x))` whose backward keeps only the normalized input and the inverse std
    (`linear(x)` when `norm` is None).

    Autodiff of the pair also keeps the Linear's input `xhat * scale + bias` for its kernel
    gradient: one more token-sized buffer per norm. Here that gradient is
    `scale[:, None] * (xhat^T g) + bias[:, None] * sum(g)`, which reads the stored `xhat`.
    Same parameters as the two modules (the parameter tree does not change).
    """
    if norm is None:
        return linear(x)
    if linear.bias is None:
        raise ValueError("norm_linear needs a Linear with a bias")
    dtype = jnp.dtype(norm.dtype or x.dtype)
    if jnp.dtype(linear.dtype or dtype) != dtype:
        raise ValueError(f"norm_linear: norm dtype {dtype} != linear dtype {linear.dtype}")
    return _norm_linear(
        x,
        norm.scale[...],
        norm.bias[...],
        linear.kernel[...],
        linear.bias[...],
        norm.epsilon,
        dtype,
    )


def _affine(y, kernel, bias, dtype):
    """nnx.Linear's forward on `y` (already in `dtype`)."""
    out = jax.lax.dot_general(y, kernel.astype(dtype), (((y.ndim - 1,), (0,)), ((), ())))
    return out + bias.astype(dtype)


@functools.partial(backward.custom_vjp, nondiff_argnums=(5, 6))
def _norm_linear(x, scale, bias, kernel, linear_bias, eps, dtype):
    return _affine(layer_norm(x, scale, bias, eps, dtype), kernel, linear_bias, dtype)


def _norm_linear_fwd(x, scale, bias, kernel, linear_bias, eps, dtype):
    y, residuals = _layer_norm_fwd(x, scale, bias, eps, dtype)
    return _affine(y, kernel, linear_bias, dtype), (residuals, bias, kernel)


def _norm_linear_bwd(eps, dtype, residuals, g):
    norm_residuals, bias, kernel = residuals
    xhat, _, scale, _ = norm_residuals
    g_sum = jnp.sum(_flat(g).astype(jnp.float32), axis=0)
    d_y = _input_grad(g, kernel, dtype)
    d_kernel = scale[:, None] * kernel_grad(xhat, d_y, g) + bias[:, None] * g_sum
    dx, d_scale, d_bias = _layer_norm_bwd(eps, dtype, norm_residuals, d_y)
    return dx, d_scale, d_bias, d_kernel, g_sum


_norm_linear.defvjp(_norm_linear_fwd, _norm_linear_bwd)


@backward.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, PyTorch's default, whose backward keeps only its input.

    Autodiff keeps the erfc and exp terms as well (XLA:CPU: four hidden-size buffers per MLP
    with fc2's input; this keeps two). The backward writes the CDF with erf, not the forward's
    erfc, so that XLA's CSE cannot merge it with the forward and keep that buffer after all.
    """
    return jax.nn.gelu(x, approximate=False)


def _gelu_fwd(x):
    return gelu(x), x


def _gelu_bwd(x, g):
    x32 = x.astype(jnp.float32)
    cdf = 0.5 * (1.0 + jax.lax.erf(x32 * 2.0**-0.5))
    pdf = jnp.exp(-0.5 * jnp.square(x32)) * (2.0 * np.pi) ** -0.5
    return ((g.astype(jnp.float32) * (cdf + x32 * pdf)).astype(x.dtype),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


class Mlp(nnx.Module):
    """fc1 -> GELU -> fc2, per token."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, dtype: jnp.dtype = jnp.float32):
        self.fc1 = Linear(dim, hidden, ("embed", "mlp"), rngs=rngs, dtype=dtype)
        self.fc2 = Linear(hidden, dim, ("mlp", "embed"), rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, norm: LayerNorm | None = None) -> jax.Array:
        """`x [..., dim]` -> `[..., dim]`; with `norm`, of `norm(x)` (through `norm_linear`)."""
        return self.fc2(gelu(norm_linear(norm, self.fc1, x)))


def drop_path(x: jax.Array, rate: float, rngs: nnx.Rngs | None) -> jax.Array:
    """Stochastic depth: zeroes whole samples' residual branches with probability `rate`.

    Inactive (identity) when `rngs` is None (evaluation) or rate is 0.
    """
    if rngs is None or rate == 0.0:
        return x
    keep = 1.0 - rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(rngs.dropout(), keep, shape)
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


class PatchEmbed(nnx.Module):
    """Non-overlapping patch projection (Conv p x p, stride p) with optional LayerNorm.

    [batch, H, W, in_chans] -> [batch, H/p, W/p, embed_dim].
    """

    def __init__(
        self,
        patch_size: int,
        in_chans: int,
        embed_dim: int,
        *,
        rngs: nnx.Rngs,
        norm: bool,
        eps: float = 1e-5,
        dtype: jnp.dtype = jnp.float32,
    ):
        self.proj = nnx.Conv(
            in_chans,
            embed_dim,
            kernel_size=(patch_size, patch_size),
            strides=(patch_size, patch_size),
            padding="VALID",
            dtype=dtype,
            param_dtype=jnp.float32,
            kernel_init=sharded(trunc_normal(), ("patch", "patch", "channels", "embed")),
            bias_init=sharded(nnx.initializers.zeros_init(), ("embed",)),
            rngs=rngs,
        )
        self.norm = LayerNorm(embed_dim, rngs=rngs, eps=eps, dtype=dtype) if norm else None

    def __call__(self, images: jax.Array) -> jax.Array:
        x = self.proj(images)
        return self.norm(x) if self.norm is not None else x

    def patches(self, images: jax.Array) -> jax.Array:
        """`[batch, H, W, in_chans]` -> `[batch, (H/p) * (W/p), p * p * in_chans]`: raster-order
        patches, each flattened as (row, col, channel) like the conv kernel."""
        b, h, w, c = images.shape
        p = self.proj.kernel_size[0]
        x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(b, (h // p) * (w // p), p * p * c)

    def embed_patches(self, patches: jax.Array) -> jax.Array:
        """The embedding of selected `patches [..., p * p * in_chans]` (from `patches`): the
        conv as a matmul, so a caller that keeps only some patches (GreenMIM's visible ones)
        never computes or stores the others."""
        dtype = self.proj.dtype or jnp.float32
        kernel = self.proj.kernel[...].reshape(-1, self.proj.out_features)
        x = jnp.dot(patches.astype(dtype), kernel.astype(dtype))
        x = x + self.proj.bias[...].astype(dtype)
        return self.norm(x) if self.norm is not None else x


class PatchMerging(nnx.Module):
    """Swin's 2x2 merge: concat [x(0,0), x(1,0), x(0,1), x(1,1)] -> LayerNorm(4C) -> Linear(2C).

    [batch, H, W, C] -> [batch, H/2, W/2, 2C].
    """

    def __init__(
        self, dim: int, *, rngs: nnx.Rngs, eps: float = 1e-5, dtype: jnp.dtype = jnp.float32
    ):
        self.norm = LayerNorm(4 * dim, rngs=rngs, eps=eps, dtype=dtype)
        self.reduction = Linear(
            4 * dim, 2 * dim, ("embed", None), rngs=rngs, use_bias=False, dtype=dtype
        )

    def merge(self, x: jax.Array) -> jax.Array:
        """Norm + reduction of already-concatenated `[..., 4C]` features."""
        return self.reduction(self.norm(x))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.concatenate(
            [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1
        )
        return self.merge(x)


def replace_masked(x: jax.Array, mask: jax.Array, token: nnx.Param | None, model: str) -> jax.Array:
    """SimMIM mask-token replacement: x `[B, h, w, C]` takes `token` where mask `[B, h, w]` is 1."""
    if token is None:
        raise ValueError(f"{model} got a mask but was built without a mask token")
    w = mask[..., None].astype(x.dtype)
    return x * (1 - w) + token[...].astype(x.dtype) * w


@functools.lru_cache(maxsize=64)
def relative_position_index(height: int, width: int) -> np.ndarray:
    """Swin/BEiT index into a `(2h-1)(2w-1)` bias table for every token pair of an h x w grid.

    index[i, j] = (dy + h - 1) * (2w - 1) + (dx + w - 1) with (dy, dx) = coord_i - coord_j.
    """
    coords = np.stack(np.meshgrid(np.arange(height), np.arange(width), indexing="ij"))
    coords = coords.reshape(2, -1)
    rel = coords[:, :, None] - coords[:, None, :]
    index = (rel[0] + height - 1) * (2 * width - 1) + (rel[1] + width - 1)
    index.setflags(write=False)
    return index


@backward.custom_vjp
def softmax(logits: jax.Array) -> jax.Array:
    """Softmax over the last axis whose backward keeps only the probabilities.

    The gradient `p * (g - sum(g * p))` needs nothing else, and the attention matmul that
    follows keeps `p` anyway; autodiff through `jax.nn.softmax` keeps its exponentials too,
    one more attention-sized buffer per layer.
    """
    return jax.nn.softmax(logits, axis=-1)


def _softmax_fwd(logits):
    probs = jax.nn.softmax(logits, axis=-1)
    return probs, probs


def _softmax_bwd(probs, g):
    return (probs * (g - jnp.sum(g * probs, axis=-1, keepdims=True)),)


softmax.defvjp(_softmax_fwd, _softmax_bwd)


def dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None = None
) -> jax.Array:
    """Softmax(q k^T * d^-0.5 + bias) v with float32 logits.

    q, k, v: `[..., heads, tokens, head_dim]` (any leading dims: batch, windows, groups);
    bias broadcastable to `[..., heads, q_tokens, k_tokens]` (relative position bias plus
    additive masks).
    """
    weights = attention_probs(q, k, bias).astype(v.dtype)
    return jnp.einsum("...hqk,...hkd->...hqd", weights, v)


def attention_probs(q: jax.Array, k: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """float32 softmax(q k^T * d^-0.5 + bias) `[..., heads, q_tokens, k_tokens]` (shapes as
    `dot_product_attention`)."""
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("...hqd,...hkd->...hqk", q * scale, k, preferred_element_type=jnp.float32)
    if bias is not None:
        logits = logits + bias
    return softmax(logits)


def split_heads(x: jax.Array, num_heads: int) -> jax.Array:
    """`[..., tokens, heads * d]` -> `[..., heads, tokens, d]`."""
    x = x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)
    return jnp.swapaxes(x, -2, -3)


def merge_heads(x: jax.Array) -> jax.Array:
    """`[..., heads, tokens, d]` -> `[..., tokens, heads * d]`."""
    x = jnp.swapaxes(x, -2, -3)
    return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])


def constrain_batch(x: jax.Array) -> jax.Array:
    """Keeps activations sharded over the batch on the active mesh (no-op without one)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names and mesh.shape[a] > 1)
    if not axes or x.shape[0] % int(np.prod([mesh.shape[a] for a in axes])):
        return x
    spec = jax.sharding.PartitionSpec(axes, *([None] * (x.ndim - 1)))
    return jax.lax.with_sharding_constraint(x, spec)


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


@functools.lru_cache(maxsize=16)
def sincos_pos_embed(dim: int, grid: int) -> np.ndarray:
    """MAE's `get_2d_sincos_pos_embed(dim, grid)` (no cls token): float32 `[grid**2, dim]`."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs dim % 4 == 0, got {dim}")
    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    # MAE: grid = meshgrid(grid_w, grid_h); emb_h uses grid[0] (varies along columns).
    emb = np.concatenate([_sincos_1d(dim // 2, gw), _sincos_1d(dim // 2, gh)], axis=1)
    emb = emb.astype(np.float32)
    emb.setflags(write=False)
    return emb
