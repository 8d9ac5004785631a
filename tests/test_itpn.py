"""iTPN method: EMA teacher rule and schedule, no gradient into the teacher, the teacher sees the
full image, loss terms and weights, training in the loop (resume, one compilation, sharding),
the CLIP teacher against a numpy CLIP forward, and config checks."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import load_config
from scipy import special
from test_train import _interrupt_after, _InterruptedError

from mim_jax import checkpoint, config_checks, config_lib, pytree, sharding, train
from mim_jax.data import input as data_input
from mim_jax.methods import itpn as method
from mim_jax.methods import norm_pix
from mim_jax.models import clip_vit, hivit

RUN_STEPS = 4
TINY_CLIP = dict(
    img_size=32, patch_size=16, width=16, depth=1, heads=2, output_dim=8, scaling_quirk=True
)


def tiny_config(**overrides):
    """HiViT on 32 px crops: 2x2 main patches, 2 kept; widths 4/8/16, one block per stage; a
    2 x 4 (data x fsdp) mesh."""
    c = load_config("itpn", "quickstart")
    c.model.update(img_size=32, embed_dim=16, mlp_depth=1, depth=1, num_heads=2, fpn_dim=16)
    c.decoder.update(embed_dim=16, depth=1, num_heads=2)
    c.mfm.weights = (0.5, 2.0, 1.5)
    c.model.drop_path_rate = 0.1
    c.mask.ratio = 0.5
    c.mesh.update(data=2, fsdp=4)
    c.batch_size = 16
    c.total_steps = 4
    c.data.update(num_workers=0, prefetch=0, num_examples=64)
    c.async_checkpointing = False
    c.update(log_every_steps=1, image_every_steps=1000, checkpoint_every_steps=1000, num_images=2)
    c.update_from_flattened_dict(overrides)
    return c


def _clip_config(**overrides):
    c = tiny_config(**overrides)
    c.mfm.update(teacher="clip", loss="smooth_l1", masked_only=False, pixel_weight=0.0)
    c.mfm.clip.update(TINY_CLIP)
    return c


def _models(config, seed: int = 0):
    model = method.build_model(config, nnx.Rngs(params=seed))
    teacher = method.build_teacher(config, nnx.Rngs(params=seed + 1))
    return model, teacher


def _batch(config, seed: int = 0) -> dict:
    b, img = 4, config.model.img_size
    images = np.random.default_rng(seed).normal(size=(b, img, img, 3)).astype(np.float32)
    batch = method.make_batch_transform(config)({"image": images, "index": np.arange(b)}, 0)
    return {k: jnp.asarray(v) for k, v in batch.items() if k != "index"}


def _flat(tree) -> dict[str, np.ndarray]:
    return pytree.flatten(jax.device_get(nnx.to_pure_dict(tree)))


@nnx.jit
def _loss(model, batch, teacher):
    return method.loss_fn(model, batch, None, teacher=teacher)


# --- EMA teacher ---------------------------------------------------------------------------------


def test_momentum_schedule():
    c = tiny_config(**{"mfm.momentum": 0.996})
    values = [float(method.teacher_momentum(c, t, 100)) for t in (0, 50, 100, 200)]
    np.testing.assert_allclose(values, [0.996, 0.998, 1.0, 1.0], atol=1e-7)
    c.mfm.momentum_schedule = "constant"
    assert float(method.teacher_momentum(c, 70, 100)) == np.float32(0.996)


@pytest.fixture(scope="module")
def straight_run() -> dict:
    """RUN_STEPS steps of the tiny config on its 2 x 4 (data x fsdp) mesh, exactly as the train
    loop runs them; records the student and teacher before and after every step."""
    config = tiny_config(total_steps=RUN_STEPS, checkpoint_every_steps=2, image_every_steps=2)
    mesh = sharding.make_mesh(config.mesh)
    s = train.setup(config, mesh, num_examples=64)
    batches = data_input.make_pretrain_iterator(
        config, batch_transform=s.method.make_batch_transform(config, mesh)
    )
    state = s.init_state()
    run = {"config": config, "setup": s, "metrics": [], "batches": []}
    run["students"], run["teachers"] = [_flat(state.params)], [_flat(state.teacher)]
    with jax.set_mesh(mesh):
        for _ in range(RUN_STEPS):
            host = {k: v for k, v in next(batches).items() if k not in train.HOST_ONLY_KEYS}
            run["batches"].append(host)
            state, metrics = s.train_step(state, s.place_batch(host))
            run["metrics"].append(jax.device_get(metrics))
            run["students"].append(_flat(state.params))
            run["teachers"].append(_flat(state.teacher))
    batches.close()
    run["cache_size"] = s.train_step._cache_size()
    return run


def test_ema_rule_in_the_jitted_step_and_one_compilation(straight_run):
    """Init copies the student encoder; after each step teacher = m * old + (1 - m) * updated
    student encoder with that step's m; steps with new masks compile once."""
    run = straight_run
    encoder = lambda flat: {
        k.removeprefix("encoder."): v for k, v in flat.items() if k.startswith("encoder.")
    }
    first = encoder(run["students"][0])
    assert first.keys() == run["teachers"][0].keys()
    for path, value in first.items():
        np.testing.assert_array_equal(value, run["teachers"][0][path], err_msg=path)
    for step in range(RUN_STEPS):
        m = float(run["metrics"][step]["teacher_momentum"])
        expected_m = float(method.teacher_momentum(run["config"], step, RUN_STEPS))
        assert m == pytest.approx(expected_m, abs=1e-7)
        old, new = run["teachers"][step], run["teachers"][step + 1]
        student = encoder(run["students"][step + 1])
        for path, value in new.items():
            expected = m * old[path] + (1 - m) * student[path]
            np.testing.assert_allclose(value, expected, atol=1e-6, rtol=0, err_msg=path)
    assert any(np.abs(new[p] - old[p]).max() > 0 for p in new)  # The teacher moved.
    assert len({b["mask"].tobytes() for b in run["batches"]}) == RUN_STEPS
    assert run["cache_size"] == 1


