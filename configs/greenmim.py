r"""GreenMIM pretraining (Huang et al., 2022): Swin on visible tokens only, MAE decoder, norm-pix.

Variants (`--config=configs/greenmim.py:<variant>`; no variant = swin_base_224):
  swin_base_224        Swin-B, 224 px, window 7, 800 epochs, blr 1e-4 (the released slurm script).
  swin_base_224_win14  Swin-B, window 14, blr 1.5e-4.
  swin_large_224_win14 Swin-L, window 14, blr 1e-4.
  quickstart           Small 3-stage Swin on the bundled photos; a few minutes on a CPU.
Key/value overrides can follow the variant (`:quickstart,total_steps=20`) or be given as flags.

Recipe (SPEC 2.5, 2.8): mask ratio 0.75 on 32x32 units (= the final-stage patch), one mask
per mask group (`mask.groups`, 0 = one per data-parallel shard, as the official code draws
one per GPU), RandomResizedCrop(scale 0.2-1, bicubic) + flip, AdamW betas (0.9, 0.95), wd
0.05 (none on 1-D params, biases, position bias tables, tokens), lr = blr * batch / 256,
40 warmup epochs then a half-cycle cosine to 0 per step, no gradient clipping.
Group plans (SPEC 0): `mask.group_size` and `mask.num_groups` hold one value per stage
(e.g. `--config.mask.num_groups='(21, 5, 0, 0)'`); 0 = window**2 and ceil(2 * visible /
group_size), the bound that never needs a redraw. That bound is loose (window 7: 32 and 8
groups, while 5000 masks used 16.8 and 4.1 on average, at most 21 and 6), and every static
slot costs attention FLOPs and memory, so the Swin-B/L variants set the counts that 1 - 2 in
1000 masks overflow (window 7: 20 and 5; window 14: 5). Overflowing masks are redrawn
deterministically and counted (`mask_redraws`; tests/test_greenmim.py checks the rates).
Loss: MSE on the removed units against per-patch normalized pixels, `norm_pix_loss=True`
(default: the paper's runs and released scripts pass `--norm_pix_loss`); `norm_pix_loss=false`
(the official `main_pretrain.py` default) regresses the plain normalized pixels instead
(`--config.norm_pix_loss=false` or `:quickstart,norm_pix_loss=false`).

Launch:
  python -m mim_jax.main --config=configs/greenmim.py:quickstart --workdir=/tmp/green
  python -m mim_jax.main --config=configs/greenmim.py --workdir=gs://bucket/greenmim_swin_b \
      --config.data.tfds_data_dir=gs://bucket/tfds
"""

import ml_collections

from mim_jax import config_lib

VARIANTS = ("swin_base_224", "swin_base_224_win14", "swin_large_224_win14", "quickstart")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the GreenMIM config for `arg` = 'variant[,key=value,...]'."""
    variant, pairs = config_lib.parse_arg(arg, VARIANTS)
    variant = variant or "swin_base_224"
    c = config_lib.base_config()
    c.method = "greenmim"
    c.norm_pix_loss = True
    c.model = config_lib.swin_model(128, (4, 8, 16, 32), 7, img_size=224, norm_eps=1e-6)
    c.mask = ml_collections.ConfigDict(
        dict(patch_size=32, ratio=0.75, groups=0, group_size=(0, 0, 0, 0), num_groups=(0, 0, 0, 0))
    )
    c.decoder = ml_collections.ConfigDict(
        dict(embed_dim=512, depth=1, num_heads=16, mlp_ratio=4.0, norm_eps=1e-6)
    )
    c.batch_size = 2048
    c.num_epochs = 800
    config_lib.mae_recipe(c, base_lr=1e-4)
    c.optim.no_decay_keywords = ("position_bias", "token")
    c.mask.num_groups = (20, 5, 0, 0)

    if variant == "swin_base_224_win14":
        c.model.window_size = 14
        c.mask.num_groups = (5, 0, 0, 0)
        c.optim.base_lr = 1.5e-4
    elif variant == "swin_large_224_win14":
        c.model = config_lib.swin_model(192, (6, 12, 24, 48), 14, img_size=224, norm_eps=1e-6)
        c.mask.num_groups = (5, 0, 0, 0)
    elif variant == "quickstart":
        c.model.update(
            img_size=96, embed_dim=64, depths=(2, 2, 2), num_heads=(2, 4, 8), window_size=6
        )
        c.mask.update(patch_size=16, group_size=(0, 0, 0), num_groups=(0, 0, 0))
        c.decoder.update(embed_dim=128, num_heads=4)
        config_lib.quickstart_run(c, lr=1e-3)
    config_lib.apply_pairs(c, pairs)
    return c
