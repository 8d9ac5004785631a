"""GreenMIM (SPEC 2, decisions in SPEC 0): visible-token Swin encoder + MAE decoder, norm-pix MSE.

Model: `GreenSwinTransformer` on the visible tokens of one batch-wise mask (plans from
`grouping` / `green_swin.device_plans`), then the MAE decoder (SPEC 2.6): `decoder_embed`
(Linear C_last -> D), placement into the L mask-unit slots, fixed 2-D sin-cos position
embedding (a numpy constant, not a parameter), `decoder_blocks` (pre-norm ViT blocks, qkv bias,
mlp 4, LN eps 1e-6), `decoder_norm`, `decoder_pred` (Linear D -> unit**2 * 3).

Placement (SPEC 0 decision): the encoder's outputs, visible units in raster order, are
scattered into the slots of the visible units in raster order; the mask token fills the rest.
The released code's `ids_restore` gather (which permutes visible tokens, SPEC 2.6) is NOT
reproduced here; tests/test_greenmim.py reproduces it outside the library for parity.

Loss (SPEC 2.7): per-patch normalized pixels (`norm_pix_targets`, patch vector order
(row, col, channel), unbiased variance + 1e-6), MSE over the patch vector, mean over masked
units.

Config: `config.model` (Swin encoder kwargs plus `name`), `config.mask.patch_size` (the mask
unit, 32 = the final-stage patch), `config.mask.ratio`, optional `config.mask.group_size` /
`config.mask.num_groups` (grouping.plan_specs), `config.decoder` (embed_dim, depth, num_heads,
optional mlp_ratio 4.0, norm_eps 1e-6). The loss is always norm-pix (as in all released scripts).

Batch keys added on the host (make_batch_transform): `unit_mask` int32 `[B, L]` (1 = removed;
every row equal: batch-wise) and `plans` (green_swin plan pytree for that mask).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mim_jax import convert, grouping, masking
from mim_jax.models import green_swin, layers

NORM_PIX_EPS = 1e-6

# PyTorch name table (convert.SWIN_TABLE format). Encoder rows equal SimMIM Swin's.
_W = r"(weight|bias)"
_DEC = r"^decoder_blocks\.(\d+)\."
_ENCODER_ROWS = tuple(row for row in convert.SWIN_TABLE if not row[0].startswith(r"^decoder"))
TORCH_TABLE = (
    *_ENCODER_ROWS,
    (r"^mask_token$", "mask_token"),
    (rf"^decoder_embed\.{_W}$", r"decoder_embed.\1"),
    (rf"{_DEC}(norm1|norm2)\.{_W}$", r"decoder_blocks.\1.\2.\3"),
    (rf"{_DEC}attn\.(qkv|proj)\.{_W}$", r"decoder_blocks.\1.attn.\2.\3"),
    (rf"{_DEC}mlp\.(fc1|fc2)\.{_W}$", r"decoder_blocks.\1.mlp.\2.\3"),
    (rf"^decoder_norm\.{_W}$", r"decoder_norm.\1"),
    (rf"^decoder_pred\.{_W}$", r"decoder_pred.\1"),
)
convert.TABLES["greenmim"] = TORCH_TABLE
# Official buffers beyond convert.TORCH_BUFFERS: recomputed here (load_torch checks equality).
TORCH_BUFFERS = (r"^decoder_pos_embed$",)


# --- fixed position embedding ----------------------------------------------------------------


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


# --- decoder -----------------------------------------------------------------------------------


def _xavier() -> nnx.Initializer:
    return nnx.initializers.xavier_uniform()


class Attention(nnx.Module):
    """timm ViT attention: fused qkv Linear (bias), scale d^-0.5, output projection."""

    def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.num_heads = num_heads
        self.qkv = layers.Linear(
            dim, 3 * dim, ("embed", "heads"), rngs=rngs, dtype=dtype, kernel_init=_xavier()
        )
        self.proj = layers.Linear(
            dim, dim, ("heads", "embed"), rngs=rngs, dtype=dtype, kernel_init=_xavier()
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        q, k, v = (layers.split_heads(t, self.num_heads) for t in jnp.split(self.qkv(x), 3, -1))
        return self.proj(layers.merge_heads(layers.dot_product_attention(q, k, v)))


class TransformerBlock(nnx.Module):
    """Pre-norm timm `Block`: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        rngs: nnx.Rngs,
        mlp_ratio: float = 4.0,
        eps: float = 1e-6,
        dtype=jnp.float32,
    ):
        self.norm1 = layers.LayerNorm(dim, rngs=rngs, eps=eps, dtype=dtype)
        self.attn = Attention(dim, num_heads, rngs=rngs, dtype=dtype)
        self.norm2 = layers.LayerNorm(dim, rngs=rngs, eps=eps, dtype=dtype)
        self.mlp = layers.Mlp(dim, int(dim * mlp_ratio), rngs=rngs, dtype=dtype)
        for fc in (self.mlp.fc1, self.mlp.fc2):  # MAE wrapper init: xavier_uniform Linears.
            fc.kernel.value = _xavier()(rngs.params(), fc.kernel.shape, jnp.float32)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x))
        return layers.constrain_batch(x + self.mlp(self.norm2(x)))


