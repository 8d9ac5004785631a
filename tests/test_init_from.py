"""`config.init_from` (mim_jax.init_from): only the encoder of every method's pretraining
checkpoint loads (SimMIM Swin from a real `train.train` run, SimMIM ViT, GreenMIM, the iTPN
student), the key surgery (Swin window change, ViT shared -> per-block bias, position tables
at another grid) and one-line errors; official weight files are in test_export.py. Loaded
models are built with another seed than their source, so a load that does nothing fails."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from helpers import load_config, tiny_greenmim_config, tiny_simmim_config
from test_itpn import tiny_config as tiny_itpn_config

from mim_jax import checkpoint, evaluate, init_from, pytree, sharding, train
from mim_jax.config_lib import ConfigError
from mim_jax.methods import classification, greenmim, simmim
from mim_jax.methods import itpn as itpn_method
from mim_jax.models import encoders, pos_resize

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
SOURCE_SEED, TARGET_SEED = 0, 1


# --- configs, models and checkpoints ---------------------------------------------------------


def swin_config(**model):
    c = tiny_simmim_config(total_steps=1)
    c.model.update(model)
    return c


def vit_config(*, finetune: bool = False, **model):
    """SimMIM's ViT on 32 px (4x4 patches of 8 px): shared bias for pretraining; per-block
    bias, mean pooling and fc_norm for fine-tuning."""
    c = load_config("simmim", "vit_base_224")
    c.model.update(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2)
    c.model.drop_path_rate = 0.0
    if finetune:
        c.model.update(use_shared_rel_pos_bias=False, use_rel_pos_bias=True)
        c.model.use_mean_pooling = True
    c.model.update(model)
    c.mask.patch_size = 16
    return c


def itpn_config(**model):
    c = tiny_itpn_config(total_steps=1)
    c.model.update(model)
    return c


def official_config(name: str, *, finetune: bool = False):
    """The tiny config of a tests/fixtures dump (`<name>_tiny_io.npz` meta)."""
    cfg = json.loads(str(np.load(FIXTURES / f"{name}_tiny_io.npz")["meta_json"]))["cfg"]
    size = dict(img_size=cfg["img"], patch_size=cfg["patch"], embed_dim=cfg["embed"])
    if name == "simmim_swin":
        heads = tuple(cfg["heads"])
        return swin_config(
            **size, depths=tuple(cfg["depths"]), num_heads=heads, window_size=cfg["window"]
        )
    if name == "simmim_vit":
        return vit_config(finetune=finetune, **size, depth=cfg["depth"], num_heads=cfg["heads"])
    extra = dict(rpe=True, ape_init="trunc_normal") if finetune else {}
    return itpn_config(
        **size, mlp_depth=cfg["mlp_depth"], depth=cfg["depth"], num_heads=cfg["heads"], **extra
    )


def flat(state) -> dict[str, np.ndarray]:
    """{dotted path: host array} of an nnx.State or nested dict."""
    tree = nnx.to_pure_dict(state) if isinstance(state, nnx.State) else state
    return {k.removesuffix(".value"): np.asarray(v) for k, v in pytree.flatten(tree).items()}


def on_mesh(model: nnx.Module, config) -> nnx.State:
    """`model`'s parameters placed on the config's mesh with the training shardings."""
    mesh = sharding.make_mesh(config.mesh)
    params = nnx.state(model, nnx.Param)
    rules = tuple(tuple(r) for r in config.sharding_rules)
    shardings = sharding.tree_shardings(params, nnx.get_partition_spec(params), rules, mesh)
    return jax.device_put(params, shardings)


def classifier(config, seed: int = TARGET_SEED, num_classes: int = 5) -> nnx.Module:
    return classification.build_classifier(config, num_classes, nnx.Rngs(params=seed))


def save_state(workdir: pathlib.Path, params: nnx.State, teacher=None, step: int = 1) -> None:
    """A train-state checkpoint as `train.train` writes it (params, opt_state, teacher)."""
    state = train.TrainState(step=jnp.int32(step), params=params, opt_state={}, teacher=teacher)
    ckpt = checkpoint.Checkpointer(str(workdir / "checkpoints"), max_to_keep=1, async_save=False)
    ckpt.save(step, state)
    ckpt.close()


def shapes(model_fn) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of a model that is never materialized."""
    abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(model_fn), nnx.Param))
    return {k: tuple(v.shape) for k, v in pytree.flatten(abstract).items()}


