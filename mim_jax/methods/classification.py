"""Supervised fine-tuning of a pretrained encoder (SPEC 1.8, 2.9, 3.3): a method behind the same
interface as the pretraining methods, so the one train loop gives it sharding, checkpoints,
exact resume, logging and the compile-once guarantee.

Model: `heads.Classifier` over the encoder of `config.model` (no mask token) with
`config.model.drop_path_rate`; per encoder as the official classifiers: Swin averages its
final-normed tokens into `head` (trunc_normal 0.02); the ViT is SimMIM's mean-pooling model
(`fc_norm`, head trunc_normal 0.02 scaled by 0.001); HiViT (iTPN) averages its stage-3 tokens
into `fc_norm` and a head drawn with std 2e-5 (iTPN's main_finetune). The encoder weights come
from `config.init_from` (mim_jax.init_from).

Loss: Mixup/CutMix (timm 'batch' mode) with label smoothing inside the jitted step, then the
soft-target cross-entropy; with mixup off, the smoothed one-hot targets. Batches carry the
host-augmented 'image' and 'label' (mim_jax.data.input, `mode='finetune'`). Evaluation
(top-1/top-5 on the validation split) runs through mim_jax.evaluate.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mim_jax.methods import mixup
from mim_jax.models import encoders, heads

# Per encoder kind: (fc_norm after pooling, head init std, head init scale).
HEAD_INIT = {"swin": (False, 0.02, 1.0), "vit": (True, 0.02, 0.001), "itpn": (True, 2e-5, 1.0)}


class FineTuneClassifier(heads.Classifier):
    """A `Classifier` carrying its static Mixup settings (loss_fn sees only the model)."""

    def __init__(self, *args, mixup_settings: mixup.MixupSettings, **kwargs):
        super().__init__(*args, **kwargs)
        self.mixup = mixup_settings


def build_classifier(
    config: ml_collections.ConfigDict,
    num_classes: int,
    rngs: nnx.Rngs,
    cls: type[heads.Classifier] = heads.Classifier,
    remat: str = "none",
    **kwargs,
) -> heads.Classifier:
    """`cls` (a Classifier) over the encoder of `config.model` with `num_classes` outputs
    (module docstring), its blocks rematerialized per `remat`; `kwargs` go to `cls`."""
    m = config.model
    dtype = jnp.dtype(config.dtype)
    encoder = encoders.build_encoder(m, rngs=rngs, dtype=dtype, remat=remat)
    fc_norm, std, scale = HEAD_INIT[m.name]
    if m.name == "vit":
        fc_norm = bool(m.get("use_mean_pooling", False))
    return cls(
        encoder,
        num_classes,
        rngs=rngs,
        fc_norm=fc_norm,
        norm_eps=m.norm_eps,
        head_init_std=std,
        head_init_scale=scale,
        dtype=dtype,
        **kwargs,
    )


def mixup_settings(config: ml_collections.ConfigDict, num_classes: int) -> mixup.MixupSettings:
    """`config.mixup` with the class count."""
    x = config.mixup
    return mixup.MixupSettings(
        mixup_alpha=float(x.mixup_alpha),
        cutmix_alpha=float(x.cutmix_alpha),
        prob=float(x.prob),
        switch_prob=float(x.switch_prob),
        label_smoothing=float(x.label_smoothing),
        num_classes=num_classes,
    )


def build_model(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> FineTuneClassifier:
    """The fine-tuning classifier; `config.num_classes` must be resolved (> 0) by now."""
    if config.num_classes <= 0:
        raise ValueError("config.num_classes must be set from the data before building the model")
    settings = mixup_settings(config, config.num_classes)
    return build_classifier(
        config,
        config.num_classes,
        rngs,
        FineTuneClassifier,
        remat=config.get("remat", "none"),
        mixup_settings=settings,
    )


def _identity(batch: dict[str, np.ndarray], step: int) -> dict[str, np.ndarray]:
    del step
    return batch


def make_batch_transform(
    config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None
) -> functools.partial:
    """No host-side additions: the batch already holds the augmented images and the labels."""
    del config, mesh
    return functools.partial(_identity)


def loss_fn(
    model: FineTuneClassifier, batch: dict[str, jax.Array], rngs: nnx.Rngs | None
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Soft-target cross-entropy after Mixup/CutMix (module docstring); aux: `mix_lambda`,
    `train_top1` (of the mixed images against the dominant label)."""
    settings = model.mixup
    images, labels = batch["image"], batch["label"]
    if settings.active and rngs is not None:
        images, targets, lam = mixup.mix_batch(rngs.augment(), images, labels, settings)
    else:
        targets = mixup.smooth_one_hot(labels, settings.num_classes, settings.label_smoothing)
        lam = jnp.float32(1.0)
    logits = model(images, rngs=rngs)
    loss = mixup.soft_target_cross_entropy(logits, targets)
    top1 = jnp.mean((jnp.argmax(logits, axis=-1) == jnp.argmax(targets, axis=-1)) * 1.0)
    return loss, {"mix_lambda": lam, "train_top1": top1}
