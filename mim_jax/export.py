r"""Export an encoder (and a fine-tuned classifier's head) to PyTorch as `.safetensors`, with the
official / timm fine-tuning names and layouts (Swin: `patch_embed.proj.weight`,
`layers.0.blocks.0.attn.qkv.weight`, ..., `norm.weight`, `head.weight`; SimMIM's ViT:
`cls_token`, `blocks.0.attn.q_bias`, `rel_pos_bias.relative_position_bias_table` or per-block
tables, `fc_norm`; HiViT: iTPN's flat `blocks.{i}` names, `absolute_pos_embed`).

  python -m mim_jax.export --init_from=/tmp/mim --out=/tmp/simmim_swin.safetensors
  python -m mim_jax.export --init_from=gs://bucket/ft_swin_b --out=swin_b_ft.safetensors

`--init_from` takes what `config.init_from` takes (a workdir, a checkpoint step directory or
a weight file); the encoder kind (swin, vit, itpn) comes from the parameter names; a weight
file needs `--model` to be read, and every encoder weight of it must find its place. The file
loads into the official models with `load_state_dict(...)` (decoders, mask tokens of
pretraining are not exported; buffers such as `relative_position_index` are recomputed by
those models) and back into mim_jax through `config.init_from`.
"""

from __future__ import annotations

import re

import numpy as np
from absl import app, flags, logging
from etils import epath

from mim_jax import convert, init_from
from mim_jax.config_lib import ConfigError
from mim_jax.models import encoders

FLAGS = flags.FLAGS
flags.DEFINE_string("init_from", None, "Workdir, checkpoint step directory or weight file.")
flags.DEFINE_string("out", None, "Output .safetensors path (local or gs://).")
flags.DEFINE_enum("model", None, encoders.KINDS, "Encoder kind; default: from the names.")
# The pretraining parts that have no place in the exported encoder.
NOT_EXPORTED = ("encoder.mask_token",)


def infer_kind(paths: list[str]) -> str:
    """The encoder kind of a parameter set by its names (Swin stages, ViT cls token, HiViT's
    absolute position table)."""
    names = set(paths)
    if any(p.startswith("encoder.layers.") for p in names):
        return "swin"
    if "encoder.cls_token" in names:
        return "vit"
    if any(p.startswith("encoder.blocks.") for p in names):
        return "itpn"
    raise ConfigError("the source has no Swin, ViT or HiViT encoder parameters (encoder.*)")


def _unplaced(ignored: list[str], state: dict[str, np.ndarray]) -> list[str]:
    """Keys of a weight file left out of `state` although they sit under one of its top-level
    modules (buffers aside): encoder parts that the chosen kind's names cannot place, as when
    a ViT file is read as HiViT (`blocks.0.attn.q_bias`, `blocks.0.gamma_1`)."""
    roots = {key.split(".")[0] for key in state}
    return [
        key
        for key in ignored
        if key.split(".")[0] in roots and not any(re.match(b, key) for b in convert.TORCH_BUFFERS)
    ]


def export(source: str, out: str, kind: str | None = None) -> dict[str, np.ndarray]:
    """Writes the encoder (+ head) of `source` to `out`; returns the PyTorch state_dict."""
    import safetensors.numpy

    where = init_from.resolve(source)
    if where.suffix in init_from.WEIGHT_FILES:
        if kind is None:
            raise ConfigError(f"--model is needed to read the weight file {where}")
        weights = init_from.read_weights(source, kind)
    else:
        weights = init_from.read_checkpoint(where)
    try:
        found = infer_kind(list(weights.params))
    except ConfigError as e:
        read_as = f" read as --model={kind}" if kind else ""
        raise ConfigError(f"{where}{read_as}: {e}") from None
    if kind not in (None, found):
        raise ConfigError(f"--model={kind}, but {where} holds encoder weights of kind {found}")
    kind = found
    params = {k: v for k, v in weights.params.items() if k not in NOT_EXPORTED}
    state = convert.to_torch(params, encoders.TORCH_TABLES[kind])
    stray = _unplaced(weights.ignored, state) if where.suffix in init_from.WEIGHT_FILES else []
    if stray:
        raise ConfigError(f"--model={kind} has no place for {', '.join(stray[:4])} of {where}")
    data = safetensors.numpy.save(state, metadata={"format": "pt", "mim_jax_encoder": kind})
    epath.Path(out).parent.mkdir(parents=True, exist_ok=True)
    epath.Path(out).write_bytes(data)
    logging.info("exported %d tensors of a %s encoder from %s to %s", len(state), kind, source, out)
    return state


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        export(FLAGS.init_from, FLAGS.out, FLAGS.model)
    except ConfigError as e:
        raise SystemExit(f"mim_jax.export: error: {e}") from None


if __name__ == "__main__":
    flags.mark_flags_as_required(["init_from", "out"])
    app.run(main)