def test_teacher_gets_no_gradient():
    config = tiny_config()
    model, teacher = _models(config)
    batch = _batch(config)
    graphdef, params = nnx.split(teacher, nnx.Param)

    def loss_of_teacher(p):
        return method.loss_fn(model, batch, None, teacher=nnx.merge(graphdef, p))[0]

    grads = jax.jit(jax.grad(loss_of_teacher))(params)
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grads))
    student_grads = nnx.jit(nnx.grad(lambda m: method.loss_fn(m, batch, None, teacher=teacher)[0]))(
        model
    )
    for head in student_grads["mfm_heads"].values():
        assert np.abs(np.asarray(head["kernel"][...])).max() > 0


def test_teacher_sees_the_full_image_and_the_student_only_visible_patches():
    config = tiny_config()
    model, teacher = _models(config)
    batch = _batch(config)
    grid = config.model.img_size // 16
    removed = np.asarray(batch["mask"]).reshape(-1, grid, 1, grid, 1, 1)
    pixels = np.broadcast_to(removed, (removed.shape[0], grid, 16, grid, 16, 3))
    noise = np.random.default_rng(5).normal(size=batch["image"].shape).astype(np.float32)
    changed = {**batch, "image": batch["image"] + noise * pixels.reshape(noise.shape)}
    objective = model.objective
    encode = nnx.jit(lambda m, x, ids: (m.encoder(x, ids), m(x, ids)))
    for a, b in zip(
        jax.tree.leaves(encode(model, batch["image"], batch["ids_keep"])),
        jax.tree.leaves(encode(model, changed["image"], changed["ids_keep"])),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)  # Student: encoder, pyramid, predictions.
    before = method.teacher_targets(objective, teacher, batch["image"])
    after = method.teacher_targets(objective, teacher, changed["image"])
    m = np.asarray(batch["mask"], bool)
    for t0, t1 in zip(before, after, strict=True):
        diff = np.abs(np.asarray(t0) - np.asarray(t1)).max(-1)
        assert (diff[m] > 1e-3).all()  # Every masked patch's target moved.


# --- loss terms ----------------------------------------------------------------------------------


