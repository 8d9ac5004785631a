"""SimMIM (SPEC 1): mask-token encoder, pixel-shuffle head, L1 on masked pixels.

The method interface the train loop uses (shared by every method module):
  build_model(config, rngs) -> nnx.Module
  make_batch_transform(config, mesh=None) -> host-side fn(batch, step) -> batch (adds masks in
    the pipeline; `mesh` gives the batch layout to methods whose masks follow it)
  GROUP_KEYS (optional) -> batch keys whose leaves lead with a mask-group axis
  loss_fn(model, batch, rngs) -> (loss, aux) with aux a dict of scalar metrics
  reconstruct(model, batch) -> dict of image arrays for the reconstruction grid
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mim_jax import masking
from mim_jax.models import encoders, heads


class SimMIMModel(nnx.Module):
    """Encoder with mask token + SimMIM decoder: (images, mask) -> (reconstruction, features)."""

    def __init__(
        self, encoder: nnx.Module, *, rngs: nnx.Rngs, in_chans: int = 3, dtype=jnp.float32
    ):
        self.encoder = encoder
        self.decoder = heads.PixelShuffleHead(
            encoder.num_features, encoder.stride, rngs=rngs, out_chans=in_chans, dtype=dtype
        )

    def __call__(
        self, images: jax.Array, mask: jax.Array, *, rngs: nnx.Rngs | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """images `[B, H, W, 3]`, mask `[B, H/p, W/p]` -> (`[B, H, W, 3]`, `[B, h, w, C]`)."""
        features = self.encoder(images, mask, rngs=rngs)
        return self.decoder(features), features


def build_model(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> SimMIMModel:
    """The SimMIM model for `config.model` in compute dtype `config.dtype`, its encoder
    blocks rematerialized per `config.remat`."""
    dtype = jnp.dtype(config.dtype)
    encoder = encoders.build_encoder(
        config.model, use_mask_token=True, rngs=rngs, dtype=dtype, remat=config.get("remat", "none")
    )
    return SimMIMModel(encoder, rngs=rngs, in_chans=config.model.in_chans, dtype=dtype)


def _add_masks(
    batch: dict[str, np.ndarray], step: int, *, generator: masking.SimMIMMaskGenerator
) -> dict[str, np.ndarray]:
    return {**batch, "mask": generator(step, batch["index"])}


def make_batch_transform(
    config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None
) -> functools.partial:
    """Host-side transform adding `mask` `[B, H/p, W/p]` (deterministic in seed, step, example;
    per-example masks do not depend on the `mesh`)."""
    return functools.partial(_add_masks, generator=masking.SimMIMMaskGenerator.from_config(config))


def pixel_mask(mask: jax.Array, patch_size: int) -> jax.Array:
    """Model-patch mask `[B, h, w]` -> per-pixel mask `[B, h*p, w*p, 1]` (float32)."""
    m = jnp.repeat(jnp.repeat(mask, patch_size, axis=1), patch_size, axis=2)
    return m[..., None].astype(jnp.float32)


def masked_l1(images: jax.Array, reconstruction: jax.Array, pixels: jax.Array) -> jax.Array:
    """sum(|x - x_rec| * mask) / (sum(mask) + 1e-5) / channels (SPEC 1.5)."""
    err = jnp.abs(images.astype(jnp.float32) - reconstruction.astype(jnp.float32))
    return jnp.sum(err * pixels) / (jnp.sum(pixels) + 1e-5) / images.shape[-1]


def loss_fn(
    model: SimMIMModel, batch: dict[str, jax.Array], rngs: nnx.Rngs | None
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """L1 reconstruction loss on masked pixels; aux holds the per-term metrics."""
    reconstruction, _ = model(batch["image"], batch["mask"], rngs=rngs)
    pixels = pixel_mask(batch["mask"], model.encoder.patch_size)
    loss = masked_l1(batch["image"], reconstruction, pixels)
    return loss, {"l1_masked": loss, "mask_fraction": jnp.mean(pixels)}


def reconstruct(model: SimMIMModel, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Images for the grid, in the input's normalized space: masked input, prediction, pasted."""
    reconstruction, _ = model(batch["image"], batch["mask"])
    pixels = pixel_mask(batch["mask"], model.encoder.patch_size)
    images = batch["image"].astype(jnp.float32)
    reconstruction = reconstruction.astype(jnp.float32)
    return {
        "input": images,
        "masked": images * (1 - pixels),
        "prediction": reconstruction,
        "pasted": images * (1 - pixels) + reconstruction * pixels,
    }
