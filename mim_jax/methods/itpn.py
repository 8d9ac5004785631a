"""iTPN (SPEC 3, decisions in SPEC 0): HiViT + feature pyramid on kept main patches, multi-scale
MAE decoder, pixel MSE, plus masked feature modeling (MFM) against a teacher.

Model (`MFMModel`): `itpn.iTPNPixelModel` (SPEC 3.2, 3.3) with one Linear head per MFM target
on the decoder output `decoded` `[B, L, D]` (every main patch: mask tokens + position over the
fused pyramid). The student drops masked 16x16 patches from the start, so its lateral pyramid
inputs see visible patches only.

Teacher (`config.mfm.teacher`), kept in the train state by the train loop (train.py):
  "none"  pixel loss only (an empty teacher module: no parameters).
  "ema"   SPEC 0 default: a HiViT with the student's backbone config, initialized as a copy of
          the student encoder, updated after every step as m * teacher + (1 - m) * student,
          m from `config.mfm.momentum` (cosine to 1 over training, or constant). It runs on the
          full unmasked image; targets are its three stage outputs per main patch (stage 1
          `[4, 4, C1]`, stage 2 `[2, 2, C2]`, stage 3 `[C3]`), each token LayerNorm'ed without
          affine, then flattened; three heads predict them.
  "clip"  SPEC 3.4: a frozen OpenAI CLIP image encoder (`models/clip_vit.py`; weights from
          `config.mfm.teacher_checkpoint`, an .npz of the OpenAI state_dict names); target =
          LN(patch tokens after ln_post @ proj), one head. Teacher input: our input is
          normalized with `config.data.mean/std`, so it is un-normalized to [0, 1], resized
          (lanczos) to `config.mfm.clip.img_size` when that differs, optionally remapped with
          BEiT-v2's ScalingLayerForClip quirk clamp((x + 1) / 2, 0, 1) (`scaling_quirk`: the
          released code maps [0, 1] to [0.5, 1]), then CLIP-normalized.
Loss: `pixel_weight` * pixel MSE on removed patches (targets: per-patch normalized pixels when
`config.norm_pix_loss`, the released code's fixed choice and our default; else the plain
patchified input) + sum_i `weights[i]` * loss_i (EMA) or `clip_weight` * loss (CLIP); loss_i is
MSE or SmoothL1 (beta 1) (`config.mfm.loss`) averaged over the target vector, then over removed
patches (`masked_only`) or all patches. A zero weight drops its term statically. aux:
`loss_pixel`, `loss_mfm_1..3` / `loss_mfm_clip` (the terms with nonzero weight),
`mask_fraction`; `teacher_momentum` from update_teacher.

Where the paper and the released code differ (our choices):
* MFM: the paper pairs pixel reconstruction with MFM against a moving-average teacher fed the
  full image, at every pyramid stage; the released pixel code has no MFM at all (one stride-16
  pixel loss) and the released CLIP code distills a frozen CLIP. Both are here: "ema" (our
  default, per SPEC 0; the paper's per-stage weights are unknown, we use 1) and "clip".
* The "clip" student is our token-dropping pixel iTPN, not the released CLIP model (all tokens,
  mask token after stage 2, rpe, layer scale 0.1, an auxiliary head after block 18 with 2 extra
  blocks, lateral pyramid inputs from the unmasked image). Not implemented: that auxiliary
  loss, BEiT block-wise masking (we mask uniformly at random per sample, 75 of 196 patches in
  the `base_clip_teacher` recipe) and ColorJitter.
* The released pixel code resamples the absolute position table bicubically by (g + 0.1) / g
  whenever tokens are dropped (`interpolate_pos_encoding` compares the kept count with the
  table size); we add the raw table, as its fine-tuning model does (models/hivit.py).
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from mim_jax import masking
from mim_jax.config_lib import ConfigError
from mim_jax.methods import norm_pix
from mim_jax.models import clip_vit, hivit, itpn, layers

TARGET_EPS = 1e-5  # Affine-free LayerNorm of the targets (PyTorch F.layer_norm default).
_ENCODER_KEYS = ("img_size", "patch_size", "in_chans", "embed_dim", "mlp_depth", "depth")
_ENCODER_KEYS += ("num_heads", "bridge_mlp_ratio", "mlp_ratio", "qkv_bias", "norm_eps")
_ENCODER_KEYS += ("ape", "rpe")


@dataclasses.dataclass(frozen=True)
class Objective:
    """The loss settings of `config.mfm` and `config.norm_pix_loss` (static, carried by the
    model: loss_fn sees only the model, the batch and the teacher). `weights` holds one weight
    per MFM head."""

    teacher: str
    pixel_weight: float
    weights: tuple[float, ...]
    loss: str
    masked_only: bool
    data_mean: tuple[float, ...]
    data_std: tuple[float, ...]
    clip_img_size: int
    scaling_quirk: bool
    norm_pix_loss: bool

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> Objective:
        mfm = config.mfm
        weights = {"none": (), "ema": tuple(mfm.weights), "clip": (mfm.clip_weight,)}
        return cls(
            teacher=mfm.teacher,
            pixel_weight=float(mfm.pixel_weight),
            weights=tuple(float(w) for w in weights[mfm.teacher]),
            loss=mfm.loss,
            masked_only=bool(mfm.masked_only),
            data_mean=tuple(config.data.mean),
            data_std=tuple(config.data.std),
            clip_img_size=mfm.clip.img_size,
            scaling_quirk=bool(mfm.clip.scaling_quirk),
            norm_pix_loss=bool(config.norm_pix_loss),
        )

    @property
    def head_names(self) -> tuple[str, ...]:
        """aux name of each MFM head's term."""
        if self.teacher == "clip":
            return ("loss_mfm_clip",)
        return tuple(f"loss_mfm_{i + 1}" for i in range(len(self.weights)))

    def term_weights(self) -> dict[str, float]:
        """Name -> weight of every term with a nonzero weight (terms of weight 0 are skipped)."""
        heads = dict(zip(self.head_names, self.weights, strict=True))
        terms = {"loss_pixel": self.pixel_weight, **heads}
        return {name: w for name, w in terms.items() if w != 0}


