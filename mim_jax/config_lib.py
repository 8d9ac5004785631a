"""Shared config building blocks, strict `:variant` parsing and validation.

Configs are Python (`configs/*.py`); they build on `base_config()` here so every method shares
one schema for data, optimizer, mesh, logging and checkpointing. `validate()` checks ranges and
cross-field rules before anything is compiled, and fails with one line naming the problem.
"""

from __future__ import annotations

import ml_collections

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Logical axis name -> mesh axes for parameters (and so for optimizer state). A dimension not
# divisible by its mesh axes stays replicated (sharding.py), so tiny models run on any mesh.
# Batches are always split over data x fsdp (sharding.BATCH_AXES).
DEFAULT_SHARDING_RULES = (
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("patch", None),
    ("channels", None),
    ("table", None),
)


class ConfigError(ValueError):
    """A config key or value is wrong; the message names it."""


def base_config() -> ml_collections.ConfigDict:
    """Fields every method uses; a method config fills `model`, `mask` and the recipe."""
    c = ml_collections.ConfigDict()
    c.method = ""
    c.mode = "pretrain"
    c.seed = 0
    c.batch_size = 2048  # Global batch over all hosts and devices.
    c.num_epochs = 100
    c.total_steps = -1  # > 0 overrides num_epochs (smoke runs, benchmarks).
    c.dtype = "float32"  # Compute dtype; parameters and optimizer state stay float32.

    c.data = ml_collections.ConfigDict()
    c.data.source = "tfds"  # tfds | folder | bundled
    c.data.name = "imagenet2012"  # TFDS name when source == tfds.
    c.data.split = "train"
    c.data.tfds_data_dir = ""  # Local dir or gs:// path; '' = TFDS default.
    c.data.folder = ""  # Image folder when source == folder (class sub-folders or flat).
    c.data.num_examples = 1024  # Examples per epoch for source == bundled.
    c.data.crop_scale = (0.67, 1.0)
    c.data.crop_ratio = (3.0 / 4.0, 4.0 / 3.0)
    c.data.interpolation = "bilinear"  # bilinear | bicubic
    c.data.hflip = True
    c.data.mean = IMAGENET_MEAN
    c.data.std = IMAGENET_STD
    c.data.num_workers = 8  # grain worker processes per host; 0 = in-process.
    c.data.prefetch = 2  # Per worker: batches prefetched and reader threads (0 = synchronous).

    c.optim = ml_collections.ConfigDict()
    c.optim.base_lr = 2e-4
    c.optim.warmup_lr = 1e-6
    c.optim.min_lr = 1e-5
    c.optim.lr_batch_base = 512  # lr = base_lr * batch_size / lr_batch_base (also warmup/min).
    c.optim.warmup_epochs = 10.0
    c.optim.schedule = "cosine"  # cosine | multistep (timm/SimMIM) | half_cosine (MAE)
    c.optim.decay_epochs = (700,)  # multistep milestones.
    c.optim.decay_rate = 0.1
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.05
    c.optim.grad_clip = 5.0  # Global-norm clip; 0 disables.
    c.optim.layer_decay = 1.0  # < 1: layer-wise lr decay (fine-tuning recipes).
    # Parameters whose path contains one of these (or that are 1-D) get no weight decay.
    c.optim.no_decay_keywords = (
        "mask_token",
        "cls_token",
        "pos_embed",
        "absolute_pos_embed",
        "relative_position_bias_table",
    )

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: whatever devices remain after fsdp and tensor.
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.sharding_rules = DEFAULT_SHARDING_RULES

    c.log_every_steps = 50
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 3
    c.async_checkpointing = True
    c.image_every_steps = 1000  # Reconstruction grid to TensorBoard and workdir.
    c.num_images = 8
    c.profile_steps = 0  # > 0: a jax profiler trace of this many steps (from step 10) in workdir.
    return c