def test_losses_ignore_visible_patches():
    rng = np.random.default_rng(0)
    pred, target = (jnp.asarray(rng.normal(size=(2, 4, 6)), jnp.float32) for _ in range(2))
    mask = jnp.asarray([[1, 0, 1, 0], [0, 0, 1, 1]], jnp.int32)
    visible_noise = jnp.asarray(rng.normal(size=(2, 4, 6)), jnp.float32) * (1 - mask[..., None])
    for kind in ("mse", "smooth_l1"):
        base = method.feature_loss(pred, target, mask, kind=kind, masked_only=True)
        moved = method.feature_loss(pred + visible_noise, target, mask, kind=kind, masked_only=True)
        assert float(base) == pytest.approx(float(moved), abs=1e-7)
        every = method.feature_loss(
            pred + visible_noise, target, mask, kind=kind, masked_only=False
        )
        assert abs(float(every) - float(base)) > 1e-3
    np.testing.assert_allclose(
        norm_pix.masked_mse(pred + visible_noise, target, mask),
        norm_pix.masked_mse(pred, target, mask),
        atol=1e-7,
    )
    d = np.asarray(pred - target, np.float64)
    smooth = np.where(np.abs(d) < 1, 0.5 * d**2, np.abs(d) - 0.5).mean()
    np.testing.assert_allclose(
        method.feature_loss(pred, target, mask, kind="smooth_l1", masked_only=False), smooth, 1e-6
    )


@pytest.mark.parametrize("term", ["loss_pixel", "loss_mfm_1", "loss_mfm_2", "loss_mfm_3"])
def test_zero_weight_removes_exactly_that_term(term):
    config = tiny_config(**{"mfm.pixel_weight": 0.7})
    model, teacher = _models(config)
    batch = _batch(config)
    loss, aux = _loss(model, batch, teacher)
    weights = method.Objective.from_config(config).term_weights()
    assert weights == {"loss_pixel": 0.7, "loss_mfm_1": 0.5, "loss_mfm_2": 2.0, "loss_mfm_3": 1.5}
    assert float(loss) == pytest.approx(sum(w * float(aux[k]) for k, w in weights.items()), 1e-6)
    if term == "loss_pixel":
        config.mfm.pixel_weight = 0.0
    else:
        config.mfm.weights = tuple(
            0.0 if f"loss_mfm_{i + 1}" == term else w for i, w in enumerate(config.mfm.weights)
        )
    model.objective = method.Objective.from_config(config)
    dropped, dropped_aux = _loss(model, batch, teacher)
    assert term not in dropped_aux and set(dropped_aux) == set(aux) - {term}
    assert float(loss - dropped) == pytest.approx(weights[term] * float(aux[term]), abs=1e-5)


# --- training in the loop ------------------------------------------------------------------------


def test_sharded_step_equals_single_device(straight_run):
    """The 2 x 4 mesh's first step (parameters sharded over fsdp) equals one device's."""
    config = tiny_config(total_steps=RUN_STEPS, **{"mesh.data": 1, "mesh.fsdp": 1})
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    s = train.setup(config, mesh, num_examples=64)
    with jax.set_mesh(mesh):
        state, metrics = s.train_step(s.init_state(), s.place_batch(straight_run["batches"][0]))
    sharded = straight_run["metrics"][0]
    for key in ("loss", "loss_pixel", "loss_mfm_1", "loss_mfm_2", "loss_mfm_3"):
        np.testing.assert_allclose(metrics[key], sharded[key], atol=1e-5, rtol=0)
    trees = (
        (state.params, straight_run["students"][1]),
        (state.teacher, straight_run["teachers"][1]),
    )
    for tree, reference in trees:
        for path, value in _flat(tree).items():
            np.testing.assert_allclose(value, reference[path], atol=1e-5, err_msg=path)


def test_training_resumes_exactly_logs_terms_and_writes_images(straight_run, tmp_path, monkeypatch):
    """train.train interrupted after step 2, then resumed: steps 3-4 log what the straight run
    computed, and the final checkpoint holds its student and teacher bit for bit."""
    config, n = straight_run["config"], RUN_STEPS // 2
    workdir = str(tmp_path / "run")
    with monkeypatch.context() as m:
        _interrupt_after(m, n)
        with pytest.raises(_InterruptedError):
            train.train(config, workdir)
    resumed = train.train(config, workdir)
    assert sorted(resumed) == list(range(n + 1, RUN_STEPS + 1))
    for step, logged in resumed.items():
        straight = straight_run["metrics"][step - 1]
        for key in ("loss", "loss_pixel", "loss_mfm_1", "loss_mfm_2", "loss_mfm_3"):
            assert logged[key] == float(straight[key]), (step, key)
        assert logged["teacher_momentum"] == float(straight["teacher_momentum"])
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=5)
    state = ckpt.restore(ckpt.latest_step(), straight_run["setup"].abstract_state)
    ckpt.close()
    assert int(state.step) == RUN_STEPS
    for tree, reference in (
        (state.params, straight_run["students"][-1]),
        (state.teacher, straight_run["teachers"][-1]),
    ):
        for path, value in _flat(tree).items():
            np.testing.assert_array_equal(value, reference[path], err_msg=path)
    for step in (n, RUN_STEPS):
        assert (tmp_path / "run" / "reconstructions" / f"step_{step:08d}.png").exists()


