"""GreenMIM Swin encoder on visible tokens only (SPEC 0 "group plans with static shapes", 2.1-2.5).

`GreenSwinTransformer` is a `swin.SwinTransformer` (built without a mask token): same modules,
same parameter tree, so a GreenMIM checkpoint loads into the dense Swin unchanged. Only the
forward differs:

- the visible patches are gathered (raster order) and only they are embedded (the patch conv
  as a matmul, `layers.PatchEmbed.embed_patches`);
- per block, LayerNorm, qkv, output projection and MLP act per token on the flat
  `[batch, N_vis, C]` sequence; only the attention core (`grouped_core`) runs on the grouped
  layout of the block's plan (shifted blocks use the shifted plan, no roll): q, k, v gathered
  to `[.., G, heads, g, d]`, bias `table[rel_index] + where(attn_mask, 0, MASK_VALUE)` (both
  built here from the plan's per-slot vectors), attention, back to the tokens with
  `slot_of_token`. Its backward keeps the unpadded qkv and gathers again (tests check it
  against autodiff). 'masking' stages (one group holding every visible token) take the same
  path;
- sparse patch merging: gather the 4 sub-tokens of each visible coarse cell, concat on
  channels (Swin order x0, x1, x2, x3), then `PatchMerging.merge`; that gather is a
  permutation of the tokens, so `permute_tokens` gives it a gather backward through the
  inverse index instead of autodiff's scatter-add into a zero-filled buffer;
- final LayerNorm. Output `[batch, N_vis_last, C_last]` in raster order.

Mask groups (SPEC 0): the batch holds `M` consecutive slices of `batch / M` examples, slice m
sharing mask m. Every plan leaf carries the leading `M` axis (`stack_plans`); the index
operations run per mask group on `[M, batch / M, ...]` views, everything else on the batch.

The plan pytree of ONE mask (`device_plans`; `stack_plans` adds the leading `M` axis):

    {"visible": int32 [N_vis_1],             # raster index on the stage-1 grid
     "stages": [                             # one dict per stage
        {"attn": [parity_0, parity_1?],      # unshifted, then shifted (if the stage has one)
         "merge": int32 [N_vis_next, 4]},    # every stage but the last
     ...]}
    parity = {"gather": int32 [G*g], "slot_of_token": int32 [N_vis],
              "slot_window": int32 [G, g], "slot_pos": int32 [G, g]}   # grouping.StagePlan

All shapes are static for a config (grouping.plan_specs), so masks change without recompiling.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mim_jax import grouping
from mim_jax.models import backward, layers, swin
from mim_jax.models import remat as remat_lib

Plans = dict[str, Any]


def _attn_plan(plan: grouping.StagePlan) -> Plans:
    """The per-slot vectors of one plan; window ids and positions shaped `[G, g]`."""
    shape = (-1, plan.group_size)
    return {
        "gather": plan.gather,
        "slot_of_token": plan.slot_of_token,
        "slot_window": plan.slot_window.reshape(shape),
        "slot_pos": plan.slot_pos.reshape(shape),
    }


def device_plans(plan_list: list[list[grouping.StagePlan]]) -> Plans:
    """`grouping.plan_mask` output (one mask) -> the model's plan pytree of numpy arrays."""
    first = plan_list[0][0]
    if first.index is None:
        raise ValueError("plans need their token indices (build them with grouping.stage_plan)")
    stages = []
    for i, stage in enumerate(plan_list):
        entry: dict[str, Any] = {"attn": [_attn_plan(p) for p in stage]}
        if i + 1 < len(plan_list):
            entry["merge"] = grouping.merge_gather(
                stage[0].index, stage[0].resolution, plan_list[i + 1][0].index
            )
        stages.append(entry)
    return {
        "visible": first.index,
        "stages": stages,
    }


def stack_plans(plans: list[Plans]) -> Plans:
    """Plan pytrees of M masks -> one pytree whose leaves have a leading `M` axis."""
    return jax.tree.map(lambda *leaves: np.stack(leaves), *plans)


