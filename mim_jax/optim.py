"""Learning-rate schedules, AdamW with weight-decay masks, and layer-wise lr decay.

Reproduces the official SimMIM optimizer (`optimizer.py`, `lr_scheduler.py`, timm 0.4.12
schedulers with `t_in_epochs=False`) per optimizer step:

* lr, warmup lr and min lr are all scaled by `batch_size / lr_batch_base`.
* Warmup is linear from the warmup lr over `int(warmup_epochs * steps_per_epoch)` steps.
* Cosine runs over all `total_steps` counted from step 0, not restarted after warmup
  (`warmup_prefix=False`), and holds the min lr from `total_steps` on (`cycle_limit=1`).
* Multistep multiplies by `decay_rate` at each milestone `int(epoch * steps_per_epoch)`
  (bisect_right: the milestone step itself is already decayed); it has no min lr.
* The official loop calls `scheduler.step_update(t)` after update t, so update t uses the
  value for `max(t - 1, 0)`; our schedule takes optax's count (= t) and does the same.
* Layer-wise lr decay (fine-tuning) gives each layer's parameter group the peak lr
  `lr * layer_decay ** (num_layers - 1 - layer_id)` while the warmup and min lr stay
  unscaled, as timm 0.4.12 schedules each group from its own initial lr.

`schedule = "half_cosine"` is the MAE recipe instead (GreenMIM, iTPN pixel; MAE
`util/lr_sched.adjust_learning_rate`, called before every update t with the fractional epoch
`e = t / steps_per_epoch`): linear warmup from 0 to the peak over `warmup_epochs`, then a
half-cycle cosine from the peak to the min lr over the remaining epochs; no lag (update 0 has
lr 0); `warmup_lr` is unused; with layer decay the whole curve (min lr included) is scaled.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mim_jax import pytree
from mim_jax.config_lib import ConfigError

PyTree = Any
SCHEDULES = ("cosine", "multistep", "half_cosine")


def scaled_lrs(config: ml_collections.ConfigDict) -> tuple[float, float, float]:
    """(base, warmup, min) lr, each multiplied by `batch_size / optim.lr_batch_base`."""
    optim = config.optim
    factor = config.batch_size / optim.lr_batch_base
    return optim.base_lr * factor, optim.warmup_lr * factor, optim.min_lr * factor


def _timm_schedule(
    optim: ml_collections.ConfigDict,
    peak_lr: float,
    warmup_lr: float,
    min_lr: float,
    steps_per_epoch: int,
    total_steps: int,
) -> optax.Schedule:
    """timm/SimMIM warmup + cosine|multistep schedule, indexed by the optimizer step count."""
    warmup_steps = int(optim.warmup_epochs * steps_per_epoch)
    warmup_slope = (peak_lr - warmup_lr) / max(warmup_steps, 1)
    milestones = np.asarray(sorted(int(e * steps_per_epoch) for e in optim.decay_epochs), np.int32)
    if optim.schedule == "cosine" and total_steps <= 0:
        raise ConfigError(f"total_steps={total_steps} must be > 0 for the cosine schedule")
    if optim.schedule == "multistep" and milestones.size and warmup_steps > milestones[0]:
        raise ConfigError(
            f"config.optim.warmup_epochs={optim.warmup_epochs} ends after the first multistep "
            f"milestone (epoch {min(optim.decay_epochs)})"
        )

    def schedule(count: jax.Array) -> jax.Array:
        step = jnp.maximum(jnp.asarray(count, jnp.int32) - 1, 0)
        t = step.astype(jnp.float32)
        warm = warmup_lr + t * warmup_slope
        if optim.schedule == "cosine":
            cosine = min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + jnp.cos(jnp.pi * t / total_steps))
            after = jnp.where(step < total_steps, cosine, min_lr)
        else:
            num_decays = jnp.searchsorted(milestones, step, side="right")
            after = peak_lr * jnp.float32(optim.decay_rate) ** num_decays
        return jnp.where(step < warmup_steps, warm, after).astype(jnp.float32)

    return schedule


def _half_cosine(
    optim: ml_collections.ConfigDict,
    peak_lr: float,
    min_lr: float,
    steps_per_epoch: int,
    total_steps: int,
) -> optax.Schedule:
    """MAE per-iteration warmup + half-cycle cosine (module docstring)."""
    if total_steps <= 0:
        raise ConfigError(f"total_steps={total_steps} must be > 0 for the half_cosine schedule")
    warmup = float(optim.warmup_epochs)
    epochs = total_steps / steps_per_epoch  # A run shorter than the warmup stays in warmup.

    def schedule(count: jax.Array) -> jax.Array:
        epoch = jnp.asarray(count, jnp.float32) / steps_per_epoch
        warm = peak_lr * epoch / max(warmup, 1e-12)
        progress = jnp.clip((epoch - warmup) / max(epochs - warmup, 1e-12), 0.0, 1.0)
        cosine = min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(epoch < warmup, warm, cosine).astype(jnp.float32)

    return schedule


def _schedule(
    optim: ml_collections.ConfigDict,
    peak_lr: float,
    warmup_lr: float,
    min_lr: float,
    steps_per_epoch: int,
    total_steps: int,
) -> optax.Schedule:
    """The schedule named by `optim.schedule`, indexed by the optimizer step count."""
    if optim.schedule not in SCHEDULES:
        raise ConfigError(
            f"config.optim.schedule='{optim.schedule}' must be one of {', '.join(SCHEDULES)}"
        )
    if optim.schedule == "half_cosine":
        return _half_cosine(optim, peak_lr, min_lr, steps_per_epoch, total_steps)
    return _timm_schedule(optim, peak_lr, warmup_lr, min_lr, steps_per_epoch, total_steps)


def learning_rate_schedule(
    config: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int
) -> optax.Schedule:
    """Per-step lr of `config.optim` (semantics in the module docstring)."""
    base_lr, warmup_lr, min_lr = scaled_lrs(config)
    return _schedule(config.optim, base_lr, warmup_lr, min_lr, steps_per_epoch, total_steps)


def weight_decay_mask(params: PyTree, no_decay_keywords: Sequence[str]) -> PyTree:
    """Tree of bools like `params`; True = decay.

    No decay for arrays with ndim <= 1, for parameters named `bias`, and for any parameter
    whose dotted path contains one of `no_decay_keywords`.
    """

    def decays(path: Sequence[Any], leaf: Any) -> bool:
        name = pytree.param_path(path)
        return (
            len(leaf.shape) > 1
            and name.rsplit(".", 1)[-1] != "bias"
            and not any(keyword in name for keyword in no_decay_keywords)
        )

    return jax.tree_util.tree_map_with_path(decays, params)


def layer_ids_swin(path: str, depths: Sequence[int]) -> int:
    """Layer id of a Swin parameter: 0 = embedding, then one per block, last = the rest."""
    parts = path.split(".")
    if parts[0] in ("patch_embed", "mask_token"):
        return 0
    if parts[0] == "layers" and len(parts) > 3:
        stage = int(parts[1])
        if parts[2] == "blocks":
            return sum(depths[:stage]) + int(parts[3]) + 1
        if parts[2] == "downsample":
            return sum(depths[: stage + 1])
    return sum(depths) + 1


def layer_ids_vit(path: str, depth: int) -> int:
    """Layer id of a ViT parameter: 0 = embeddings/tokens, k + 1 = block k, last = the rest."""
    parts = path.split(".")
    if parts[0] in ("cls_token", "mask_token", "pos_embed", "patch_embed"):
        return 0
    if parts[0] == "blocks" and len(parts) > 1:
        return int(parts[1]) + 1
    return depth + 1


def layer_ids_hivit(path: str, mlp_depth: int) -> int:
    """Layer id of a HiViT parameter (iTPN's `lr_decay.get_layer_id`): 0 = patch embedding and
    position table; `blocks.i` -> 1 + its rank among the non-merge blocks (a PatchMerge takes
    its preceding block's id); last = the rest (fc_norm, head). Blocks are the flat official
    list: mlp_depth MLP blocks, a merge, mlp_depth MLP blocks, a merge, the attention blocks."""
    parts = path.split(".")
    merges = (mlp_depth, 2 * mlp_depth + 1)
    if parts[0] in ("cls_token", "pos_embed", "absolute_pos_embed", "patch_embed"):
        return 0
    if parts[0] == "blocks" and len(parts) > 1:
        index = int(parts[1])
        return index + 1 - sum(m <= index for m in merges)
    return -1  # The caller maps it to num_layers.


def layer_scales(config: ml_collections.ConfigDict, params: PyTree) -> tuple[PyTree, PyTree]:
    """(layer ids, lr scales) trees like `params` for layer-wise lr decay (SPEC 1.8, 3.3).

    Paths may carry the `encoder.` prefix of our models. Swin / ViT (SimMIM `optimizer.py`):
    num_layers = blocks + 2, scale = decay ** (num_layers - 1 - id). HiViT (iTPN `lr_decay.py`):
    num_layers = non-merge blocks + 1, ids 0..num_layers, and the decay is first rescaled to
    decay ** (13 / num_layers) (a 12-block ViT's total decay): scale = that ** (num_layers - id).
    """
    model, decay = config.model, config.optim.layer_decay
    if model.name == "swin":
        exponent = sum(model.depths) + 1
        layer_id = functools.partial(layer_ids_swin, depths=tuple(model.depths))
    elif model.name == "vit":
        exponent = model.depth + 1
        layer_id = functools.partial(layer_ids_vit, depth=model.depth)
    elif model.name == "itpn":
        exponent = 2 * model.mlp_depth + model.depth + 1
        decay = decay ** (13 / exponent)
        hivit_id = functools.partial(layer_ids_hivit, mlp_depth=model.mlp_depth)
        layer_id = lambda path: hivit_id(path) % (exponent + 1)  # -1 -> num_layers
    else:
        raise ConfigError(f"layer decay: config.model.name='{model.name}' has no layer ids")
    ids = jax.tree_util.tree_map_with_path(
        lambda path, _: layer_id(pytree.param_path(path).removeprefix("encoder.")), params
    )
    return ids, jax.tree.map(lambda i: decay ** (exponent - i), ids)


def make_optimizer(
    config: ml_collections.ConfigDict, params: PyTree, steps_per_epoch: int, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Global-norm clipping, then AdamW with the weight-decay mask and the lr schedule.

    With `config.optim.layer_decay < 1`, parameters are grouped by layer id (from their paths
    in `params`) and each group runs AdamW on its own schedule (module docstring). Returns the
    transformation and the schedule of the undecayed (top) layer, for logging.
    """
    optim = config.optim
    base_lr, warmup_lr, min_lr = scaled_lrs(config)
    mask = functools.partial(weight_decay_mask, no_decay_keywords=tuple(optim.no_decay_keywords))

    def adamw(peak_lr: float) -> optax.GradientTransformation:
        group_min = min_lr * peak_lr / base_lr if optim.schedule == "half_cosine" else min_lr
        schedule = _schedule(optim, peak_lr, warmup_lr, group_min, steps_per_epoch, total_steps)
        return optax.adamw(
            schedule,
            b1=optim.b1,
            b2=optim.b2,
            eps=optim.eps,
            weight_decay=optim.weight_decay,
            mask=mask,
        )

    if optim.layer_decay < 1.0:
        layer_ids, scales = layer_scales(config, params)
        ids, lr_scales = jax.tree.leaves(layer_ids), jax.tree.leaves(scales)
        groups = {f"layer_{i}": s for i, s in zip(ids, lr_scales, strict=True)}
        tx = optax.multi_transform(
            {name: adamw(base_lr * scale) for name, scale in sorted(groups.items())},
            jax.tree.map(lambda i: f"layer_{i}", layer_ids),
        )
    else:
        tx = adamw(base_lr)
    if optim.grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(optim.grad_clip), tx)
    return tx, learning_rate_schedule(config, steps_per_epoch, total_steps)