# --- CLIP teacher --------------------------------------------------------------------------------


def _clip_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
    """Random OpenAI-layout weights of TINY_CLIP, plus a text-tower key that must be ignored."""
    rng = np.random.default_rng(seed)
    w, p, out = TINY_CLIP["width"], TINY_CLIP["patch_size"], TINY_CLIP["output_dim"]
    grid = TINY_CLIP["img_size"] // p
    r = lambda *shape: rng.normal(0.0, 0.3, shape).astype(np.float32)
    sd = {
        "visual.conv1.weight": r(w, 3, p, p) / 4,
        "visual.class_embedding": r(w),
        "visual.positional_embedding": r(1 + grid**2, w),
        "visual.ln_pre.weight": 1 + r(w),
        "visual.ln_pre.bias": r(w),
        "visual.ln_post.weight": 1 + r(w),
        "visual.ln_post.bias": r(w),
        "visual.proj": r(w, out),
        "token_embedding.weight": r(7, 4),
    }
    block = "visual.transformer.resblocks.0."
    for name, shape in (
        ("ln_1.weight", (w,)),
        ("ln_1.bias", (w,)),
        ("attn.in_proj_weight", (3 * w, w)),
        ("attn.in_proj_bias", (3 * w,)),
        ("attn.out_proj.weight", (w, w)),
        ("attn.out_proj.bias", (w,)),
        ("ln_2.weight", (w,)),
        ("ln_2.bias", (w,)),
        ("mlp.c_fc.weight", (4 * w, w)),
        ("mlp.c_fc.bias", (4 * w,)),
        ("mlp.c_proj.weight", (w, 4 * w)),
        ("mlp.c_proj.bias", (w,)),
    ):
        sd[block + name] = r(*shape) + (1.0 if name.endswith("weight") and len(shape) == 1 else 0)
    return sd


def _np_ln(x, sd, name, eps=1e-5):
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * sd[f"{name}.weight"] + sd[f"{name}.bias"]


