r"""Evaluation jobs: restore a checkpoint, extract features on the mesh, write eval_results.json.

Variants (`--config=configs/evaluate.py:<variant>`; no variant = knn):
  knn           weighted kNN (DINO: cosine, k 20, temperature 0.07) on the pooled features of a
                pretrained encoder: bank = `data.split`, queries = `data.val_split`.
  linear_probe  a linear classifier (SGD momentum 0.9, cosine lr with warmup, standardized
                features) trained on the frozen features of `data.split`; top-1 on `val_split`.
  top1          a fine-tuned classifier (configs/finetune.py) on `data.val_split`: top-1 / top-5.
Every variant defaults to the encoder of configs/simmim.py:quickstart on the bundled photos,
so `pretrain quickstart -> evaluate` runs with no other flags. For other runs set the encoder
to the checkpoint's: `--config.model.*` overrides, or `model=` one of the pretraining configs'
encoders with the `encoder` argument, e.g. `:knn,encoder=simmim_swin_base_192` (the pretraining
variant names of configs/simmim.py, greenmim.py and itpn.py; for top1 the fine-tuning variant
names of configs/finetune.py), and point `data` at the labeled set (e.g.
`--config.data.source=tfds --config.data.name=imagenet2012`).

Launch:
  python -m mim_jax.main --config=configs/evaluate.py:knn --config.init_from=/tmp/mim \
      --workdir=/tmp/knn
  python -m mim_jax.main --config=configs/evaluate.py:linear_probe --config.init_from=/tmp/mim \
      --workdir=/tmp/lp
  python -m mim_jax.main --config=configs/evaluate.py:top1 --config.init_from=/tmp/ft \
      --workdir=/tmp/top1
"""

import importlib.util
import pathlib

import ml_collections

from mim_jax import config_lib

VARIANTS = ("knn", "linear_probe", "top1")
# Pretraining configs whose encoders `encoder=<variant>` can name (knn / linear_probe).
PRETRAIN_CONFIGS = ("simmim", "greenmim", "itpn")


def _config_module(name: str):
    path = pathlib.Path(__file__).parent / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"mim_jax_config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _encoder_config(variant: str, encoder: str) -> ml_collections.ConfigDict:
    """config.model (and the data normalization) of the run that `encoder` names."""
    names = ("finetune",) if variant == "top1" else PRETRAIN_CONFIGS
    for name in names:
        module = _config_module(name)
        if encoder in module.VARIANTS:
            return module.get_config(encoder)
    raise config_lib.ConfigError(
        f"encoder='{encoder}' is not a variant of configs/{'|'.join(names)}.py"
    )


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the evaluation config for `arg` = 'variant[,encoder=NAME][,key=value,...]'."""
    variant, pairs = config_lib.parse_arg(arg, VARIANTS)
    variant = variant or "knn"
    encoder = pairs.pop("encoder", "quickstart")
    source = _encoder_config(variant, encoder)
    c = config_lib.base_config()
    c.mode = "evaluate"
    c.method = source.method
    c.model = source.model
    c.data.mean, c.data.std = source.data.mean, source.data.std
    c.num_classes = 0  # 0: the class count of the labeled training split.
    c.eval.kind = variant
    c.eval.linear_probe = ml_collections.ConfigDict(
        dict(epochs=90, batch_size=256, lr=0.1, weight_decay=0.0, warmup_epochs=10, momentum=0.9)
    )
    c.eval.linear_probe.seed = 0
    if encoder == "quickstart":
        c.data.source = "bundled"
        c.data.num_examples = 4096 // 4  # Bank: 1024 fixed training crops of the photos.
        c.data.num_workers = 0
        c.eval.batch_size = 64
        c.eval.linear_probe.update(epochs=30, batch_size=128, warmup_epochs=3)
    config_lib.apply_pairs(c, pairs)
    return c
