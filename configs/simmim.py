r"""SimMIM pretraining (Xie et al., 2022): mask 32x32 patches, regress raw pixels with L1.

Variants (`--config=configs/simmim.py:<variant>`; no variant = swin_base_192):
  swin_base_192        Swin-B, 192 px, window 6, 100 epochs, cosine (paper recipe).
  swin_base_192_800ep  Swin-B, 800 epochs, multistep x0.1 at epoch 700.
  swin_large_192_800ep Swin-L, window 12, 800 epochs.
  vit_base_224         ViT-B/16, 224 px, 800 epochs, shared relative position bias.
  quickstart           Small 3-stage Swin on the bundled photos; ~5 minutes on a CPU.
Key/value overrides can follow the variant (`:quickstart,total_steps=20`) or be given as flags.

Launch:
  python -m mim_jax.main --config=configs/simmim.py:quickstart --workdir=/tmp/mim
  python -m mim_jax.main --config=configs/simmim.py --workdir=gs://bucket/simmim_swin_b \
      --config.data.tfds_data_dir=gs://bucket/tfds
  python -m mim_jax.main --config=configs/simmim.py:vit_base_224 --workdir=/tmp/vit \
      --config.batch_size=1024 --config.mesh.fsdp=8
"""

import ml_collections

from mim_jax import config_lib

VARIANTS = (
    "swin_base_192",
    "swin_base_192_800ep",
    "swin_large_192_800ep",
    "vit_base_224",
    "quickstart",
)


def _multistep_800ep(c: ml_collections.ConfigDict) -> None:
    c.num_epochs = 800
    c.optim.base_lr = 1e-4
    c.optim.warmup_lr = 5e-7
    c.optim.min_lr = 5e-6
    c.optim.schedule = "multistep"
    c.optim.decay_epochs = (700,)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the SimMIM config for `arg` = 'variant[,key=value,...]'."""
    variant, pairs = config_lib.parse_arg(arg, VARIANTS)
    variant = variant or "swin_base_192"
    c = config_lib.base_config()
    c.method = "simmim"
    c.model = config_lib.swin_model(128, (4, 8, 16, 32), 6, img_size=192, norm_eps=1e-5)
    c.mask = ml_collections.ConfigDict(dict(patch_size=32, ratio=0.6))

    if variant == "swin_base_192_800ep":
        _multistep_800ep(c)
    elif variant == "swin_large_192_800ep":
        c.model = config_lib.swin_model(192, (6, 12, 24, 48), 12, img_size=192, norm_eps=1e-5)
        _multistep_800ep(c)
    elif variant == "vit_base_224":
        c.model = config_lib.vit_base_model(finetune=False)
        _multistep_800ep(c)
    elif variant == "quickstart":
        c.model.img_size = 96
        c.model.patch_size = 8
        c.model.embed_dim = 64
        c.model.depths = (2, 2, 2)
        c.model.num_heads = (2, 4, 8)
        c.model.window_size = 6
        config_lib.quickstart_run(c, lr=8e-4)
        c.optim.warmup_lr = 1e-6
        c.optim.min_lr = 1e-5
    config_lib.apply_pairs(c, pairs)
    return c
