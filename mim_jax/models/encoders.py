"""Encoders built from `config.model` and their pooled features: one place that knows which
model class a config names, shared by the pretraining methods, fine-tuning and evaluation.

`config.model.name`: `swin` (Swin V1, dense windows), `vit` (SimMIM's BEiT-style ViT) or
`itpn` (the HiViT backbone of iTPN). Keys of `config.model` that belong to a pretraining
model around the encoder (the iTPN pyramid's `fpn_dim`, `fpn_depth`) are not passed on. Paths
of encoder weights outside a model are dotted and start with `encoder.` (the classifier's and
every pretraining model's layout).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from mim_jax import convert
from mim_jax.models import hivit, swin, vit

KINDS = ("swin", "vit", "itpn")
# Per kind: the classifier's parameter paths <-> the official fine-tuning model's PyTorch names
# (convert.from_torch / to_torch), and the key surgery that fits pretrained encoder weights to
# another window, grid or layout (init_from).
TORCH_TABLES = {
    "swin": convert.classifier_table(convert.SWIN_TABLE),
    "vit": convert.classifier_table(convert.VIT_TABLE),
    "itpn": convert.TABLES["hivit"],
}
REMAP = {
    "swin": swin.remap_pretrained,
    "vit": vit.remap_pretrained,
    "itpn": hivit.remap_pretrained,
}
# config.model keys that configure the iTPN model around the HiViT encoder, not the encoder.
_NOT_ENCODER_KEYS = ("name", "fpn_dim", "fpn_depth")


def encoder_kwargs(model_config: ml_collections.ConfigDict) -> dict:
    """The encoder constructor's keyword arguments from `config.model` (tuples for lists)."""
    kwargs = {k: v for k, v in model_config.to_dict().items() if k not in _NOT_ENCODER_KEYS}
    for key in ("depths", "num_heads"):
        if isinstance(kwargs.get(key), list | tuple):
            kwargs[key] = tuple(kwargs[key])
    return kwargs


def build_encoder(
    model_config: ml_collections.ConfigDict,
    *,
    rngs: nnx.Rngs,
    dtype: jnp.dtype = jnp.float32,
    use_mask_token: bool = False,
    drop_path_rate: float | None = None,
    remat: str = "none",
) -> nnx.Module:
    """The encoder named by `model_config.name`; `use_mask_token` adds SimMIM's mask token
    (Swin and ViT), `drop_path_rate` overrides the config's, `remat` rematerializes every block
    (models/remat.py)."""
    kind = model_config.name
    if kind not in KINDS:
        raise ValueError(f"config.model.name='{kind}' must be one of {', '.join(KINDS)}")
    kwargs = encoder_kwargs(model_config)
    if drop_path_rate is not None:
        kwargs["drop_path_rate"] = drop_path_rate
    if kind == "itpn":
        return hivit.HiViT(**kwargs, dtype=dtype, remat=remat, rngs=rngs)
    cls = swin.SwinTransformer if kind == "swin" else vit.VisionTransformer
    return cls(**kwargs, use_mask_token=use_mask_token, dtype=dtype, remat=remat, rngs=rngs)


def pooled_features(
    encoder: nnx.Module, images: jax.Array, *, rngs: nnx.Rngs | None = None
) -> jax.Array:
    """images `[batch, H, W, 3]` -> the encoder's average-pooled features `[batch, C]`.

    Swin: mean of the final-normed stage-4 tokens (the official classifier's avgpool). ViT:
    mean of the patch tokens (cls token excluded) after the final norm, or before any norm
    for a mean-pooling model, whose classifier applies `fc_norm` next. HiViT: mean of the
    stage-3 tokens (the official classifier then applies `fc_norm`).
    """
    if isinstance(encoder, hivit.HiViT):
        return jnp.mean(encoder(images, rngs=rngs)[2], axis=1)
    return jnp.mean(encoder(images, rngs=rngs), axis=(1, 2))
