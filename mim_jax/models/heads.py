"""Heads on an encoder: SimMIM's 1x1-conv + pixel-shuffle decoder, the fine-tuning classifier."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mim_jax.models import encoders, layers


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


class Classifier(nnx.Module):
    """Fine-tuning classifier: encoder -> average-pooled features -> optional `fc_norm`
    LayerNorm -> Linear `head` (the official Swin, mean-pooling ViT and iTPN classifiers).

    The encoder keeps the pretraining encoder's parameter names under `encoder.`, so a
    pretrained encoder loads into it by name (`mim_jax.init_from`). The head is drawn from a
    truncated normal with `head_init_std`, then kernel and (zero) bias are multiplied by
    `head_init_scale` (SimMIM's ViT: std 0.02, scale 0.001; iTPN: std 2e-5; Swin: 0.02, 1).
    """

    def __init__(
        self,
        encoder: nnx.Module,
        num_classes: int,
        *,
        rngs: nnx.Rngs,
        fc_norm: bool,
        norm_eps: float = 1e-6,
        head_init_std: float = 0.02,
        head_init_scale: float = 1.0,
        dtype: jnp.dtype = jnp.float32,
    ):
        dim = encoder.num_features
        self.encoder = encoder
        self.fc_norm = (
            layers.LayerNorm(dim, rngs=rngs, eps=norm_eps, dtype=dtype) if fc_norm else None
        )
        self.head = layers.Linear(
            dim,
            num_classes,
            ("embed", None),
            rngs=rngs,
            dtype=dtype,
            kernel_init=layers.trunc_normal(head_init_std),
        )
        if head_init_scale != 1.0:
            self.head.kernel.set_value(self.head.kernel[...] * head_init_scale)

    def features(self, images: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        """images `[batch, H, W, 3]` -> pooled (and `fc_norm`ed) features `[batch, C]`."""
        pooled = encoders.pooled_features(self.encoder, images, rngs=rngs)
        return pooled if self.fc_norm is None else self.fc_norm(pooled)

    def __call__(self, images: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        """images `[batch, H, W, 3]` -> logits `[batch, num_classes]`."""
        return self.head(self.features(images, rngs=rngs))
