"""GreenMIM Swin encoder on visible tokens only (SPEC 0 "group plans with static shapes", 2.1-2.5).

`GreenSwinTransformer` is a `swin.SwinTransformer` (built without a mask token): same modules,
same parameter tree, so a GreenMIM checkpoint loads into the dense Swin unchanged. Only the
forward differs:

- the patch embedding runs on the full image; the visible tokens are gathered in raster order;
- per block, LayerNorm, qkv, output projection and MLP act per token on the flat
  `[batch, N_vis, C]` sequence; only the attention core runs on the grouped layout of the
  block's plan (shifted blocks use the shifted plan, no roll): q, k, v gathered to
  `[batch, G, heads, g, d]`, bias `table[rel_index] + where(attn_mask, 0, MASK_VALUE)`,
  attention, scatter back with `slot_of_token`. 'masking' stages (one group holding every
  visible token) take the same path;
- sparse patch merging: gather the 4 sub-tokens of each visible coarse cell, concat on
  channels (Swin order x0, x1, x2, x3), then `PatchMerging.merge`;
- final LayerNorm. Output `[batch, N_vis_last, C_last]` in raster order.

The plan pytree (`device_plans`), for ONE batch-wise mask shared by the batch:

    {"visible": int32 [N_vis_1],             # raster index on the stage-1 grid
     "stages": [                             # one dict per stage
        {"attn": [parity_0, parity_1?],      # unshifted, then shifted (if the stage has one)
         "merge": int32 [N_vis_next, 4]},    # every stage but the last
     ...]}
    parity = {"gather": int32 [G*g], "slot_of_token": int32 [N_vis],
              "attn_mask": bool [G, g, g], "rel_index": int32 [G, g, g]}

All shapes are static for a config (grouping.plan_specs), so masks change without recompiling.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mim_jax import grouping
from mim_jax.models import layers, swin

Plans = dict[str, Any]
_ATTN_KEYS = ("gather", "slot_of_token", "attn_mask", "rel_index")


def device_plans(plan_list: list[list[grouping.StagePlan]]) -> Plans:
    """`grouping.plan_mask` output -> the model's plan pytree of numpy arrays (module doc)."""
    first = plan_list[0][0]
    if first.coords is None:
        raise ValueError("plans need their coords (build them with grouping.stage_plan)")
    stages = []
    for i, stage in enumerate(plan_list):
        entry: dict[str, Any] = {
            "attn": [{key: np.asarray(getattr(p, key)) for key in _ATTN_KEYS} for p in stage]
        }
        if i + 1 < len(plan_list):
            entry["merge"] = grouping.merge_gather(
                stage[0].coords, stage[0].resolution, plan_list[i + 1][0].coords
            )
        stages.append(entry)
    return {
        "visible": grouping.visible_index(first.coords, first.resolution),
        "stages": stages,
    }


def grouped_attention(attn: swin.WindowAttention, x: jax.Array, plan: Plans) -> jax.Array:
    """Window attention of flat tokens `x [batch, N, C]` through one plan -> `[batch, N, C]`."""
    batch, _, channels = x.shape
    num_groups, g, _ = plan["attn_mask"].shape
    gather = plan["gather"]

    def grouped(t: jax.Array) -> jax.Array:  # [B, heads, N, d] -> [B, G, heads, g, d]
        t = jnp.take(t, gather, axis=2)
        t = t.reshape(batch, t.shape[1], num_groups, g, t.shape[-1])
        return jnp.swapaxes(t, 1, 2)

    q, k, v = (grouped(t) for t in attn.qkv_heads(x))
    mask = jnp.where(plan["attn_mask"], 0.0, layers.MASK_VALUE).astype(jnp.float32)
    bias = attn.position_bias(plan["rel_index"]) + mask[:, None]  # [G, heads, g, g]
    out = attn.output(layers.dot_product_attention(q, k, v, bias))  # [B, G, g, C]
    out = out.reshape(batch, num_groups * g, channels)
    return jnp.take(out, plan["slot_of_token"], axis=1)


def green_block(
    block: swin.SwinBlock, x: jax.Array, attn_plans: list[Plans], rngs: nnx.Rngs | None
) -> jax.Array:
    """A SwinBlock on flat visible tokens `[batch, N, C]`; shifted blocks use `attn_plans[1]`."""
    plan = attn_plans[1 if block.shift else 0]
    h = grouped_attention(block.attn, block.norm1(x), plan)
    x = x + layers.drop_path(h, block.drop_path, rngs)
    x = x + layers.drop_path(block.mlp(block.norm2(x)), block.drop_path, rngs)
    return layers.constrain_batch(x)


def sparse_merge(merging: layers.PatchMerging, x: jax.Array, merge: jax.Array) -> jax.Array:
    """Sparse PatchMerging: `x [batch, N, C]`, `merge [N_next, 4]` -> `[batch, N_next, 2C]`."""
    batch, _, channels = x.shape
    x = jnp.take(x, merge.reshape(-1), axis=1).reshape(batch, merge.shape[0], 4 * channels)
    return merging.merge(x)


class GreenSwinTransformer(swin.SwinTransformer):
    """Swin encoder on the visible tokens of one batch-wise mask (module docstring)."""

    def __init__(self, **kwargs: Any):
        if kwargs.pop("use_mask_token", False):
            raise ValueError("GreenSwinTransformer has no mask token")
        super().__init__(use_mask_token=False, **kwargs)

    def _check(self, plans: Plans) -> None:
        stages = plans["stages"]
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

        With `return_stages`, also every stage's block output before its patch merging,
        `[batch, N_vis_i, C_i]` in raster order (the last one before the final norm).
        """
        self._check(plans)
        x = self.embed(images)
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        x = layers.constrain_batch(jnp.take(x, plans["visible"], axis=1))
        outputs = []
        for stage, entry in zip(self.layers, plans["stages"], strict=True):
            for block in stage.blocks:
                x = green_block(block, x, entry["attn"], rngs)
            outputs.append(x)
            if stage.downsample is not None:
                x = sparse_merge(stage.downsample, x, entry["merge"])
        x = self.norm(x)
        return (x, outputs) if return_stages else x