def place_visible(tokens: jax.Array, unit_mask: jax.Array, mask_token: jax.Array) -> jax.Array:
    """Intended MAE placement (SPEC 0): `tokens [B, N_vis, D]` (visible units, raster order)
    -> `[B, L, D]`: slot l gets the k-th token if l is the k-th visible unit in raster order,
    `mask_token [D]` if unit l is removed (`unit_mask [B, L]`, 1 = removed)."""
    visible = unit_mask == 0
    rank = jnp.clip(jnp.cumsum(visible, axis=1) - 1, 0, tokens.shape[1] - 1)
    gathered = jnp.take_along_axis(tokens, rank[..., None], axis=1)
    return jnp.where(visible[..., None], gathered, mask_token.astype(tokens.dtype))


class GreenMIMModel(nnx.Module):
    """GreenSwin encoder + MAE decoder: (images, plans, unit_mask) -> `[B, L, u*u*3]`."""

    def __init__(
        self,
        encoder: green_swin.GreenSwinTransformer,
        *,
        img_size: int,
        unit: int,
        decoder_dim: int,
        decoder_depth: int,
        decoder_heads: int,
        rngs: nnx.Rngs,
        in_chans: int = 3,
        mlp_ratio: float = 4.0,
        decoder_eps: float = 1e-6,
        dtype=jnp.float32,
    ):
        if img_size % unit:
            raise ValueError(f"mask unit {unit} must divide img_size {img_size}")
        self.encoder = encoder
        self.unit = unit
        self.grid = img_size // unit
        self.decoder_embed = layers.Linear(
            encoder.num_features,
            decoder_dim,
            (None, "embed"),
            rngs=rngs,
            dtype=dtype,
            kernel_init=_xavier(),
        )
        self.mask_token = layers.param(
            rngs, nnx.initializers.normal(0.02), (decoder_dim,), ("embed",)
        )
        self.decoder_blocks = nnx.List(
            [
                TransformerBlock(
                    decoder_dim,
                    decoder_heads,
                    rngs=rngs,
                    mlp_ratio=mlp_ratio,
                    eps=decoder_eps,
                    dtype=dtype,
                )
                for _ in range(decoder_depth)
            ]
        )
        self.decoder_norm = layers.LayerNorm(decoder_dim, rngs=rngs, eps=decoder_eps, dtype=dtype)
        self.decoder_pred = layers.Linear(
            decoder_dim,
            unit * unit * in_chans,
            ("embed", None),
            rngs=rngs,
            dtype=dtype,
            kernel_init=_xavier(),
        )

    @property
    def pos_embed(self) -> np.ndarray:
        return sincos_pos_embed(self.mask_token.shape[0], self.grid)

    def decode(self, x: jax.Array) -> jax.Array:
        """Placed decoder tokens `[B, L, D]` -> predictions `[B, L, u*u*3]` (adds pos embed)."""
        x = x + jnp.asarray(self.pos_embed, x.dtype)
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))

    def __call__(
        self,
        images: jax.Array,
        plans: green_swin.Plans,
        unit_mask: jax.Array,
        *,
        rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """images `[B, H, W, 3]`, plans of the batch's mask, unit_mask `[B, L]` -> `[B, L, P]`."""
        latent = self.encoder(images, plans, rngs=rngs)
        tokens = place_visible(self.decoder_embed(latent), unit_mask, self.mask_token[...])
        return self.decode(tokens)


def build_model(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> GreenMIMModel:
    """GreenMIM model for `config.model` / `config.mask` / `config.decoder`."""
    dtype = jnp.dtype(config.get("dtype", "float32"))
    kwargs = config.model.to_dict()
    kwargs.pop("name", None)
    kwargs.pop("use_mask_token", None)
    for key in ("depths", "num_heads"):
        if isinstance(kwargs.get(key), list | tuple):
            kwargs[key] = tuple(kwargs[key])
    encoder = green_swin.GreenSwinTransformer(**kwargs, dtype=dtype, rngs=rngs)
    dec = config.decoder
    return GreenMIMModel(
        encoder,
        img_size=config.model.img_size,
        unit=config.mask.patch_size,
        decoder_dim=dec.embed_dim,
        decoder_depth=dec.depth,
        decoder_heads=dec.num_heads,
        in_chans=config.model.get("in_chans", 3),
        mlp_ratio=dec.get("mlp_ratio", 4.0),
        decoder_eps=dec.get("norm_eps", 1e-6),
        rngs=rngs,
        dtype=dtype,
    )


def load_torch(model: GreenMIMModel, state_dict: Mapping[str, np.ndarray]) -> None:
    """Loads an official GreenMIM state_dict; its `decoder_pos_embed` buffer must equal ours."""
    state = dict(state_dict)
    for key in [k for k in state if any(re.match(b, k) for b in TORCH_BUFFERS)]:
        theirs = np.asarray(state.pop(key)).reshape(model.pos_embed.shape)
        if not np.allclose(theirs, model.pos_embed, atol=1e-6, rtol=0):
            raise convert.ConversionError(f"{key} differs from the 2-D sin-cos table")
    convert.load_into(model, state, "greenmim")


# --- host-side masks and plans -------------------------------------------------------------------


def plan_specs_from_config(config: ml_collections.ConfigDict) -> list:
    m = config.model
    return grouping.plan_specs(
        img_size=m.img_size,
        patch_size=m.patch_size,
        depths=tuple(m.depths),
        window_size=m.window_size,
        mask_unit=config.mask.patch_size,
        mask_ratio=config.mask.ratio,
        group_size=config.mask.get("group_size", None),
        num_groups=config.mask.get("num_groups", None),
    )


MAX_REDRAWS = 64


def batch_mask_and_plans(
    seed: int, step: int, *, specs: list, unit_grid: int, mask_ratio: float
) -> tuple[np.ndarray, green_swin.Plans]:
    """One batch-wise mask `[L]` (1 = removed) and its plan pytree; mask group id 0.

    A mask whose plan overflows the static shapes is redrawn with group ids 1, 2, ...
    (deterministic; never needed with the default num_groups bound).
    """
    for attempt in range(MAX_REDRAWS):
        mask, _ = masking.batchwise_keep(
            seed, step, np.array([attempt]), num_units=unit_grid**2, mask_ratio=mask_ratio
        )
        try:
            raw = grouping.plan_mask(1 - mask[0], specs, unit_grid)
        except grouping.PlanOverflow:
            continue
        return mask[0], green_swin.device_plans(raw)
    raise grouping.PlanOverflow(f"no plan fits after {MAX_REDRAWS} draws (step {step})")


def _add_masks(batch, step, *, seed, specs, unit_grid, mask_ratio):
    mask, plans = batch_mask_and_plans(
        seed, step, specs=specs, unit_grid=unit_grid, mask_ratio=mask_ratio
    )
    size = np.shape(batch["image"])[0]
    return {**batch, "unit_mask": np.tile(mask[None], (size, 1)), "plans": plans}


def make_batch_transform(config: ml_collections.ConfigDict):
    """Host-side fn(batch, step) adding `unit_mask` `[B, L]` and `plans` (one mask per batch)."""
    return functools.partial(
        _add_masks,
        seed=config.seed,
        specs=plan_specs_from_config(config),
        unit_grid=config.model.img_size // config.mask.patch_size,
        mask_ratio=config.mask.ratio,
    )


# --- targets and loss ----------------------------------------------------------------------------


def patchify(images: jax.Array, unit: int) -> jax.Array:
    """`[B, H, W, C]` -> `[B, L, unit*unit*C]`, patches raster order, vector order (p, q, c)."""
    b, h, w, c = images.shape
    x = images.reshape(b, h // unit, unit, w // unit, unit, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // unit) * (w // unit), unit * unit * c)


def unpatchify(patches: jax.Array, unit: int, channels: int = 3) -> jax.Array:
    """Inverse of `patchify` for square images."""
    b, length, _ = patches.shape
    g = math.isqrt(length)
    x = patches.reshape(b, g, g, unit, unit, channels).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, g * unit, g * unit, channels)


def patch_stats(images: jax.Array, unit: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Patches `[B, L, P]`, their mean and std `sqrt(unbiased var + 1e-6)` `[B, L, 1]`."""
    patches = patchify(images.astype(jnp.float32), unit)
    mean = jnp.mean(patches, axis=-1, keepdims=True)
    var = jnp.var(patches, axis=-1, keepdims=True, ddof=1)
    return patches, mean, jnp.sqrt(var + NORM_PIX_EPS)


def norm_pix_targets(images: jax.Array, unit: int) -> jax.Array:
    """Per-patch normalized pixels `[B, L, unit*unit*C]` (SPEC 2.7)."""
    patches, mean, std = patch_stats(images, unit)
    return (patches - mean) / std


def masked_mse(pred: jax.Array, target: jax.Array, unit_mask: jax.Array) -> jax.Array:
    """Mean over the patch vector, then mean over removed units (`unit_mask` 1)."""
    per_patch = jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=-1)
    m = unit_mask.astype(jnp.float32)
    return jnp.sum(per_patch * m) / jnp.sum(m)


def loss_fn(
    model: GreenMIMModel, batch: dict, rngs: nnx.Rngs | None
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Norm-pix MSE on removed units; aux holds the metrics."""
    pred = model(batch["image"], batch["plans"], batch["unit_mask"], rngs=rngs)
    target = norm_pix_targets(batch["image"], model.unit)
    loss = masked_mse(pred, target, batch["unit_mask"])
    return loss, {"mse_masked": loss, "mask_fraction": jnp.mean(batch["unit_mask"] * 1.0)}


def reconstruct(model: GreenMIMModel, batch: dict) -> dict[str, jax.Array]:
    """Images for the grid in the input's normalized space: input, masked, prediction, pasted.

    Norm-pix predictions are un-normalized with each target patch's mean and std (SPEC 0).
    """
    images = batch["image"].astype(jnp.float32)
    pred = model(batch["image"], batch["plans"], batch["unit_mask"]).astype(jnp.float32)
    _, mean, std = patch_stats(images, model.unit)
    channels = images.shape[-1]
    prediction = unpatchify(pred * std + mean, model.unit, channels)
    unit_mask = batch["unit_mask"].astype(jnp.float32)
    pixels = unpatchify(
        jnp.repeat(unit_mask[..., None], model.unit**2 * channels, axis=-1), model.unit, channels
    )
    return {
        "input": images,
        "masked": images * (1 - pixels),
        "prediction": prediction,
        "pasted": images * (1 - pixels) + prediction * pixels,
    }
