"""Prediction heads: SimMIM's 1x1-conv + pixel-shuffle decoder."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mim_jax.models import layers


def pixel_shuffle(x: jax.Array, stride: int, channels: int) -> jax.Array:
    """`[batch, h, w, channels * r * r]` -> `[batch, h*r, w*r, channels]`.

    Channel order as PyTorch's PixelShuffle: out[b, h*r+i, w*r+j, c] = in[b, h, w, c*r*r + i*r + j].
    """
    b, h, w, _ = x.shape
    x = x.reshape(b, h, w, channels, stride, stride)
    return x.transpose(0, 1, 4, 2, 5, 3).reshape(b, h * stride, w * stride, channels)


class PixelShuffleHead(nnx.Module):
    """SimMIM decoder: Linear (a 1x1 conv) to stride**2 * 3 channels, then pixel shuffle."""

    def __init__(
        self,
        in_features: int,
        stride: int,
        *,
        rngs: nnx.Rngs,
        out_chans: int = 3,
        dtype: jnp.dtype = jnp.float32,
    ):
        self.stride = stride
        self.out_chans = out_chans
        self.proj = layers.Linear(
            in_features,
            stride * stride * out_chans,
            ("embed", None),
            rngs=rngs,
            dtype=dtype,
            kernel_init=layers.torch_default_init(in_features),
        )

    def __call__(self, features: jax.Array) -> jax.Array:
        """features `[batch, h, w, C]` -> reconstruction `[batch, h*s, w*s, out_chans]`."""
        return pixel_shuffle(self.proj(features), self.stride, self.out_chans)