def random_weights(model_config, seed: int = 0) -> init_from.Weights:
    """Random source weights with the encoder paths of `model_config` (mask token included)."""
    rng = np.random.default_rng(seed)
    encoder = shapes(
        lambda: encoders.build_encoder(model_config, rngs=nnx.Rngs(0), use_mask_token=True)
    )
    params = {f"encoder.{k}": rng.normal(size=s).astype(np.float32) for k, s in encoder.items()}
    return init_from.Weights(params, [], "test source")


def encoder_values(values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v for k, v in values.items() if k.startswith("encoder.")}


def assert_loaded(loaded: dict, source: dict, paths) -> None:
    for path in paths:
        np.testing.assert_array_equal(loaded[path], source[path], err_msg=path)


def assert_one_line(excinfo, *fragments: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


@pytest.fixture(scope="module")
def swin_run(tmp_path_factory) -> tuple[str, dict[str, np.ndarray]]:
    """(workdir, its checkpoint's params read in full by orbax) of a 1-step SimMIM run."""
    workdir = tmp_path_factory.mktemp("simmim_swin")
    train.train(swin_config(), str(workdir))
    item = workdir / "checkpoints" / "1" / "default"
    return str(workdir), flat(ocp.StandardCheckpointer().restore(str(item))["params"])


# --- pretraining checkpoints of every method -------------------------------------------------


def test_simmim_swin_run_loads_the_encoder_only(swin_run):
    workdir, source = swin_run
    config = swin_config()
    model = classifier(config)
    params = on_mesh(model, config)
    fresh = flat(params)
    state, report = init_from.initialize(workdir, "swin", params)
    loaded = flat(state)
    encoder_paths = sorted(encoder_values(fresh))
    assert report.loaded == encoder_paths
    assert_loaded(loaded, source, encoder_paths)
    assert not np.array_equal(fresh["encoder.norm.scale"], source["encoder.norm.scale"])
    assert report.new == ["head.bias", "head.kernel"]
    assert_loaded(loaded, fresh, report.new)
    assert {"encoder.mask_token", "decoder.proj.kernel", "decoder.proj.bias"} <= set(report.dropped)
    assert report.resized == [] and report.step == 1
    for new, old in zip(jax.tree.leaves(state), jax.tree.leaves(params), strict=True):
        assert new.sharding == old.sharding and new.dtype == old.dtype
    line = report.line(f"checkpoint {workdir}")
    assert "\n" not in line and f"loaded {len(encoder_paths)}" in line and "new 2" in line


def test_greenmim_encoder_loads_into_the_dense_swin(tmp_path):
    config = tiny_greenmim_config()
    source_model = greenmim.build_model(config, nnx.Rngs(params=SOURCE_SEED))
    source = flat(nnx.state(source_model, nnx.Param))
    save_state(tmp_path, nnx.state(source_model, nnx.Param))
    model = evaluate.build_feature_model(config, nnx.Rngs(params=TARGET_SEED))
    target = flat(nnx.state(model, nnx.Param))
    green_encoder = {k: v.shape for k, v in encoder_values(source).items()}
    assert green_encoder == {k: v.shape for k, v in target.items()}
    state, report = init_from.initialize(str(tmp_path), "swin", on_mesh(model, config))
    assert_loaded(flat(state), source, target)
    assert report.loaded == sorted(target) and report.new == [] and report.resized == []
    assert "mask_token" in report.dropped and "decoder_pred.kernel" in report.dropped


def test_vit_pretraining_loads_into_the_mean_pooling_classifier(tmp_path):
    source_model = simmim.build_model(vit_config(), nnx.Rngs(params=SOURCE_SEED))
    source = flat(nnx.state(source_model, nnx.Param))
    save_state(tmp_path, nnx.state(source_model, nnx.Param))
    config = vit_config(finetune=True)
    params = on_mesh(classifier(config), config)
    state, report = init_from.initialize(str(tmp_path), "vit", params)
    loaded = flat(state)
    shared = source["encoder.rel_pos_bias.relative_position_bias_table"]
    tables = [f"encoder.blocks.{i}.attn.relative_position_bias_table" for i in range(2)]
    for table in tables:
        np.testing.assert_array_equal(loaded[table], shared)
    assert_loaded(loaded, source, [k for k in encoder_values(loaded) if k not in tables])
    assert report.new == ["fc_norm.bias", "fc_norm.scale", "head.bias", "head.kernel"]
    assert report.resized == [
        "encoder.rel_pos_bias.relative_position_bias_table copied into 2 blocks"
    ]
    assert {"encoder.norm.scale", "encoder.norm.bias", "encoder.mask_token"} <= set(report.dropped)


def test_itpn_loads_the_student_never_the_teacher(tmp_path):
    pretrain = itpn_config()
    student = nnx.state(itpn_method.build_model(pretrain, nnx.Rngs(params=SOURCE_SEED)), nnx.Param)
    teacher = nnx.state(itpn_method.build_teacher(pretrain, nnx.Rngs(params=7)), nnx.Param)
    save_state(tmp_path, student, teacher)
    source, teacher_values = flat(student), flat(teacher)
    config = itpn_config(rpe=True, ape_init="trunc_normal")
    state, report = init_from.initialize(str(tmp_path), "itpn", on_mesh(classifier(config), config))
    loaded = flat(state)
    tables = [k for k in loaded if k.endswith("relative_position_bias_table")]
    head = ["fc_norm.bias", "fc_norm.scale", "head.bias", "head.kernel"]
    assert tables and report.new == sorted([*tables, *head])
    encoder = [k for k in encoder_values(loaded) if k not in tables]
    assert report.loaded == sorted(encoder)
    assert_loaded(loaded, source, encoder)
    kernel = "blocks.4.attn.qkv.kernel"
    assert not np.array_equal(teacher_values[kernel], loaded[f"encoder.{kernel}"])
    assert {"mask_token", "pyramid.split_8to4.reduction.kernel"} <= set(report.dropped)
    assert not any(k.startswith("teacher") for k in report.dropped)


# --- key surgery -------------------------------------------------------------------------------


def test_swin_window_change_resizes_every_table():
    weights = random_weights(swin_config(img_size=48, window_size=3).model)
    target = shapes(lambda: classifier(swin_config(img_size=64, window_size=4)))
    values, report = init_from.match(weights, target, "swin")
    tables = [k for k in target if k.endswith("relative_position_bias_table")]
    assert len(tables) == 4 and len(report.resized) == 4
    for table in tables:
        expected = pos_resize.resize_rel_pos_table(weights.params[table], 4)
        assert values[table].shape == target[table] == (49, expected.shape[1])
        np.testing.assert_array_equal(values[table], expected)
    assert_loaded(values, weights.params, [k for k in encoder_values(values) if k not in tables])
    same = shapes(lambda: classifier(swin_config(img_size=48, window_size=3)))
    values, report = init_from.match(weights, same, "swin")
    assert report.resized == []
    assert_loaded(values, weights.params, encoder_values(values))


def test_vit_shared_bias_is_copied_into_every_block_and_resized():
    weights = random_weights(vit_config().model)
    shared = weights.params["encoder.rel_pos_bias.relative_position_bias_table"]
    tables = [f"encoder.blocks.{i}.attn.relative_position_bias_table" for i in range(2)]
    values, _ = init_from.match(
        weights, shapes(lambda: classifier(vit_config(finetune=True))), "vit"
    )
    for table in tables:
        np.testing.assert_array_equal(values[table], shared)
    target = shapes(lambda: classifier(vit_config(finetune=True, img_size=48)))
    values, report = init_from.match(weights, target, "vit")
    assert len(report.resized) == 3  # The copy, then the two resized tables.
    for table in tables:
        assert values[table].shape == ((2 * 6 - 1) ** 2 + 3, 2)
        np.testing.assert_array_equal(
            values[table], pos_resize.resize_rel_pos_table_with_extra(shared, 6, num_extra=3)
        )
        np.testing.assert_array_equal(values[table][-3:], shared[-3:])


def test_vit_absolute_position_embedding():
    weights = random_weights(vit_config(use_abs_pos=True).model)
    pos = weights.params["encoder.pos_embed"]
    same = shapes(lambda: classifier(vit_config(finetune=True, use_abs_pos=True)))
    values, report = init_from.match(weights, same, "vit")
    np.testing.assert_array_equal(values["encoder.pos_embed"], pos)
    assert not any("pos_embed" in note for note in report.resized)
    bigger = shapes(lambda: classifier(vit_config(finetune=True, use_abs_pos=True, img_size=48)))
    values, report = init_from.match(weights, bigger, "vit")
    resized = values["encoder.pos_embed"]
    assert resized.shape == (1 + 36, 16)
    np.testing.assert_array_equal(resized, pos_resize.resize_abs_pos_embed(pos, 6, num_extra=1))
    np.testing.assert_array_equal(resized[0], pos[0])
    assert any(note.startswith("encoder.pos_embed") for note in report.resized)


def test_hivit_absolute_position_embedding_at_another_image_size():
    weights = random_weights(itpn_config().model)
    target = shapes(lambda: classifier(itpn_config(img_size=64, rpe=True)))
    values, report = init_from.match(weights, target, "itpn")
    pos = weights.params["encoder.absolute_pos_embed"]
    assert pos.shape == (4, 16) and values["encoder.absolute_pos_embed"].shape == (16, 16)
    np.testing.assert_array_equal(
        values["encoder.absolute_pos_embed"], pos_resize.resize_abs_pos_embed(pos, 4)
    )
    assert report.resized == ["encoder.absolute_pos_embed (4, 16)->(16, 16)"]


# --- mismatches ----------------------------------------------------------------------------------


def test_swin_checkpoint_into_a_vit_fails_in_one_line(swin_run):
    config = vit_config(finetune=True)
    params = on_mesh(classifier(config), config)
    with pytest.raises(checkpoint.CheckpointMismatchError) as excinfo:
        init_from.initialize(swin_run[0], "vit", params)
    assert_one_line(excinfo, "does not fit the model", "encoder.blocks.0.", "missing")


def test_deeper_or_narrower_swin_fails_in_one_line():
    deeper = random_weights(swin_config(depths=(2, 4), num_heads=(2, 4)).model)
    target = shapes(lambda: classifier(swin_config()))
    with pytest.raises(checkpoint.CheckpointMismatchError) as excinfo:
        init_from.match(deeper, target, "swin")
    assert_one_line(excinfo, "encoder.layers.1.blocks.2.", "unused")
    narrow = random_weights(swin_config().model)
    wide = shapes(lambda: classifier(swin_config(embed_dim=32)))
    with pytest.raises(checkpoint.CheckpointMismatchError) as excinfo:
        init_from.match(narrow, wide, "swin")
    assert_one_line(excinfo, "encoder.layers.0.blocks.0.attn.proj.bias is (16,), model wants (32,)")


def test_tables_that_cannot_be_resized_fail_in_one_line():
    target = shapes(lambda: classifier(swin_config(window_size=4)))
    small_window = random_weights(swin_config(window_size=2).model)
    with pytest.raises(checkpoint.CheckpointMismatchError) as excinfo:
        init_from.match(small_window, target, "swin")
    table = "encoder.layers.0.blocks.0.attn.relative_position_bias_table"
    assert_one_line(excinfo, f"{table} (9, 2) cannot be resized to (49, 2)", "window >= 3")
    other_heads = random_weights(swin_config(window_size=2, num_heads=(1, 2)).model)
    with pytest.raises(checkpoint.CheckpointMismatchError) as excinfo:
        init_from.match(other_heads, target, "swin")
    assert_one_line(excinfo, f"{table} is (9, 1), model wants (49, 2)")
    small_grid = random_weights(vit_config(img_size=16).model)
    with pytest.raises(checkpoint.CheckpointMismatchError) as excinfo:
        init_from.match(small_grid, shapes(lambda: classifier(vit_config(finetune=True))), "vit")
    assert_one_line(excinfo, "encoder.blocks.0.attn.relative_position_bias_table (12, 2)")


def test_top1_needs_every_parameter(swin_run, tmp_path):
    config = swin_config()
    with pytest.raises(checkpoint.CheckpointMismatchError) as excinfo:
        init_from.initialize(swin_run[0], "swin", on_mesh(classifier(config), config), strict=True)
    assert_one_line(excinfo, "head.kernel missing")
    tuned = classifier(config, seed=SOURCE_SEED)
    save_state(tmp_path, nnx.state(tuned, nnx.Param), step=7)
    state, report = init_from.initialize(
        str(tmp_path), "swin", on_mesh(classifier(config), config), strict=True
    )
    assert report.new == [] and report.step == 7
    assert_loaded(flat(state), flat(nnx.state(tuned, nnx.Param)), report.loaded)
    other = on_mesh(classifier(config, num_classes=3), config)
    _, report = init_from.initialize(str(tmp_path / "checkpoints"), "swin", other)
    assert report.new == ["head.bias", "head.kernel"]
    assert "head.kernel (shape)" in report.dropped


def test_bad_paths_fail_in_one_line(tmp_path):
    (tmp_path / "weights.txt").write_text("x")
    (tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp-1").mkdir(parents=True)
    bad = [
        tmp_path / "absent",
        tmp_path / "absent.npz",
        tmp_path / "weights.txt",
        tmp_path,
        tmp_path / "checkpoints",
    ]
    for path in bad:
        with pytest.raises(ConfigError) as excinfo:
            init_from.resolve(str(path))
        assert_one_line(excinfo, f"config.init_from='{path}'")
