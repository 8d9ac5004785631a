r"""Fine-tuning a pretrained encoder for image classification (SPEC 1.8, 2.9, 3.3).

Variants (`--config=configs/finetune.py:<variant>`; no variant = simmim_swin_base_224):
  simmim_swin_base_192        Swin-B 192 px, window 6 (SimMIM 100-epoch pretraining), ld 0.9.
  simmim_swin_base_224        Swin-B 224 px, window 7 (tables resized 6 -> 7), ld 0.9.
  simmim_swin_base_224_800ep  the same after the 800-epoch pretraining, ld 0.8.
  simmim_swin_large_224       Swin-L 224 px, window 14 (12 -> 14), ld 0.7, drop path 0.2.
  simmim_vit_base_224         ViT-B/16, per-block relative position bias from the shared one,
                              mean pooling + fc_norm, ld 0.65.
  greenmim_swin_base_224      Swin-B 224 px, window 7, ld 0.9 (GreenMIM's ft config).
  greenmim_swin_large_224     Swin-L 224 px, window 14, lr 1e-3, ld 0.8, drop path 0.3.
  itpn_base                   iTPN-B (HiViT 3-3-24, rpe), MAE recipe: blr 4e-4, 100 epochs,
                              ld 0.6, drop path 0.15, batch 1024.
  itpn_large                  iTPN-L (2-2-40), 50 epochs, blr 1e-3, ld 0.55, drop path 0.2.
  quickstart                  the encoder of configs/simmim.py:quickstart on the bundled photos
                              (train and validation from disjoint regions); a few CPU minutes.
Key/value overrides can follow the variant (`:quickstart,total_steps=20`) or be given as flags.

Recipe (SimMIM's, all Swin/ViT variants): RandomResizedCrop(0.08-1, bicubic) + flip +
RandAugment rand-m9-mstd0.5-inc1 + random erasing 0.25 on the host; Mixup 0.8 / CutMix 1.0,
switch 0.5, label smoothing 0.1, soft-target cross-entropy in the step; AdamW (0.9, 0.999),
wd 0.05 (none on 1-D parameters, biases, tokens, position tables; ViT decays its per-block bias
tables, as the official code does), clip 5, 100 epochs, 20 warmup epochs, cosine, lr scaled by
batch / 512 at batch 2048, layer-wise lr decay. Evaluation: resize to size / 0.875, centre crop.
`config.init_from` names the pretraining run (workdir, checkpoint step or weight file); the log
says what was loaded, resized, dropped and newly initialized.

Launch:
  python -m mim_jax.main --config=configs/finetune.py:quickstart --config.init_from=/tmp/mim \
      --workdir=/tmp/ft
  python -m mim_jax.main --config=configs/finetune.py:simmim_swin_base_224 \
      --config.init_from=gs://bucket/simmim_swin_b --workdir=gs://bucket/ft_swin_b \
      --config.data.tfds_data_dir=gs://bucket/tfds
"""

import ml_collections

from mim_jax import config_lib

VARIANTS = (
    "simmim_swin_base_192",
    "simmim_swin_base_224",
    "simmim_swin_base_224_800ep",
    "simmim_swin_large_224",
    "simmim_vit_base_224",
    "greenmim_swin_base_224",
    "greenmim_swin_large_224",
    "itpn_base",
    "itpn_large",
    "quickstart",
)
# (embed_dim, heads, window, img_size, layer decay, drop path) of the Swin variants.
SWIN = {
    "simmim_swin_base_192": (128, (4, 8, 16, 32), 6, 192, 0.9, 0.1),
    "simmim_swin_base_224": (128, (4, 8, 16, 32), 7, 224, 0.9, 0.1),
    "simmim_swin_base_224_800ep": (128, (4, 8, 16, 32), 7, 224, 0.8, 0.1),
    "simmim_swin_large_224": (192, (6, 12, 24, 48), 14, 224, 0.7, 0.2),
    "greenmim_swin_base_224": (128, (4, 8, 16, 32), 7, 224, 0.9, 0.1),
    "greenmim_swin_large_224": (192, (6, 12, 24, 48), 14, 224, 0.8, 0.3),
}
# (embed_dim, mlp_depth, depth, heads, epochs, blr, layer decay, drop path) of iTPN (FINETUNE.md).
ITPN = {
    "itpn_base": (512, 3, 24, 8, 100, 4e-4, 0.6, 0.15),
    "itpn_large": (768, 2, 40, 12, 50, 1e-3, 0.55, 0.2),
}


def _itpn(c: ml_collections.ConfigDict, variant: str) -> None:
    """iTPN's MAE-code fine-tuning (FINETUNE.md, main_finetune.py): lr = blr * batch / 256,
    5 warmup epochs, half-cycle cosine to 5e-6, no clipping, HiViT with rpe and a trainable
    absolute position table."""
    dim, mlp_depth, depth, heads, epochs, blr, decay, drop = ITPN[variant]
    c.model = ml_collections.ConfigDict(
        dict(name="itpn", img_size=224, patch_size=16, in_chans=3, embed_dim=dim)
    )
    c.model.update(mlp_depth=mlp_depth, depth=depth, num_heads=heads, bridge_mlp_ratio=3.0)
    c.model.update(mlp_ratio=4.0, qkv_bias=True, drop_path_rate=drop, norm_eps=1e-6)
    c.model.update(ape=True, rpe=True, ape_init="trunc_normal")
    c.batch_size = 1024
    c.num_epochs = epochs
    c.optim.update(schedule="half_cosine", base_lr=blr, lr_batch_base=256, min_lr=5e-6)
    c.optim.update(warmup_epochs=5.0, grad_clip=0.0, layer_decay=decay)
    c.optim.no_decay_keywords = ("absolute_pos_embed", "relative_position_bias_table")


def _quickstart(c: ml_collections.ConfigDict) -> None:
    """configs/simmim.py:quickstart's encoder on the bundled photos (data/sources.py)."""
    c.model = config_lib.swin_model(64, (2, 4, 8), 6, img_size=96, norm_eps=1e-5)
    c.model.update(patch_size=8, depths=(2, 2, 2), drop_path_rate=0.1)
    config_lib.quickstart_run(c, lr=1e-3)
    c.total_steps = 300
    c.optim.warmup_epochs = 1.0
    c.optim.layer_decay = 0.9
    c.eval.every_steps = 100
    c.eval.batch_size = 64
    c.checkpoint_every_steps = 100


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the fine-tuning config for `arg` = 'variant[,key=value,...]'."""
    variant, pairs = config_lib.parse_arg(arg, VARIANTS)
    variant = variant or "simmim_swin_base_224"
    c = config_lib.base_config()
    c.method = "classification"
    config_lib.finetune_recipe(c)
    c.optim.no_decay_keywords = ("absolute_pos_embed", "relative_position_bias_table")
    if variant in SWIN:
        dim, heads, window, size, decay, drop = SWIN[variant]
        c.model = config_lib.swin_model(dim, heads, window, img_size=size, norm_eps=1e-5)
        c.model.drop_path_rate = drop
        c.optim.layer_decay = decay
    elif variant == "simmim_vit_base_224":
        c.model = config_lib.vit_base_model(finetune=True)
        c.optim.layer_decay = 0.65
        c.optim.no_decay_keywords = ("pos_embed", "cls_token")
    elif variant in ITPN:
        _itpn(c, variant)
    else:
        _quickstart(c)
    if variant == "greenmim_swin_large_224":
        c.optim.update(base_lr=1e-3, warmup_lr=2e-7, min_lr=3.5e-7)
    config_lib.apply_pairs(c, pairs)
    return c