class MFMModel(itpn.iTPNPixelModel):
    """iTPN pixel model + `mfm_heads`: Linear(D -> target dim) per MFM target on `decoded`.

    Parameter names equal the pixel model's (`encoder.`, `pyramid.`, `decoder_*`) plus
    `mfm_heads.{i}`; `objective` holds the static loss settings.
    """

    def __init__(
        self,
        encoder: hivit.HiViT,
        *,
        objective: Objective,
        head_dims: tuple[int, ...],
        **kwargs,
    ):
        super().__init__(encoder, **kwargs)
        self.objective = objective
        dim, rngs = self.mask_token.shape[0], kwargs["rngs"]
        dtype = kwargs.get("dtype", jnp.float32)
        self.mfm_heads = nnx.List(
            [layers.Linear(dim, d, ("embed", None), rngs=rngs, dtype=dtype) for d in head_dims]
        )

    def __call__(
        self, images: jax.Array, ids_keep: jax.Array, *, rngs: nnx.Rngs | None = None
    ) -> tuple[itpn.PixelOutputs, tuple[jax.Array, ...]]:
        """images `[B, H, W, C]`, ids_keep `[B, N_keep]` -> (pixel outputs, MFM predictions
        `[B, L, target dim]` per head)."""
        out = super().__call__(images, ids_keep, rngs=rngs)
        return out, tuple(head(out.decoded) for head in self.mfm_heads)


class NoTeacher(nnx.Module):
    """The teacher of `config.mfm.teacher == "none"`: no parameters."""


def build_encoder(
    config: ml_collections.ConfigDict,
    rngs: nnx.Rngs,
    *,
    drop_path_rate: float | None = None,
    remat: str = "none",
) -> hivit.HiViT:
    """HiViT from `config.model` (`drop_path_rate` overrides the config's; `remat`: block
    rematerialization, models/remat.py)."""
    m = config.model
    rate = m.drop_path_rate if drop_path_rate is None else drop_path_rate
    kwargs = {key: m[key] for key in _ENCODER_KEYS}
    dtype = jnp.dtype(config.dtype)
    return hivit.HiViT(**kwargs, drop_path_rate=rate, dtype=dtype, remat=remat, rngs=rngs)