def _groups(x: jax.Array, num_masks: int) -> jax.Array:
    """`[batch, ...]` -> `[M, batch / M, ...]` (slice m shares mask m)."""
    return x.reshape(num_masks, x.shape[0] // num_masks, *x.shape[1:])


def take_tokens(x: jax.Array, index: jax.Array) -> jax.Array:
    """Per mask group token gather: `x [batch, N, ...]`, `index [M, K]` -> `[batch, K, ...]`."""
    num_masks = index.shape[0]
    out = jax.vmap(lambda xm, im: jnp.take(xm, im, axis=1))(_groups(x, num_masks), index)
    return out.reshape(x.shape[0], *out.shape[2:])


@backward.custom_vjp
def permute_tokens(x: jax.Array, index: jax.Array, inverse: jax.Array) -> jax.Array:
    """`take_tokens(x, index)` whose backward is a gather instead of a scatter-add.

    For plan index pairs where every row t of `x` is read by exactly one output, `inverse[t]`
    (`[M, N]`, e.g. the sparse merge's 4 sub-token reads): the gradient of x is
    `take_tokens(g, inverse)`, with no zero-filled `[batch, N, C]` accumulator and no scatter,
    which XLA would otherwise allocate per gather.
    """
    return take_tokens(x, index)


def _permute_fwd(x, index, inverse):
    return take_tokens(x, index), inverse


def _permute_bwd(inverse, g):
    return take_tokens(g, inverse), None, None


permute_tokens.defvjp(_permute_fwd, _permute_bwd)


def _heads(x: jax.Array, num_masks: int, num_groups: int, heads: int) -> jax.Array:
    """`[batch, G*g, heads*d]` slots -> `[M, batch / M, G, heads, g, d]`."""
    x = x.reshape(num_masks, x.shape[0] // num_masks, num_groups, -1, x.shape[-1])
    return layers.split_heads(x, heads)


def _merge(x: jax.Array, batch: int) -> jax.Array:
    """Inverse of `_heads`: `[M, b, G, heads, g, d]` -> `[batch, G*g, heads*d]`."""
    x = layers.merge_heads(x)
    return x.reshape(batch, -1, x.shape[-1])


def _core_forward(qkv, bias, gather, slot_of_token, heads):
    """Attention core on the grouped slots; returns the token outputs and the probabilities."""
    num_masks, num_groups = bias.shape[:2]
    slots = _heads(take_tokens(qkv, gather), num_masks, num_groups, 3 * heads)
    q, k, v = jnp.split(slots, 3, axis=-3)  # [M, b, G, heads, g, d] each
    probs = layers.attention_probs(q, k, bias[:, None])
    out = jnp.einsum("...hqk,...hkd->...hqd", probs.astype(v.dtype), v)
    return take_tokens(_merge(out, qkv.shape[0]), slot_of_token), probs


@functools.partial(backward.custom_vjp, nondiff_argnums=(5,))
def grouped_core(
    qkv: jax.Array,
    bias: jax.Array,
    gather: jax.Array,
    slot_of_token: jax.Array,
    valid: jax.Array,
    heads: int,
) -> jax.Array:
    """Window attention of token projections `qkv [batch, N, 3C]` through a plan -> `[batch,
    N, C]`: gather to the padded `[G, g]` slots, softmax(q k^T d^-0.5 + bias) v there, back.

    `bias [M, G, heads, g, g]` (position bias + same-window mask), plan indices `gather [M,
    G*g]`, `slot_of_token [M, N]`, `valid [M, G*g]` (False = pad slot). The backward keeps the
    unpadded `qkv` and the probabilities of the tokens' query rows only, and gathers q, k, v
    and those rows back to the slots together with the incoming gradient (one gather that
    cannot run before the backward reaches this block): autodiff would keep q, k, v and every
    slot's row in the padded layout (Swin-B/224's first stage: 980 slots for 768 tokens).
    """
    return _core_forward(qkv, bias, gather, slot_of_token, heads)[0]


def _token_rows(probs: jax.Array, slot_of_token: jax.Array) -> jax.Array:
    """Probabilities `[M, b, G, heads, g, g]` -> the query rows of the N tokens, `[batch, N,
    heads * g]`: pad slots' rows (zero gradient, never read) are not kept."""
    num_masks, b, num_groups, heads, size, _ = probs.shape
    rows = jnp.swapaxes(probs, 3, 4).reshape(num_masks * b, num_groups * size, heads * size)
    return take_tokens(rows, slot_of_token)


def _slot_rows(rows: jax.Array, valid: jax.Array, heads: int) -> jax.Array:
    """Token rows gathered to the slots, `[batch, G*g, heads * g]` -> probabilities `[M, b, G,
    heads, g, g]`, pad slots' rows zero (the inverse of `_token_rows`)."""
    num_masks, slots = valid.shape
    size = rows.shape[-1] // heads
    padded = jnp.where(valid[:, None, :, None], _groups(rows, num_masks), 0)
    return jnp.swapaxes(padded.reshape(num_masks, -1, slots // size, size, heads, size), 3, 4)


def _core_fwd(qkv, bias, gather, slot_of_token, valid, heads):
    out, probs = _core_forward(qkv, bias, gather, slot_of_token, heads)
    if gather.shape[1] > slot_of_token.shape[1]:  # Pad slots: keep the tokens' rows only.
        probs = _token_rows(probs, slot_of_token)
    return out, (qkv, probs, gather, slot_of_token, valid)


def _core_bwd(heads, residuals, g):
    qkv, probs, gather, slot_of_token, valid = residuals
    batch, width = qkv.shape[0], qkv.shape[-1] * 4 // 3
    token_rows = probs.ndim == 3  # `_core_fwd` kept the tokens' rows only.
    parts = [qkv, g.astype(qkv.dtype)]
    if token_rows:  # Gathered with the gradient, so not before it exists.
        parts = [part.astype(probs.dtype) for part in parts] + [probs]
    both = take_tokens(jnp.concatenate(parts, axis=-1), gather)
    if token_rows:
        probs = _slot_rows(both[..., width:], valid, heads)
    num_masks, num_groups = probs.shape[0], probs.shape[2]
    both = _heads(both[..., :width].astype(qkv.dtype), num_masks, num_groups, 4 * heads)
    both = jnp.where(valid.reshape(num_masks, 1, num_groups, 1, -1, 1), both, 0)  # zero pads
    q, k, v, d_out = jnp.split(both, 4, axis=-3)
    scale = q.shape[-1] ** -0.5
    weights = probs.astype(v.dtype)
    d_v = jnp.einsum("...hqk,...hqd->...hkd", weights, d_out)
    d_p = jnp.einsum("...hqd,...hkd->...hqk", d_out, v, preferred_element_type=jnp.float32)
    d_logits = probs * (d_p - jnp.sum(d_p * probs, axis=-1, keepdims=True))
    d_bias = jnp.sum(d_logits, axis=1)
    d_l = d_logits.astype(q.dtype)
    d_q = jnp.einsum("...hqk,...hkd->...hqd", d_l, k) * scale
    d_k = jnp.einsum("...hqk,...hqd->...hkd", d_l, q) * scale
    d_slots = _merge(jnp.concatenate([d_q, d_k, d_v], axis=-3), batch)
    d_qkv = take_tokens(d_slots, slot_of_token).astype(qkv.dtype)
    return d_qkv, d_bias, None, None, None


grouped_core.defvjp(_core_fwd, _core_bwd)


def grouped_attention(
    attn: swin.WindowAttention, norm: layers.LayerNorm, x: jax.Array, plan: Plans
) -> jax.Array:
    """Window attention of `norm(x)`, flat tokens `[batch, N, C]`, through one plan -> `[batch,
    N, C]`.

    Only the attention core (`grouped_core`) sees the padded `[G, g]` layout: the qkv
    projection runs on the N tokens before it and the output projection after it.
    """
    num_masks = plan["slot_window"].shape[0]
    mask = grouping.group_attention_mask(plan["slot_window"])  # [M, G, g, g]
    rel = grouping.group_relative_index(plan["slot_pos"], mask, attn.window_size, jnp)
    bias = attn.position_bias(rel) + jnp.where(mask, 0.0, layers.MASK_VALUE)[:, :, None]
    valid = plan["slot_window"].reshape(num_masks, -1) >= 0
    qkv = layers.norm_linear(norm, attn.qkv, x)
    out = grouped_core(qkv, bias, plan["gather"], plan["slot_of_token"], valid, attn.num_heads)
    return attn.proj(out)


def green_block(
    block: swin.SwinBlock, x: jax.Array, attn_plans: list[Plans], rngs: nnx.Rngs | None
) -> jax.Array:
    """A SwinBlock on flat visible tokens `[batch, N, C]`; shifted blocks use `attn_plans[1]`."""
    plan = attn_plans[1 if block.shift else 0]
    h = grouped_attention(block.attn, block.norm1, x, plan)
    x = x + layers.drop_path(h, block.drop_path, rngs)
    x = x + layers.drop_path(block.mlp(x, block.norm2), block.drop_path, rngs)
    return layers.constrain_batch(x)


def sparse_merge(merging: layers.PatchMerging, x: jax.Array, merge: jax.Array) -> jax.Array:
    """Sparse PatchMerging: `x [batch, N, C]`, `merge [M, N_next, 4]` -> `[batch, N_next, 2C]`."""
    batch, _, channels = x.shape
    index = merge.reshape(merge.shape[0], -1)  # A permutation of the N fine tokens.
    positions = jnp.broadcast_to(jnp.arange(index.shape[1], dtype=index.dtype), index.shape)
    inverse = jax.vmap(lambda i, p: jnp.zeros_like(i).at[i].set(p))(index, positions)
    x = permute_tokens(x, index, inverse)
    return merging.merge(x.reshape(batch, merge.shape[1], 4 * channels))


class GreenSwinTransformer(swin.SwinTransformer):
    """Swin encoder on the visible tokens of `M` batch-wise masks (module docstring)."""

    def __init__(self, **kwargs: Any):
        if kwargs.pop("use_mask_token", False):
            raise ValueError("GreenSwinTransformer has no mask token")
        super().__init__(use_mask_token=False, **kwargs)

    def _check(self, plans: Plans) -> None:
        stages = plans["stages"]
        if np.ndim(plans["visible"]) != 2:
            raise ValueError("plans need a leading mask-group axis (green_swin.stack_plans)")
        if len(stages) != len(self.layers):
            raise ValueError(f"plans have {len(stages)} stages, the model {len(self.layers)}")
        for i, (stage, entry) in enumerate(zip(self.layers, stages, strict=True)):
            shifted = any(block.shift for block in stage.blocks)
            if len(entry["attn"]) != 1 + shifted:
                raise ValueError(f"stage {i}: expected {1 + shifted} attention plans")
            if (stage.downsample is not None) != ("merge" in entry):
                raise ValueError(f"stage {i}: merge indices do not match the downsampling")

    def __call__(  # type: ignore[override]
        self,
        images: jax.Array,
        plans: Plans,
        *,
        rngs: nnx.Rngs | None = None,
        return_stages: bool = False,
    ) -> jax.Array | tuple[jax.Array, list[jax.Array]]:
        """images `[batch, H, W, 3]` -> `[batch, N_vis_last, C_last]` (after the final norm).

        `plans` is the stacked plan pytree of `M` masks (`M` divides the batch; slice m of
        `batch / M` consecutive examples uses mask m).

        With `return_stages`, also every stage's block output before its patch merging,
        `[batch, N_vis_i, C_i]` in raster order (the last one before the final norm).
        """
        self._check(plans)
        patches = take_tokens(self.patch_embed.patches(images), plans["visible"])
        x = layers.constrain_batch(self.patch_embed.embed_patches(patches))
        outputs = []
        for stage, entry in zip(self.layers, plans["stages"], strict=True):
            for block in stage.blocks:
                x = remat_lib.call(self.remat, green_block, block, x, entry["attn"], rngs)
            outputs.append(x)
            if stage.downsample is not None:
                x = sparse_merge(stage.downsample, x, entry["merge"])
        x = self.norm(x)
        return (x, outputs) if return_stages else x
