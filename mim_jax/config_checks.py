"""Config validation: ranges and cross-field rules checked before anything is compiled, each
failing with one line (a `ConfigError`) that names the field.

Common fields first, then the model geometry, then what the mode adds: masks and decoders
(pretrain), classes, augmentation and mixup (finetune), the evaluation kind (evaluate).
"""

from __future__ import annotations

import ml_collections

from mim_jax.config_lib import ConfigError

MODES = ("pretrain", "finetune", "evaluate")
EVAL_KINDS = ("top1", "knn", "linear_probe")
REMAT = ("none", "full", "dots")
NONFINITE = ("stop", "skip")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _one_of(value, allowed: tuple, name: str) -> None:
    _check(value in allowed, f"config.{name}='{value}' must be one of: {', '.join(allowed)}")


def validate(c: ml_collections.ConfigDict) -> None:
    """Checks ranges and cross-field rules; raises ConfigError naming the bad field."""
    _one_of(c.mode, MODES, "mode")
    _check_common(c)
    _check_model(c)
    if c.mode == "pretrain":
        _check_masks(c)
    elif c.mode == "finetune":
        _check_finetune(c)
    else:
        _one_of(c.eval.kind, EVAL_KINDS, "eval.kind")
        _check(
            c.eval.kind != "top1" or bool(c.init_from),
            "config.init_from must name a fine-tuned checkpoint for eval.kind='top1'",
        )


def _check_common(c: ml_collections.ConfigDict) -> None:
    _check(c.batch_size > 0, f"config.batch_size={c.batch_size} must be > 0")
    _check(
        c.num_epochs > 0 or c.total_steps > 0,
        "config.num_epochs or config.total_steps must be > 0",
    )
    _one_of(c.dtype, ("float32", "bfloat16"), "dtype")
    _one_of(c.remat, REMAT, "remat")
    _check(
        c.accum_steps >= 1 and c.batch_size % c.accum_steps == 0,
        f"config.accum_steps={c.accum_steps} must be >= 1 and divide config.batch_size="
        f"{c.batch_size}",
    )
    _one_of(c.data.source, ("tfds", "folder", "bundled"), "data.source")
    _check(
        c.data.source != "folder" or bool(c.data.folder),
        "config.data.folder must be set when config.data.source='folder'",
    )
    lo, hi = c.data.crop_scale
    _check(0 < lo <= hi <= 1, f"config.data.crop_scale={tuple(c.data.crop_scale)} not in (0, 1]")
    _check(0 < c.data.crop_pct <= 1, f"config.data.crop_pct={c.data.crop_pct} not in (0, 1]")
    _one_of(c.data.interpolation, ("bilinear", "bicubic"), "data.interpolation")
    _one_of(c.optim.schedule, ("cosine", "multistep", "half_cosine"), "optim.schedule")
    _check(c.optim.base_lr > 0, f"config.optim.base_lr={c.optim.base_lr} must be > 0")
    _check(c.optim.grad_clip >= 0, f"config.optim.grad_clip={c.optim.grad_clip} must be >= 0")
    _check(
        0 < c.optim.layer_decay <= 1,
        f"config.optim.layer_decay={c.optim.layer_decay} must be in (0, 1]",
    )
    _check(
        c.data.num_workers >= 0 and c.data.prefetch >= 0 and c.keep_checkpoints >= 1,
        "config.data.num_workers and config.data.prefetch must be >= 0, "
        "config.keep_checkpoints >= 1",
    )
    for axis in ("data", "fsdp", "tensor"):
        size = c.mesh[axis]
        _check(size == -1 or size >= 1, f"config.mesh.{axis}={size} must be -1 or >= 1")
    _check(c.mesh.dcn_data >= 1, f"config.mesh.dcn_data={c.mesh.dcn_data} must be >= 1")
    for key in ("checkpoint_every_steps", "log_every_steps", "image_every_steps"):
        _check(c[key] > 0, f"config.{key}={c[key]} must be > 0")
    _check(c.profile_steps >= 0, f"config.profile_steps={c.profile_steps} must be >= 0")
    _one_of(c.nonfinite, NONFINITE, "nonfinite")
    _check(c.max_skipped_steps >= 1, f"config.max_skipped_steps={c.max_skipped_steps} must be >= 1")
    _check(
        0 <= c.data.max_bad_fraction <= 1,
        f"config.data.max_bad_fraction={c.data.max_bad_fraction} must be in [0, 1]",
    )
    e = c.eval
    _check(e.batch_size > 0, f"config.eval.batch_size={e.batch_size} must be > 0")
    _check(
        e.knn_every_steps >= 0 and e.knn_k >= 1 and e.knn_temperature > 0,
        f"config.eval: knn_every_steps={e.knn_every_steps} must be >= 0, knn_k={e.knn_k} >= 1, "
        f"knn_temperature={e.knn_temperature} > 0",
    )
    _check(
        min(e.max_train_examples, e.max_val_examples) >= 0,
        "config.eval.max_train_examples and max_val_examples must be >= 0 (0 = all)",
    )


def _check_model(c: ml_collections.ConfigDict) -> None:
    m = c.model
    if m.name == "swin":
        _check_swin(m)
    elif m.name == "vit":
        _check(
            m.img_size % m.patch_size == 0,
            f"config.model.img_size={m.img_size} must be divisible by patch_size={m.patch_size}",
        )
    elif m.name == "itpn":
        _check(
            m.patch_size % 4 == 0 and m.img_size % m.patch_size == 0,
            f"config.model.patch_size={m.patch_size} must be a multiple of 4 (HiViT's 4x4 inner "
            f"tokens) and divide config.model.img_size={m.img_size}",
        )
        _check(
            m.embed_dim % 4 == 0 and m.embed_dim % m.num_heads == 0,
            f"config.model.embed_dim={m.embed_dim} must divide by 4 and by num_heads={m.num_heads}",
        )
    else:
        _check(False, f"config.model.name='{m.name}' must be swin, vit or itpn")