def np_clip(sd: dict, images: np.ndarray, heads: int) -> np.ndarray:
    """float64 CLIP image tower from the OpenAI state_dict: projected patch tokens."""
    sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    b, size, _, _ = images.shape
    conv = sd["visual.conv1.weight"]
    p, w = conv.shape[-1], conv.shape[0]
    g = size // p
    patches = images.reshape(b, g, p, g, p, 3).transpose(0, 1, 3, 5, 2, 4).reshape(b, g * g, -1)
    x = patches @ conv.reshape(w, -1).T
    x = np.concatenate([np.broadcast_to(sd["visual.class_embedding"], (b, 1, w)), x], 1)
    x = _np_ln(x + sd["visual.positional_embedding"], sd, "visual.ln_pre")
    pre = "visual.transformer.resblocks.0."
    h = _np_ln(x, sd, pre + "ln_1")
    qkv = h @ sd[pre + "attn.in_proj_weight"].T + sd[pre + "attn.in_proj_bias"]
    q, k, v = (
        t.reshape(b, -1, heads, w // heads).transpose(0, 2, 1, 3) for t in np.split(qkv, 3, -1)
    )
    att = special.softmax(q @ k.transpose(0, 1, 3, 2) / np.sqrt(w // heads), -1) @ v
    att = att.transpose(0, 2, 1, 3).reshape(b, -1, w)
    x = x + att @ sd[pre + "attn.out_proj.weight"].T + sd[pre + "attn.out_proj.bias"]
    h = _np_ln(x, sd, pre + "ln_2") @ sd[pre + "mlp.c_fc.weight"].T + sd[pre + "mlp.c_fc.bias"]
    h = h * special.expit(1.702 * h)
    x = x + h @ sd[pre + "mlp.c_proj.weight"].T + sd[pre + "mlp.c_proj.bias"]
    return _np_ln(x[:, 1:], sd, "visual.ln_post") @ sd["visual.proj"]


def test_clip_teacher_loads_npz_and_matches_numpy(tmp_path):
    sd = _clip_state_dict()
    path = tmp_path / "clip.npz"
    np.savez(path, **sd)
    config = _clip_config(**{"mfm.teacher_checkpoint": str(path)})
    config_checks.validate(config)
    model, teacher = _models(config)
    loaded = method.load_teacher(config, nnx.state(teacher, nnx.Param))
    nnx.update(teacher, loaded)
    kernel = sd["visual.transformer.resblocks.0.attn.in_proj_weight"].T
    np.testing.assert_array_equal(teacher.resblocks[0].attn.in_proj.kernel[...], kernel)

    images = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
    objective = model.objective
    clip_in = np.asarray(method.clip_input(objective, jnp.asarray(images)))
    pixels = images * np.asarray(config.data.std) + np.asarray(config.data.mean)
    quirk = np.clip((pixels + 1) / 2, 0, 1)  # BEiT-v2's ScalingLayerForClip on [0, 1] input.
    mean, std = np.asarray(clip_vit.CLIP_MEAN), np.asarray(clip_vit.CLIP_STD)
    np.testing.assert_allclose(clip_in, (quirk - mean) / std, atol=1e-5)
    expected = np_clip(sd, clip_in.astype(np.float64), TINY_CLIP["heads"])
    np.testing.assert_allclose(nnx.jit(lambda t, x: t(x))(teacher, clip_in), expected, atol=1e-4)

    batch = _batch(config)
    (target,) = method.teacher_targets(objective, teacher, batch["image"])
    assert target.shape == (4, 4, TINY_CLIP["output_dim"])
    loss, aux = _loss(model, batch, teacher)
    assert set(aux) == {"loss_mfm_clip", "mask_fraction"} and np.isfinite(float(loss))
    assert float(loss) == pytest.approx(float(aux["loss_mfm_clip"]), 1e-6)
    params = nnx.state(model, nnx.Param)
    assert method.update_teacher(config, loaded, params, jnp.int32(3), 10) == (loaded, {})


def test_missing_teacher_checkpoint_is_a_one_line_error(tmp_path):
    config = _clip_config(**{"mfm.teacher_checkpoint": str(tmp_path / "nope.npz")})
    teacher = nnx.state(method.build_teacher(config, nnx.Rngs(0)), nnx.Param)
    with pytest.raises(config_lib.ConfigError, match=r"teacher_checkpoint='.*nope\.npz' does not"):
        method.load_teacher(config, teacher)


# --- configs -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "variant",
    [
        "base_pixel",
        "base_pixel_mfm",
        "base_clip_teacher",
        "large_pixel",
        "large_pixel_mfm",
        "quickstart",
    ],
)
def test_variants_validate(variant):
    c = load_config("itpn", variant)
    config_checks.validate(c)
    size = "large" if "large" in variant else "base"
    if variant != "quickstart":
        arch = hivit.ARCHS[f"itpn_{size}"]
        assert {k: c.model[k] for k in arch} == arch
    expected = {"base_pixel": "none", "large_pixel": "none", "base_clip_teacher": "clip"}
    assert c.mfm.teacher == expected.get(variant, "ema")


def test_default_variant_and_recipes():
    c = load_config("itpn")
    assert c.mfm.teacher == "ema" and c.batch_size == 4096 and c.num_epochs == 1600
    assert c.optim.base_lr * c.batch_size / c.optim.lr_batch_base == pytest.approx(2.4e-3)
    clip = load_config("itpn", "base_clip_teacher")
    assert clip.optim.base_lr * clip.batch_size / clip.optim.lr_batch_base == pytest.approx(1.5e-3)
    assert method.head_dims(c) == (16 * 128, 4 * 256, 512) and method.head_dims(clip) == (512,)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"mask.patch_size": 32}, "equal config.mask.patch_size=32"),
        ({"mfm.teacher": "dino"}, "config.mfm.teacher='dino'"),
        ({"mfm.weights": (1.0, -1.0, 1.0)}, "config.mfm.weights"),
        ({"decoder.embed_dim": 24}, "config.decoder.embed_dim=24"),
        ({"mfm.teacher": "clip", "mfm.clip.img_size": 64}, "patch grid"),
    ],
)
def test_bad_configs_are_one_line_errors(overrides, message):
    with pytest.raises(config_lib.ConfigError, match=message.replace("(", r"\(")):
        config_checks.validate(tiny_config(**overrides))