def head_dims(config: ml_collections.ConfigDict) -> tuple[int, ...]:
    """Target vector sizes per main patch: EMA (16 C1, 4 C2, C3); CLIP (output_dim,)."""
    if config.mfm.teacher == "ema":
        c1, c2, c3 = (config.model.embed_dim // k for k in (4, 2, 1))
        return (16 * c1, 4 * c2, c3)
    if config.mfm.teacher == "clip":
        return (config.mfm.clip.output_dim,)
    return ()


def build_model(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> MFMModel:
    """The student: HiViT + pyramid + decoder + MFM heads, from `config.model` / `decoder`
    (`model.mlp_ratio` also sets the pyramid and decoder MLPs, as in the official model);
    `config.remat` rematerializes the blocks of encoder, pyramid and decoder."""
    dec = config.decoder
    return MFMModel(
        build_encoder(config, rngs, remat=config.get("remat", "none")),
        objective=Objective.from_config(config),
        head_dims=head_dims(config),
        fpn_dim=config.model.fpn_dim,
        fpn_depth=config.model.fpn_depth,
        decoder_dim=dec.embed_dim,
        decoder_depth=dec.depth,
        decoder_heads=dec.num_heads,
        mlp_ratio=config.model.mlp_ratio,
        in_chans=config.model.in_chans,
        norm_eps=dec.norm_eps,
        dtype=jnp.dtype(config.dtype),
        remat=config.get("remat", "none"),
        rngs=rngs,
    )


# --- teacher ------------------------------------------------------------------------------------


def build_teacher(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> nnx.Module:
    """EMA: HiViT with the student's backbone config (no drop path); CLIP: CLIPVisionEncoder
    from `config.mfm.clip`; none: an empty module."""
    if config.mfm.teacher == "ema":
        return build_encoder(config, rngs, drop_path_rate=0.0)
    if config.mfm.teacher == "clip":
        clip = config.mfm.clip
        return clip_vit.CLIPVisionEncoder(
            img_size=clip.img_size,
            patch_size=clip.patch_size,
            width=clip.width,
            depth=clip.depth,
            heads=clip.heads,
            output_dim=clip.output_dim,
            dtype=jnp.dtype(config.dtype),
            rngs=rngs,
        )
    return NoTeacher()


def init_teacher(
    config: ml_collections.ConfigDict, student_params: nnx.State, fresh: nnx.State
) -> nnx.State:
    """EMA: a copy of the student's encoder parameters; otherwise the fresh parameters."""
    if config.mfm.teacher != "ema":
        return fresh
    return jax.tree.map(lambda _, s: s, fresh, student_params["encoder"])


def teacher_momentum(config: ml_collections.ConfigDict, step, total_steps: int) -> jax.Array:
    """EMA momentum for update `step`: constant, or cosine from `config.mfm.momentum` (step 0)
    to 1 (step `total_steps`), as BYOL/DINO."""
    base = jnp.float32(config.mfm.momentum)
    if config.mfm.momentum_schedule == "constant":
        return base
    progress = jnp.clip(jnp.asarray(step, jnp.float32) / max(total_steps, 1), 0.0, 1.0)
    return 1.0 - (1.0 - base) * (jnp.cos(jnp.pi * progress) + 1.0) / 2.0


def update_teacher(
    config: ml_collections.ConfigDict,
    teacher_params: nnx.State,
    student_params: nnx.State,
    step: jax.Array,
    total_steps: int,
) -> tuple[nnx.State, dict[str, jax.Array]]:
    """EMA: teacher <- m * teacher + (1 - m) * student encoder (the updated student); a frozen
    teacher is returned unchanged."""
    if config.mfm.teacher != "ema":
        return teacher_params, {}
    m = teacher_momentum(config, step, total_steps)
    new = jax.tree.map(
        lambda t, s: m * t + (1.0 - m) * s, teacher_params, student_params["encoder"]
    )
    return new, {"teacher_momentum": m}


def load_teacher(config: ml_collections.ConfigDict, teacher_params: nnx.State) -> nnx.State:
    """CLIP: the weights of `config.mfm.teacher_checkpoint` (.npz with OpenAI CLIP state_dict
    names; the text tower's keys are ignored). Runs on every host on a fresh start."""
    path = config.mfm.teacher_checkpoint
    if config.mfm.teacher != "clip":
        return teacher_params
    if not path:
        logging.warning("config.mfm.teacher_checkpoint is empty: the CLIP teacher stays random")
        return teacher_params
    if not epath.Path(path).exists():
        raise ConfigError(
            f"config.mfm.teacher_checkpoint='{path}' does not exist (expected an .npz of an "
            "OpenAI CLIP state_dict)"
        )
    with epath.Path(path).open("rb") as f:
        state_dict = dict(np.load(f))
    state = jax.tree.map(lambda x: x, teacher_params)
    shapes = jax.tree.map(lambda x: np.broadcast_to(np.zeros((), x.dtype), x.shape), state)
    nnx.replace_by_pure_dict(state, clip_vit.import_torch(nnx.to_pure_dict(shapes), state_dict))
    return state


def normalize_tokens(x: jax.Array) -> jax.Array:
    """LayerNorm without affine over the last axis (float32)."""
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.var(x, axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + TARGET_EPS)


def clip_input(objective: Objective, images: jax.Array) -> jax.Array:
    """Our normalized images `[B, H, W, 3]` -> the CLIP teacher's input (module docstring)."""
    mean = jnp.asarray(objective.data_mean, jnp.float32)
    std = jnp.asarray(objective.data_std, jnp.float32)
    x = images.astype(jnp.float32) * std + mean
    size = objective.clip_img_size
    if x.shape[1:3] != (size, size):
        x = jax.image.resize(x, (x.shape[0], size, size, x.shape[-1]), "lanczos3")
    if objective.scaling_quirk:
        x = jnp.clip((x + 1.0) / 2.0, 0.0, 1.0)
    return (x - jnp.asarray(clip_vit.CLIP_MEAN)) / jnp.asarray(clip_vit.CLIP_STD)


def teacher_targets(
    objective: Objective, teacher: nnx.Module, images: jax.Array
) -> tuple[jax.Array, ...]:
    """Targets `[B, L, target dim]` per head from the FULL image, under stop_gradient: EMA
    stage 1-3 outputs, each token normalized, then flattened per main patch; CLIP the
    normalized projected patch tokens."""
    if objective.teacher == "ema":
        stages = teacher(images)
        targets = tuple(normalize_tokens(s).reshape(*s.shape[:2], -1) for s in stages)
    else:
        targets = (normalize_tokens(teacher(clip_input(objective, images))),)
    return jax.lax.stop_gradient(targets)


def feature_loss(
    pred: jax.Array, target: jax.Array, mask: jax.Array, *, kind: str, masked_only: bool
) -> jax.Array:
    """MSE or SmoothL1 (beta 1) averaged over the target vector `[B, L, d]`, then over the
    removed patches (`mask` `[B, L]`, 1 = removed) or over all patches."""
    diff = pred.astype(jnp.float32) - target
    if kind == "mse":
        err = jnp.square(diff)
    else:
        err = jnp.where(jnp.abs(diff) < 1.0, 0.5 * jnp.square(diff), jnp.abs(diff) - 0.5)
    per_patch = jnp.mean(err, axis=-1)
    if not masked_only:
        return jnp.mean(per_patch)
    m = mask.astype(jnp.float32)
    return jnp.sum(per_patch * m) / jnp.sum(m)


def loss_terms(
    model: MFMModel,
    batch: dict[str, jax.Array],
    rngs: nnx.Rngs | None = None,
    teacher: nnx.Module | None = None,
) -> dict[str, jax.Array]:
    """Every loss term of nonzero weight (`Objective.term_weights`), unweighted."""
    objective = model.objective
    images, mask = batch["image"], batch["mask"]
    out, preds = model(images, batch["ids_keep"], rngs=rngs)
    weights = objective.term_weights()
    terms = {}
    if "loss_pixel" in weights:
        target = norm_pix.pixel_targets(images, model.patch_size, norm_pix=objective.norm_pix_loss)
        terms["loss_pixel"] = norm_pix.masked_mse(out.pred, target, mask)
    if any(name in weights for name in objective.head_names):
        targets = teacher_targets(objective, teacher, images)
        for name, pred, target in zip(objective.head_names, preds, targets, strict=True):
            if name in weights:
                terms[name] = feature_loss(
                    pred, target, mask, kind=objective.loss, masked_only=objective.masked_only
                )
    return terms


def loss_fn(
    model: MFMModel,
    batch: dict[str, jax.Array],
    rngs: nnx.Rngs | None,
    teacher: nnx.Module | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted sum of the pixel and MFM terms (module docstring); aux logs each term."""
    terms = loss_terms(model, batch, rngs, teacher)
    weights = model.objective.term_weights()
    loss = sum(weights[name] * value for name, value in terms.items())
    return loss, {**terms, "mask_fraction": jnp.mean(batch["mask"] * 1.0)}


# --- host-side masks and reconstruction ----------------------------------------------------------


def _add_masks(batch: dict, step: int, *, seed: int, num_units: int, mask_ratio: float) -> dict:
    mask, ids_keep = masking.random_keep(
        seed, step, np.asarray(batch["index"]), num_units=num_units, mask_ratio=mask_ratio
    )
    return {**batch, "mask": mask, "ids_keep": ids_keep}


def make_batch_transform(
    config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None
) -> functools.partial:
    """Host-side fn(batch, step) adding `mask` int32 `[B, L]` (1 = removed) and `ids_keep` int32
    `[B, N_keep]` (raster order): per-example masks (SPEC 3.3), pure functions of (seed, step,
    example index), so they do not depend on the `mesh`."""
    return functools.partial(
        _add_masks,
        seed=config.seed,
        num_units=(config.model.img_size // config.mask.patch_size) ** 2,
        mask_ratio=config.mask.ratio,
    )


def reconstruct(model: MFMModel, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Images for the grid (input, masked, prediction, pasted; norm_pix.reconstruction_grid)."""
    out, _ = model(batch["image"], batch["ids_keep"])
    norm = model.objective.norm_pix_loss
    return norm_pix.reconstruction_grid(
        batch["image"], out.pred, batch["mask"], model.patch_size, norm_pix=norm
    )