def _check_swin(m: ml_collections.ConfigDict) -> None:
    grid = m.img_size // m.patch_size
    for stage in range(len(m.depths)):
        res = grid // 2**stage
        _check(
            res * 2**stage == grid,
            f"config.model.img_size={m.img_size}: stage {stage} grid is not an integer",
        )
        _check(
            res <= m.window_size or res % m.window_size == 0,
            f"config.model.window_size={m.window_size} does not divide the stage-{stage} "
            f"grid {res}",
        )
    _check(
        len(m.depths) == len(m.num_heads),
        "config.model.depths and config.model.num_heads must have the same length",
    )
    for stage, heads in enumerate(m.num_heads):
        dim = m.embed_dim * 2**stage
        _check(
            dim % heads == 0,
            f"config.model.num_heads[{stage}]={heads} does not divide the stage width {dim}",
        )


def _check_masks(c: ml_collections.ConfigDict) -> None:
    """Mask units, and the decoders and teachers of the pretraining methods."""
    m = c.model
    _check(
        m.img_size % c.mask.patch_size == 0,
        f"config.model.img_size={m.img_size} must be divisible by "
        f"config.mask.patch_size={c.mask.patch_size}",
    )
    _check(
        c.mask.patch_size % m.patch_size == 0,
        f"config.mask.patch_size={c.mask.patch_size} must be divisible by "
        f"config.model.patch_size={m.patch_size}",
    )
    _check(0 < c.mask.ratio < 1, f"config.mask.ratio={c.mask.ratio} must be in (0, 1)")
    if c.method == "greenmim" and m.name == "swin":
        _check_greenmim(c)
    elif m.name == "itpn":
        _check_itpn(c)


def _check_greenmim(c: ml_collections.ConfigDict) -> None:
    m = c.model
    final_patch = m.patch_size * 2 ** (len(m.depths) - 1)
    _check(
        c.mask.patch_size % final_patch == 0,
        f"config.mask.patch_size={c.mask.patch_size} must be a multiple of the final-stage patch "
        f"{final_patch} (GreenMIM masks whole stage-4 tokens)",
    )
    _check(c.mask.groups >= 0, f"config.mask.groups={c.mask.groups} must be >= 0")
    d = c.decoder
    _check(
        d.depth >= 1 and d.embed_dim % 4 == 0 and d.embed_dim % d.num_heads == 0,
        f"config.decoder: depth={d.depth} must be >= 1 and embed_dim={d.embed_dim} "
        f"divisible by 4 (sin-cos table) and by num_heads={d.num_heads}",
    )
    for key in ("group_size", "num_groups"):
        value = tuple(c.mask[key])
        _check(
            len(value) == len(m.depths) and all(v >= 0 for v in value),
            f"config.mask.{key}={value} needs one value >= 0 per stage "
            f"({len(m.depths)}; 0 = default)",
        )


def _check_itpn(c: ml_collections.ConfigDict) -> None:
    m = c.model
    _check(
        c.mask.patch_size == m.patch_size,
        f"config.model.patch_size={m.patch_size} must equal config.mask.patch_size="
        f"{c.mask.patch_size} (iTPN masks main patches)",
    )
    d = c.decoder
    _check(
        d.embed_dim % 16 == 0 and d.embed_dim % d.num_heads == 0,
        f"config.decoder.embed_dim={d.embed_dim} must divide by 16 (4x4 P4 tokens) and by "
        f"num_heads={d.num_heads}",
    )
    f = c.mfm
    _one_of(f.teacher, ("none", "ema", "clip"), "mfm.teacher")
    _one_of(f.loss, ("mse", "smooth_l1"), "mfm.loss")
    _one_of(f.momentum_schedule, ("cosine", "constant"), "mfm.momentum_schedule")
    _check(0 <= f.momentum <= 1, f"config.mfm.momentum={f.momentum} must be in [0, 1]")
    _check(
        len(f.weights) == 3 and min(f.weights) >= 0 and min(f.pixel_weight, f.clip_weight) >= 0,
        f"config.mfm.weights={tuple(f.weights)} must be 3 values >= 0 (one per stage); "
        "pixel_weight and clip_weight >= 0",
    )
    if f.teacher == "clip":
        _check(
            f.clip.img_size // f.clip.patch_size == m.img_size // m.patch_size,
            f"config.mfm.clip: a {f.clip.img_size} px image in {f.clip.patch_size} px patches "
            f"must give the student's {m.img_size // m.patch_size}x"
            f"{m.img_size // m.patch_size} patch grid",
        )


def _check_finetune(c: ml_collections.ConfigDict) -> None:
    _check(c.num_classes >= 0, f"config.num_classes={c.num_classes} must be >= 0 (0 = from data)")
    d = c.data
    _check(0 <= d.reprob <= 1, f"config.data.reprob={d.reprob} must be in [0, 1]")
    _check(d.color_jitter >= 0, f"config.data.color_jitter={d.color_jitter} must be >= 0")
    x = c.mixup
    _check(
        min(x.mixup_alpha, x.cutmix_alpha) >= 0
        and 0 <= x.prob <= 1
        and 0 <= x.switch_prob <= 1
        and 0 <= x.label_smoothing < 1,
        f"config.mixup: alphas must be >= 0, prob={x.prob} and switch_prob={x.switch_prob} in "
        f"[0, 1], label_smoothing={x.label_smoothing} in [0, 1)",
    )
    _check(c.eval.every_steps > 0, f"config.eval.every_steps={c.eval.every_steps} must be > 0")
