"""GreenMIM (SPEC 2, decisions in SPEC 0): visible-token Swin encoder + MAE decoder, pixel MSE.

Model: `GreenSwinTransformer` on the visible tokens of one batch-wise mask (plans from
`grouping` / `green_swin.device_plans`), then the MAE decoder (SPEC 2.6): `decoder_embed`
(Linear C_last -> D), placement into the L mask-unit slots, fixed 2-D sin-cos position
embedding (a numpy constant, not a parameter), `decoder_blocks` (pre-norm ViT blocks, qkv bias,
mlp 4, LN eps 1e-6), `decoder_norm`, `decoder_pred` (Linear D -> unit**2 * 3).

Placement (SPEC 0 decision): the encoder's outputs, visible units in raster order, are
scattered into the slots of the visible units in raster order; the mask token fills the rest.
The released code's `ids_restore` gather (which permutes visible tokens, SPEC 2.6) is NOT
reproduced here; tests/test_greenmim.py reproduces it outside the library for parity.

Loss (SPEC 2.7): MSE over the patch vector, mean over masked units, against per-patch
normalized pixels (`config.norm_pix_loss`, default on as in the paper's runs: patch vector order
(row, col, channel), unbiased variance + 1e-6) or, with it off (the official `main_pretrain.py`
default), the plain patchified input (`norm_pix.pixel_targets`).

Config: `config.model` (Swin encoder kwargs plus `name`), `config.mask.patch_size` (the mask
unit, 32 = the final-stage patch), `config.mask.ratio`, `config.mask.groups` (mask groups per
global batch, 0 = data-parallel shards), optional `config.mask.group_size` /
`config.mask.num_groups` (grouping.plan_specs; 0 = default), `config.decoder` (embed_dim,
depth, num_heads, optional mlp_ratio 4.0, norm_eps 1e-6), `config.norm_pix_loss` (bool, True
when absent; carried by the model as the static `GreenMIMModel.norm_pix_loss`).

Batch keys added on the host (make_batch_transform): `unit_mask` int32 `[B, L]` (1 = removed;
rows of one mask group equal: batch-wise), `removed_units` int32 `[B, K]` (the removed units
of each row in raster order; K is fixed by the ratio), `mask_redraws` int32 `[B]` and `plans`
(the stacked green_swin plan pytree, leading axis = mask groups, `config.mask.groups`).

The train step predicts the removed units only (`GreenMIMModel.decode` with `units`): the
loss reads nothing else, so the last decoder block's queries, MLP and the prediction head skip
the visible units (same loss and gradients, less memory and compute).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mim_jax import convert, grouping, masking, sharding
from mim_jax.config_lib import ConfigError
from mim_jax.methods import norm_pix
from mim_jax.models import backward, green_swin, layers
from mim_jax.models import remat as remat_lib

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

    def __call__(
        self, x: jax.Array, queries: jax.Array | None = None, norm: layers.LayerNorm | None = None
    ) -> jax.Array:
        """x `[B, L, D]` -> `[B, L, D]`; with `queries` int `[B, K]`, only those tokens attend
        (to all L) and the output is `[B, K, D]`. With `norm`, of `norm(x)` (`norm_linear`)."""
        q, k, v = jnp.split(layers.norm_linear(norm, self.qkv, x), 3, -1)
        if queries is not None:
            q = take_rows(q, queries)
        q, k, v = (layers.split_heads(t, self.num_heads) for t in (q, k, v))
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

    def __call__(self, x: jax.Array, queries: jax.Array | None = None) -> jax.Array:
        """x `[B, L, D]` -> `[B, L, D]`, or `[B, K, D]` at the `queries` `[B, K]` only (the
        attention still reads every token; the residual and MLP run on the K)."""
        h = self.attn(x, queries, self.norm1)
        x = (x if queries is None else take_rows(x, queries)) + h
        return layers.constrain_batch(x + self.mlp(x, self.norm2))


def _take_rows(x, rows):
    return jnp.take_along_axis(x, rows.reshape(*rows.shape, *(1,) * (x.ndim - 2)), axis=1)


@backward.custom_vjp
def take_rows(x: jax.Array, rows: jax.Array) -> jax.Array:
    """Per-example token gather: `x [B, L, ...]`, distinct `rows` int `[B, K]` -> `[B, K, ...]`.

    The backward gathers too: position l of x gets the gradient of the output row that read
    it, or zero. Autodiff scatter-adds into a zero `[B, L, ...]` array, which XLA:CPU
    materializes early in the forward and keeps until this backward.
    """
    return _take_rows(x, rows)


def _take_rows_fwd(x, rows):
    # The empty array carries x's length and dtype to the backward.
    return _take_rows(x, rows), (rows, jnp.zeros((x.shape[1], 0), x.dtype))


def _take_rows_bwd(residuals, g):
    rows, x_like = residuals
    (batch, k), length = rows.shape, x_like.shape[0]
    read_by = jnp.full((batch, length), k, rows.dtype)  # k = read by no output row.
    read_by = read_by.at[jnp.arange(batch)[:, None], rows].set(jnp.arange(k, dtype=rows.dtype))
    picked = _take_rows(g, jnp.minimum(read_by, k - 1))
    keep = (read_by < k).reshape(*read_by.shape, *(1,) * (g.ndim - 2))
    return jnp.where(keep, picked, 0).astype(x_like.dtype), None


take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


def place_visible(tokens: jax.Array, unit_mask: jax.Array, mask_token: jax.Array) -> jax.Array:
    """Intended MAE placement (SPEC 0): `tokens [B, N_vis, D]` (visible units, raster order)
    -> `[B, L, D]`: slot l gets the k-th token if l is the k-th visible unit in raster order,
    `mask_token [D]` if unit l is removed (`unit_mask [B, L]`, 1 = removed)."""
    visible = unit_mask == 0
    rank = jnp.clip(jnp.cumsum(visible, axis=1) - 1, 0, tokens.shape[1] - 1)
    gathered = jnp.take_along_axis(tokens, rank[..., None], axis=1)
    return jnp.where(visible[..., None], gathered, mask_token.astype(tokens.dtype))


class GreenMIMModel(nnx.Module):
    """GreenSwin encoder + MAE decoder: (images, plans, unit_mask) -> `[B, L, u*u*3]`.

    `norm_pix_loss` (static) selects the loss target and how the reconstruction grid reads the
    predictions (norm-pix or plain pixels); `remat` rematerializes every decoder block (the
    encoder's own `remat` its blocks; models/remat.py)."""

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
        norm_pix_loss: bool = True,
        dtype=jnp.float32,
        remat: str = "none",
    ):
        if img_size % unit:
            raise ValueError(f"mask unit {unit} must divide img_size {img_size}")
        self.encoder = encoder
        self.remat = remat_lib.check(remat)
        self.unit = unit
        self.grid = img_size // unit
        self.norm_pix_loss = bool(norm_pix_loss)
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
        return layers.sincos_pos_embed(self.mask_token.shape[0], self.grid)

    def decoder_features(self, x: jax.Array, units: jax.Array | None = None) -> jax.Array:
        """Placed decoder tokens `[B, L, D]` -> normed features `[B, L, D]` (adds pos embed).

        With `units` int `[B, K]`, only the features of those units, `[B, K, D]`: the last
        block's queries, MLP and the final norm run on the K units alone (the same values as
        the full decode there; the loss needs the removed units only)."""
        x = x + jnp.asarray(self.pos_embed, x.dtype)
        last = len(self.decoder_blocks) - 1  # config_lib.validate: at least one block.
        for i, block in enumerate(self.decoder_blocks):
            queries = units if i == last else None
            x = remat_lib.call(self.remat, TransformerBlock.__call__, block, x, queries)
        return self.decoder_norm(x)

    def decode(self, x: jax.Array, units: jax.Array | None = None) -> jax.Array:
        """Placed decoder tokens `[B, L, D]` -> predictions `[B, L, u*u*3]` (`[B, K, u*u*3]`
        at `units`, see `decoder_features`)."""
        return self.decoder_pred(self.decoder_features(x, units))

    def placed_tokens(
        self,
        images: jax.Array,
        plans: green_swin.Plans,
        unit_mask: jax.Array,
        *,
        rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """Encoder latent embedded and placed in the L unit slots: the decoder input `[B, L, D]`."""
        latent = self.encoder(images, plans, rngs=rngs)
        return place_visible(self.decoder_embed(latent), unit_mask, self.mask_token[...])

    def __call__(
        self,
        images: jax.Array,
        plans: green_swin.Plans,
        unit_mask: jax.Array,
        *,
        rngs: nnx.Rngs | None = None,
        units: jax.Array | None = None,
    ) -> jax.Array:
        """images `[B, H, W, 3]`, plans of the batch's mask, unit_mask `[B, L]` -> `[B, L, P]`
        (or `[B, K, P]` at `units` `[B, K]`, see `decode`)."""
        return self.decode(self.placed_tokens(images, plans, unit_mask, rngs=rngs), units)


def build_model(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> GreenMIMModel:
    """GreenMIM model for `config.model` / `config.mask` / `config.decoder`,
    `config.norm_pix_loss` (True when absent, e.g. configs built by hand for parity tests) and
    `config.remat` (block rematerialization of encoder and decoder; "none" when absent)."""
    dtype = jnp.dtype(config.get("dtype", "float32"))
    kwargs = config.model.to_dict()
    kwargs.pop("name", None)
    kwargs.pop("use_mask_token", None)
    for key in ("depths", "num_heads"):
        if isinstance(kwargs.get(key), list | tuple):
            kwargs[key] = tuple(kwargs[key])
    remat = config.get("remat", "none")
    encoder = green_swin.GreenSwinTransformer(**kwargs, dtype=dtype, remat=remat, rngs=rngs)
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
        norm_pix_loss=config.get("norm_pix_loss", True),
        rngs=rngs,
        dtype=dtype,
        remat=remat,
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


def _stage_values(value):
    """Config value (int or per-stage tuple; 0 or None = default) -> grouping.plan_specs form."""
    if isinstance(value, list | tuple):
        return [v or None for v in value]
    return value or None


def plan_specs_from_config(config: ml_collections.ConfigDict) -> list:
    """Static plan shapes (grouping.plan_specs) of `config.model` and `config.mask`."""
    m = config.model
    return grouping.plan_specs(
        img_size=m.img_size,
        patch_size=m.patch_size,
        depths=tuple(m.depths),
        window_size=m.window_size,
        mask_unit=config.mask.patch_size,
        mask_ratio=config.mask.ratio,
        group_size=_stage_values(config.mask.get("group_size", None)),
        num_groups=_stage_values(config.mask.get("num_groups", None)),
    )


MAX_REDRAWS = 64
REDRAW_STRIDE = 1 << 24  # Draw k of mask group m uses id m + k * REDRAW_STRIDE.
GROUP_KEYS = ("plans",)  # Batch pytrees with a leading mask-group axis (sharding.global_batch).


def batch_mask_and_plans(
    seed: int, step: int, group: int, *, specs: list, unit_grid: int, mask_ratio: float
) -> tuple[np.ndarray, green_swin.Plans, int]:
    """Mask group `group`'s batch-wise mask `[L]` (1 = removed), its plans and its redraws.

    A pure function of (seed, step, group). A mask whose plan overflows the static shapes is
    redrawn (ids `group + k * REDRAW_STRIDE`, k = 1, 2, ...; never needed with the default
    `num_groups` bound) and the number of redraws is returned so that it can be logged.
    """
    for attempt in range(MAX_REDRAWS):
        mask, _ = masking.batchwise_keep(
            seed,
            step,
            np.array([group + attempt * REDRAW_STRIDE]),
            num_units=unit_grid**2,
            mask_ratio=mask_ratio,
        )
        try:
            raw = grouping.plan_mask(1 - mask[0], specs, unit_grid)
        except grouping.PlanOverflow:
            continue
        return mask[0], green_swin.device_plans(raw), attempt
    raise grouping.PlanOverflow(f"no plan fits after {MAX_REDRAWS} draws (step {step})")


def _add_masks(batch, step, *, seed, specs, unit_grid, mask_ratio, batch_size, groups, sharded):
    rows = np.asarray(batch["index"]) % batch_size
    group_of_row = rows // (batch_size // groups)
    local = np.unique(group_of_row) if sharded else np.arange(groups)
    if sharded and len(local) * (batch_size // groups) != len(rows):
        raise ValueError(
            f"the host-local batch ({len(rows)} rows) does not hold whole mask groups of "
            f"{batch_size // groups}; make config.mask.groups a multiple of the host count"
        )
    drawn = [
        batch_mask_and_plans(
            seed, step, int(m), specs=specs, unit_grid=unit_grid, mask_ratio=mask_ratio
        )
        for m in local
    ]
    position = {int(m): k for k, m in enumerate(local)}
    pick = np.array([position[int(m)] for m in group_of_row])
    masks = np.stack([mask for mask, _, _ in drawn])
    redraws = np.array([count for _, _, count in drawn], np.int32)
    removed = np.stack([np.flatnonzero(mask) for mask in masks]).astype(np.int32)
    return {
        **batch,
        "unit_mask": masks[pick],
        "removed_units": removed[pick],
        "mask_redraws": redraws[pick],
        "plans": green_swin.stack_plans([plans for _, plans, _ in drawn]),
    }


def make_batch_transform(
    config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None
) -> functools.partial:
    """Host-side fn(batch, step) adding `unit_mask` int32 `[B, L]` (1 = removed),
    `removed_units` int32 `[B, K]`, `mask_redraws` int32 `[B]` and `plans` (`[M_local, ...]`
    leaves) for the rows' mask groups.

    Mask group m holds the global batch rows `[m * B / M, (m + 1) * B / M)`; `M` =
    `config.mask.groups` (0: the number of data-parallel shards of `mesh`; one without a mesh).
    Runs in the input pipeline, so planning overlaps the device step.
    """
    groups = num_mask_groups(config, mesh)
    sharded = mesh is None or sharding.mask_groups_sharded(groups, mesh)
    return functools.partial(
        _add_masks,
        seed=config.seed,
        specs=plan_specs_from_config(config),
        unit_grid=config.model.img_size // config.mask.patch_size,
        mask_ratio=config.mask.ratio,
        batch_size=config.batch_size,
        groups=groups,
        sharded=sharded,
    )


def num_mask_groups(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None) -> int:
    """`config.mask.groups`, or the data-parallel shard count (1 without a mesh) when it is 0;
    it must divide the batch."""
    shards = 1 if mesh is None else sharding.batch_shards(mesh)
    groups = config.mask.get("groups", 0) or shards
    if config.batch_size % groups:
        raise ConfigError(
            f"config.batch_size={config.batch_size} must be divisible by the mask groups "
            f"({groups}; config.mask.groups, 0 = data*fsdp)"
        )
    return groups


# --- loss and reconstruction -----------------------------------------------------------------


def loss_fn(
    model: GreenMIMModel, batch: dict, rngs: nnx.Rngs | None
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Pixel MSE on removed units (norm-pix or plain targets, `model.norm_pix_loss`), predicted
    at those units only; aux holds the metrics.

    The prediction head and the MSE form one `norm_pix.linear_mse` (one residual for the
    head's backward instead of a gradient materialized per consumer)."""
    units = batch["removed_units"]
    tokens = model.placed_tokens(batch["image"], batch["plans"], batch["unit_mask"], rngs=rngs)
    head = model.decoder_pred
    pixels = norm_pix.pixel_targets(batch["image"], model.unit, norm_pix=model.norm_pix_loss)
    target = take_rows(pixels, units)
    loss = norm_pix.linear_mse(
        model.decoder_features(tokens, units), head.kernel[...], head.bias[...], target, head.dtype
    )
    return loss, {
        "mse_masked": loss,
        "mask_fraction": jnp.mean(batch["unit_mask"] * 1.0),
        "mask_redraws": jnp.mean(batch["mask_redraws"] * 1.0),
    }


def reconstruct(model: GreenMIMModel, batch: dict) -> dict[str, jax.Array]:
    """Images for the grid (input, masked, prediction, pasted; norm_pix.reconstruction_grid).
    A model-like callable without `norm_pix_loss` is read as norm-pix (the default)."""
    pred = model(batch["image"], batch["plans"], batch["unit_mask"])
    norm = model.norm_pix_loss
    return norm_pix.reconstruction_grid(
        batch["image"], pred, batch["unit_mask"], model.unit, norm_pix=norm
    )