def swin_model(
    embed_dim: int, num_heads: tuple[int, ...], window_size: int, *, img_size: int, norm_eps: float
) -> ml_collections.ConfigDict:
    """`config.model` of a patch-4, depths 2-2-18-2 Swin (B: 128-d, L: 192-d)."""
    return ml_collections.ConfigDict(
        dict(
            name="swin",
            img_size=img_size,
            patch_size=4,
            in_chans=3,
            embed_dim=embed_dim,
            depths=(2, 2, 18, 2),
            num_heads=num_heads,
            window_size=window_size,
            mlp_ratio=4.0,
            qkv_bias=True,
            drop_path_rate=0.0,
            norm_eps=norm_eps,
        )
    )


def mae_recipe(c: ml_collections.ConfigDict, *, base_lr: float) -> None:
    """MAE's pretraining recipe (GreenMIM, iTPN pixel; SPEC 2.8, 3.3): RandomResizedCrop(0.2-1,
    bicubic), AdamW (0.9, 0.95), wd 0.05, lr = `base_lr` * batch / 256, 40 warmup epochs then a
    per-step half-cycle cosine to 0, no gradient clipping."""
    c.data.crop_scale = (0.2, 1.0)
    c.data.interpolation = "bicubic"
    c.optim.schedule = "half_cosine"
    c.optim.base_lr = base_lr
    c.optim.lr_batch_base = 256
    c.optim.min_lr = 0.0
    c.optim.warmup_epochs = 40.0
    c.optim.b2 = 0.95
    c.optim.weight_decay = 0.05
    c.optim.grad_clip = 0.0


def quickstart_run(c: ml_collections.ConfigDict, *, lr: float) -> None:
    """The CPU smoke-run settings shared by the `quickstart` variants: bundled photos, batch 32,
    600 steps at `lr` (warmup half an epoch), logs every 20 steps, checkpoints and
    reconstruction grids every 200."""
    c.data.source = "bundled"
    c.data.num_examples = 4096
    c.data.num_workers = 2
    c.batch_size = 32
    c.total_steps = 600
    c.optim.base_lr = lr
    c.optim.lr_batch_base = 32
    c.optim.warmup_epochs = 0.5
    c.log_every_steps = 20
    c.checkpoint_every_steps = 200
    c.image_every_steps = 200
    c.num_images = 8


def parse_arg(arg: str | None, variants: tuple[str, ...]) -> tuple[str, dict[str, str]]:
    """Parses `variant[,key=value...]` strictly; returns the variant and the key/value pairs."""
    if not arg:
        return "", {}
    parts = [p for p in arg.split(",") if p]
    variant = ""
    pairs: dict[str, str] = {}
    for part in parts:
        if "=" in part:
            key, value = part.split("=", 1)
            pairs[key.strip()] = value.strip()
        elif variant:
            raise ConfigError(f"config arg '{arg}': more than one variant ('{variant}', '{part}')")
        else:
            variant = part.strip()
    if variant and variant not in variants:
        raise ConfigError(
            f"unknown config variant '{variant}'; choose one of: {', '.join(variants)}"
        )
    return variant, pairs


