"""Shared config building blocks, strict `:variant` parsing and validation.

Configs are Python (`configs/*.py`); they build on `base_config()` here so every method shares
one schema for data, optimizer, mesh, logging and checkpointing. `validate()` checks ranges and
cross-field rules before anything is compiled, and fails with one line naming the problem.
"""

from __future__ import annotations

import difflib

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
    c.mode = "pretrain"  # pretrain | finetune | evaluate
    # Encoder weights to start from: a workdir (its newest checkpoint), a checkpoint step
    # directory, or a .pth / .safetensors / .npz weight file (mim_jax.init_from). A workdir
    # that already holds checkpoints resumes instead.
    c.init_from = ""
    c.seed = 0
    c.batch_size = 2048  # Global batch over all hosts and devices.
    c.num_epochs = 100
    c.total_steps = -1  # > 0 overrides num_epochs (smoke runs, benchmarks).
    c.dtype = "float32"  # Compute dtype; parameters and optimizer state stay float32.
    # Micro-batches per optimizer step (scanned inside the one jitted step): the global batch
    # `batch_size` is split into `accum_steps` micro-batches of batch_size / accum_steps.
    c.accum_steps = 1
    # Rematerialization per block of every encoder and decoder: none | full | dots (keep the
    # matmul outputs, recompute the rest).
    c.remat = "none"

    c.data = ml_collections.ConfigDict()
    c.data.source = "tfds"  # tfds | folder | bundled
    c.data.name = "imagenet2012"  # TFDS name when source == tfds.
    c.data.split = "train"
    c.data.val_split = "validation"  # Evaluation split (a folder source also finds 'val').
    c.data.tfds_data_dir = ""  # Local dir or gs:// path; '' = TFDS default.
    c.data.folder = ""  # Image folder when source == folder (class sub-folders or flat).
    c.data.num_examples = 1024  # Examples per epoch for source == bundled.
    c.data.crop_scale = (0.67, 1.0)
    c.data.crop_ratio = (3.0 / 4.0, 4.0 / 3.0)
    c.data.interpolation = "bilinear"  # bilinear | bicubic
    c.data.hflip = True
    c.data.crop_pct = 0.875  # Evaluation: resize the short side to size / crop_pct, crop size.
    c.data.mean = IMAGENET_MEAN
    c.data.std = IMAGENET_STD
    c.data.num_workers = 8  # grain worker processes per host; 0 = in-process.
    c.data.prefetch = 2  # Per worker: batches prefetched and reader threads (0 = synchronous).
    # Unreadable images are replaced (deterministically) and counted; the run stops when the
    # distinct bad files exceed this fraction of the examples read so far.
    c.data.max_bad_fraction = 0.001

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
    c.mesh.dcn_data = 1  # Slices (multi-slice TPU jobs) the data axis spans over the DCN.
    c.sharding_rules = DEFAULT_SHARDING_RULES

    c.log_every_steps = 50
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 3
    c.async_checkpointing = True
    c.image_every_steps = 1000  # Reconstruction grid to TensorBoard and workdir.
    c.num_images = 8
    c.profile_steps = 0  # > 0: a jax profiler trace of this many steps (from step 10) in workdir.
    # A non-finite loss or gradient: stop (name the step and the last good checkpoint) or skip
    # (the update is not applied; `max_skipped_steps` skipped steps in a row stop the run).
    c.nonfinite = "stop"
    c.max_skipped_steps = 10
    c.poison_loss_step = -1  # Tests: >= 0 makes the loss (and gradients) NaN at that step.

    # Frozen-feature evaluation (mim_jax.evaluate): the kNN monitor during pretraining and the
    # evaluation jobs read the labeled config.data.split (bank) and val_split (queries).
    c.eval = ml_collections.ConfigDict()
    c.eval.knn_every_steps = 0  # > 0: kNN top-1 of the encoder every this many steps.
    c.eval.batch_size = 256  # Global batch of the feature extraction.
    c.eval.knn_k = 20
    c.eval.knn_temperature = 0.07
    c.eval.max_train_examples = 0  # > 0: an evenly spaced subset of the bank split.
    c.eval.max_val_examples = 0  # > 0: likewise for the validation split.
    return c


def finetune_recipe(c: ml_collections.ConfigDict) -> None:
    """SimMIM's fine-tuning recipe (SPEC 1.8) on top of `base_config()`: mode `finetune`,
    RandomResizedCrop(0.08-1, bicubic) + flip + RandAugment rand-m9-mstd0.5-inc1 (colour
    jitter 0.4 is set but, as in timm, applies only without RandAugment) + random erasing
    0.25; Mixup 0.8 / CutMix 1.0 (switch 0.5, label smoothing 0.1); AdamW (0.9, 0.999),
    wd 0.05, clip 5, warmup + cosine, lr scaled by batch / 512; top-1/top-5 on
    `data.val_split` every `eval.every_steps` and at the end."""
    c.mode = "finetune"
    c.num_classes = 0  # 0: the class count of the labeled training split.
    c.data.crop_scale = (0.08, 1.0)
    c.data.interpolation = "bicubic"
    c.data.auto_augment = "rand-m9-mstd0.5-inc1"  # '' disables RandAugment.
    c.data.color_jitter = 0.4
    c.data.reprob = 0.25
    c.mixup = ml_collections.ConfigDict(
        dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, label_smoothing=0.1)
    )
    c.eval.every_steps = 1000  # Top-1/top-5 on data.val_split (also at the last step).
    c.num_epochs = 100
    c.optim.base_lr = 1.25e-3
    c.optim.warmup_lr = 2.5e-7
    c.optim.min_lr = 2.5e-7
    c.optim.warmup_epochs = 20.0
    c.optim.weight_decay = 0.05
    c.optim.grad_clip = 5.0


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


def vit_base_model(*, finetune: bool = False) -> ml_collections.ConfigDict:
    """`config.model` of SimMIM's ViT-B/16 at 224 px: pretraining shares one relative position
    bias table (`USE_SHARED_RPB`); fine-tuning has one per block and mean pooling + fc_norm."""
    return ml_collections.ConfigDict(
        dict(
            name="vit",
            img_size=224,
            patch_size=16,
            in_chans=3,
            embed_dim=768,
            depth=12,
            num_heads=12,
            mlp_ratio=4.0,
            qkv_bias=True,
            drop_path_rate=0.1,
            norm_eps=1e-6,
            init_values=0.1,
            use_abs_pos=False,
            use_shared_rel_pos_bias=not finetune,
            use_rel_pos_bias=finetune,
            use_mean_pooling=finetune,
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


def _unknown_key(key: str, name: str, node: ml_collections.ConfigDict) -> str:
    """'unknown config key ...' with the closest field of `node`, if one is close."""
    close = difflib.get_close_matches(name, list(node.keys()), n=1)
    return f"unknown config key '{key}'" + (f" (did you mean '{close[0]}'?)" if close else "")


def apply_pairs(c: ml_collections.ConfigDict, pairs: dict[str, str]) -> None:
    """Applies `key.sub=value` overrides from the config arg, parsed by the field's type."""
    for key, raw in pairs.items():
        *parents, leaf = key.split(".")
        node = c
        for name in parents:
            if name not in node:
                raise ConfigError(_unknown_key(key, name, node))
            node = node[name]
        if leaf not in node:
            raise ConfigError(_unknown_key(key, leaf, node))
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
