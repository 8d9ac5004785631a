"""Fine-tuning (methods/classification.py): the classifiers per encoder, the loss against its
formula, the host augmentation of the fine-tuning pipeline against an independent recompute,
sharded steps against one device, one compilation with Mixup, and the best checkpoint."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import load_config

from mim_jax import checkpoint, pytree, sharding, train
from mim_jax.data import augment, sources
from mim_jax.data import input as data_input
from mim_jax.methods import classification, mixup


def tiny_finetune_config(**overrides):
    """configs/finetune.py:quickstart on a 2-stage Swin at 32 px, batch 16, 4 steps."""
    c = load_config("finetune", "quickstart")
    c.model.update(
        img_size=32, patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4
    )
    c.update(batch_size=16, total_steps=4, num_classes=len(sources.BUNDLED_PHOTOS))
    c.data.update(num_workers=0, prefetch=0, num_examples=64)
    c.update(async_checkpointing=False, log_every_steps=1, checkpoint_every_steps=1000)
    c.eval.update(every_steps=2, batch_size=16, max_val_examples=20)
    c.update_from_flattened_dict(overrides)
    return c


@pytest.mark.parametrize(
    "variant, fc_norm, std",
    [("simmim_swin_base_224", False, 0.02), ("simmim_vit_base_224", True, 2e-5)],
)
def test_classifier_heads_follow_the_official_init(variant, fc_norm, std):
    """Swin: no fc_norm, head trunc_normal(0.02); SimMIM's ViT: fc_norm, head 0.02 * 0.001."""
    c = load_config("finetune", variant)
    c.model.update(embed_dim=64, img_size=64, num_heads=(2, 4, 8, 16) if "swin" in variant else 4)
    if "swin" in variant:
        c.model.update(window_size=2, depths=(1, 1, 1, 1))
    else:
        c.model.update(depth=1)
    model = classification.build_classifier(c, 500, nnx.Rngs(0))
    assert (model.fc_norm is not None) == fc_norm
    kernel = np.asarray(model.head.kernel[...])
    assert kernel.shape[1] == 500
    assert np.std(kernel) == pytest.approx(std * 0.88, rel=0.1)  # truncated at 2 std
    assert not np.asarray(model.head.bias[...]).any()


def test_loss_without_mixup_is_label_smoothed_cross_entropy():
    c = tiny_finetune_config(**{"mixup.prob": 0.0})
    model = classification.build_model(c, nnx.Rngs(0))
    rng = np.random.default_rng(0)
    images = rng.normal(size=(4, 32, 32, 3)).astype(np.float32)
    labels = np.array([0, 3, 6, 3], np.int32)
    loss, aux = classification.loss_fn(model, {"image": images, "label": labels}, None)
    logits = np.asarray(model(images), np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    k, eps = logits.shape[1], 0.1
    targets = np.full((4, k), eps / k)
    targets[np.arange(4), labels] += 1 - eps
    np.testing.assert_allclose(loss, -(targets * logp).sum(-1).mean(), rtol=1e-5)
    assert float(aux["mix_lambda"]) == 1.0


def test_finetune_batches_equal_independent_recompute():
    """Crop + flip + RandAugment (colour jitter skipped, as in timm), normalize, random
    erasing: each example from its own seeded generators."""
    c = tiny_finetune_config(**{"data.reprob": 1.0})
    batch = next(iter(data_input.make_pretrain_iterator(c)))
    source = sources.make_source(c.data, "train")
    erased = 0
    for position, image, label in zip(batch["index"], batch["image"], batch["label"], strict=True):
        record = data_input.epoch_permutation(c.seed, 0, len(source))[position]
        photo, want_label = source.read(int(record))
        assert label == want_label
        pixels = augment.finetune_augment(
            photo,
            size=32,
            scale=(0.08, 1.0),
            ratio=tuple(c.data.crop_ratio),
            interpolation="bicubic",
            hflip=True,
            color_jitter=0.4,
            auto_augment="rand-m9-mstd0.5-inc1",
            mean=tuple(c.data.mean),
            rng=np.random.default_rng([c.seed, data_input.AUGMENT_STREAM, int(position)]),
        )
        want = augment.normalize(pixels, c.data.mean, c.data.std)
        want = augment.random_erase(
            want,
            prob=1.0,
            rng=np.random.default_rng([c.seed, data_input.ERASE_STREAM, int(position)]),
        )
        np.testing.assert_allclose(image, want, atol=1e-5)
        erased += not np.allclose(want, augment.normalize(pixels, c.data.mean, c.data.std))
    assert erased == len(batch["index"])


def _steps(config, mesh, n: int):
    s = train.setup(config, mesh, num_examples=64)
    batches = data_input.make_pretrain_iterator(config)
    state, losses = s.init_state(), []
    with jax.set_mesh(mesh):
        for _ in range(n):
            host = {k: v for k, v in next(batches).items() if k not in train.HOST_ONLY_KEYS}
            state, metrics = s.train_step(state, sharding.global_batch(host, mesh))
            losses.append(float(metrics["loss"]))
    batches.close()
    return s, state, losses


def test_sharded_finetune_steps_equal_one_device_and_compile_once():
    """Mixup/CutMix and drop path draw from the step key: 8 devices (data x fsdp x tensor)
    give the single device's losses and parameters; the step compiles once."""
    c = tiny_finetune_config()
    one = sharding.make_mesh(c.mesh, jax.devices()[:1])
    _, ref_state, ref = _steps(c, one, 3)
    c.mesh.update(data=2, fsdp=2, tensor=2)
    s, state, losses = _steps(c, sharding.make_mesh(c.mesh), 3)
    np.testing.assert_allclose(losses, ref, rtol=1e-5)
    assert len(set(losses)) == 3
    assert s.train_step._cache_size() == 1
    ours = pytree.flatten(jax.device_get(nnx.to_pure_dict(state.params)))
    for path, value in pytree.flatten(jax.device_get(nnx.to_pure_dict(ref_state.params))).items():
        np.testing.assert_allclose(ours[path], value, atol=2e-5, err_msg=path)


def test_mixup_is_live_in_the_step():
    c = tiny_finetune_config()
    model = classification.build_model(c, nnx.Rngs(0))
    assert model.mixup == mixup.MixupSettings(0.8, 1.0, 1.0, 0.5, 0.1, 7)
    images = jnp.asarray(np.random.default_rng(1).normal(size=(4, 32, 32, 3)), jnp.float32)
    batch = {"image": images, "label": jnp.array([0, 1, 2, 3])}
    lams = {
        float(classification.loss_fn(model, batch, nnx.Rngs(dropout=k, augment=k))[1]["mix_lambda"])
        for k in range(4)
    }
    assert len(lams) > 1 and all(0 <= lam <= 1 for lam in lams)


def test_training_keeps_the_best_checkpoint(tmp_path, monkeypatch):
    """Top-1 at steps 2 and 4 (faked 50 then 40): the best directory keeps step 2 and the
    final eval_results.json reports both."""
    c = tiny_finetune_config()
    scores = iter([50.0, 40.0])
    monkeypatch.setattr(
        "mim_jax.evaluate.topk_metrics", lambda *_: {"top1": next(scores), "top5": 90.0}
    )
    train.train(c, str(tmp_path))
    best = checkpoint.Checkpointer(
        os.path.join(tmp_path, "checkpoints_best"), max_to_keep=1, best_metric="top1"
    )
    assert best.manager.all_steps() == [2] and best.best_value() == 50.0
    best.close()
    results = json.loads((tmp_path / "eval_results.json").read_text())
    assert results == {"top1": 40.0, "top5": 90.0, "best_top1": 50.0}