def apply_pairs(c: ml_collections.ConfigDict, pairs: dict[str, str]) -> None:
    """Applies `key.sub=value` overrides from the config arg, parsed by the field's type."""
    for key, raw in pairs.items():
        *parents, leaf = key.split(".")
        node = c
        for name in parents:
            if name not in node:
                raise ConfigError(f"unknown config key '{key}'")
            node = node[name]
        if leaf not in node:
            raise ConfigError(f"unknown config key '{key}'")
        old = node[leaf]
        if isinstance(old, tuple | list) and (not old or isinstance(old[0], tuple | list)):
            raise ConfigError(
                f"config key '{key}' cannot be set from the config arg; use --config.{key}=..."
            )
        try:
            if isinstance(old, bool):
                if raw.lower() not in ("true", "false"):
                    raise ValueError(raw)
                value = raw.lower() == "true"
            elif isinstance(old, tuple | list):
                value = tuple(type(old[0])(v) for v in raw.split(":"))
            else:
                value = type(old)(raw)
        except ValueError as e:
            raise ConfigError(
                f"config key '{key}': cannot parse '{raw}' as {type(old).__name__}"
            ) from e
        node[leaf] = value


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(c: ml_collections.ConfigDict) -> None:
    """Checks ranges and cross-field rules; raises ConfigError naming the bad field."""
    _check(c.mode in ("pretrain",), f"config.mode='{c.mode}': supported modes are: pretrain")
    _check(c.batch_size > 0, f"config.batch_size={c.batch_size} must be > 0")
    _check(
        c.num_epochs > 0 or c.total_steps > 0,
        "config.num_epochs or config.total_steps must be > 0",
    )
    _check(
        c.dtype in ("float32", "bfloat16"),
        f"config.dtype='{c.dtype}' must be float32 or bfloat16",
    )
    _check(
        c.data.source in ("tfds", "folder", "bundled"),
        f"config.data.source='{c.data.source}' must be one of tfds, folder, bundled",
    )
    _check(
        c.data.source != "folder" or bool(c.data.folder),
        "config.data.folder must be set when config.data.source='folder'",
    )
    lo, hi = c.data.crop_scale
    _check(0 < lo <= hi <= 1, f"config.data.crop_scale={tuple(c.data.crop_scale)} not in (0, 1]")
    _check(
        c.data.interpolation in ("bilinear", "bicubic"),
        f"config.data.interpolation='{c.data.interpolation}' must be bilinear or bicubic",
    )
    _check(
        c.optim.schedule in ("cosine", "multistep", "half_cosine"),
        f"config.optim.schedule='{c.optim.schedule}' must be cosine, multistep or half_cosine",
    )
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
    _check(
        c.checkpoint_every_steps > 0 and c.log_every_steps > 0 and c.image_every_steps > 0,
        "config.*_every_steps must be > 0",
    )
    _check(c.profile_steps >= 0, f"config.profile_steps={c.profile_steps} must be >= 0")
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
    if m.name == "swin":
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
        if c.method == "greenmim":
            final_patch = m.patch_size * 2 ** (len(m.depths) - 1)
            _check(
                c.mask.patch_size % final_patch == 0,
                f"config.mask.patch_size={c.mask.patch_size} must be a multiple of the "
                f"final-stage patch {final_patch} (GreenMIM masks whole stage-4 tokens)",
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
    elif m.name == "vit":
        _check(
            m.img_size % m.patch_size == 0,
            f"config.model.img_size={m.img_size} must be divisible by patch_size={m.patch_size}",
        )
    elif m.name == "itpn":
        _check(
            m.patch_size % 4 == 0 and c.mask.patch_size == m.patch_size,
            f"config.model.patch_size={m.patch_size} must be a multiple of 4 (HiViT's 4x4 inner "
            f"tokens) and equal config.mask.patch_size={c.mask.patch_size} (iTPN masks main "
            "patches)",
        )
        _check(
            m.embed_dim % 4 == 0 and m.embed_dim % m.num_heads == 0,
            f"config.model.embed_dim={m.embed_dim} must divide by 4 and by num_heads={m.num_heads}",
        )
        d = c.decoder
        _check(
            d.embed_dim % 16 == 0 and d.embed_dim % d.num_heads == 0,
            f"config.decoder.embed_dim={d.embed_dim} must divide by 16 (4x4 P4 tokens) and by "
            f"num_heads={d.num_heads}",
        )
        f = c.mfm
        for key, value, allowed in (
            ("teacher", f.teacher, ("none", "ema", "clip")),
            ("loss", f.loss, ("mse", "smooth_l1")),
            ("momentum_schedule", f.momentum_schedule, ("cosine", "constant")),
        ):
            _check(
                value in allowed, f"config.mfm.{key}='{value}' must be one of {', '.join(allowed)}"
            )
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
    else:
        _check(False, f"config.model.name='{m.name}' must be swin, vit or itpn")
