"""Official weights in and out. Out (`python -m mim_jax.export`): the official fine-tuning names
and PyTorch shapes of Swin-B and ViT-B (against the official parameter list and shapes written
out from the architectures), the tiny official dumps exported back exactly from a checkpoint,
a lossless import -> export -> import round trip, refused encoder kinds and the command line
(one-line errors). In (`config.init_from` of .npz / .safetensors / .pth): the tiny official
dumps load into classifiers as the older importer (`convert.load_into`, `itpn.load_torch`)
loads them into the pretraining models."""

import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy
from flax import nnx
from helpers import ROOT, load_config
from test_init_from import (
    FIXTURES,
    SOURCE_SEED,
    TARGET_SEED,
    assert_loaded,
    classifier,
    encoder_values,
    flat,
    official_config,
    on_mesh,
    save_state,
)
from test_itpn_model import _model as official_itpn_model

from mim_jax import convert, evaluate, export, init_from, pytree
from mim_jax.config_lib import ConfigError
from mim_jax.methods import classification, simmim
from mim_jax.models import encoders, itpn

BUFFER = re.compile(r".*(relative_position_index|attn_mask)$")
PARAM_GROUPS = FIXTURES / "simmim_finetune_param_groups.json"


def swin_b_shape(name: str) -> tuple[int, ...]:
    """Official Swin-B (224 px, window 7, 1000 classes) PyTorch shape of `name` (SPEC 1.6)."""
    stage = re.match(r"layers\.(\d)\.", name)
    s = int(stage[1]) if stage else 3
    d, heads = 128 * 2**s, (4, 8, 16, 32)[s]
    rules = (
        (r"patch_embed\.proj\.weight", (128, 3, 4, 4)),
        (r"patch_embed\..*", (128,)),
        (r".*downsample\.reduction\.weight", (2 * d, 4 * d)),
        (r".*downsample\.norm\..*", (4 * d,)),
        (r".*attn\.qkv\.weight", (3 * d, d)),
        (r".*attn\.qkv\.bias", (3 * d,)),
        (r".*attn\.proj\.weight", (d, d)),
        (r".*relative_position_bias_table", (13 * 13, heads)),
        (r".*mlp\.fc1\.weight", (4 * d, d)),
        (r".*mlp\.fc1\.bias", (4 * d,)),
        (r".*mlp\.fc2\.weight", (d, 4 * d)),
        (r"head\.weight", (1000, 1024)),
        (r"head\.bias", (1000,)),
        (r".*", (d,)),  # norms, proj / fc2 biases, the final norm (1024)
    )
    return next(shape for pattern, shape in rules if re.fullmatch(pattern, name))


def vit_b_shape(name: str) -> tuple[int, ...]:
    """Official SimMIM ViT-B/16 fine-tuning model (224 px, per-block relative position bias,
    mean pooling, 1000 classes) PyTorch shape of `name` (SPEC 1.8)."""
    rules = (
        (r"cls_token", (1, 1, 768)),
        (r"patch_embed\.proj\.weight", (768, 3, 16, 16)),
        (r".*attn\.qkv\.weight", (3 * 768, 768)),
        (r".*attn\.proj\.weight", (768, 768)),
        (r".*relative_position_bias_table", (27 * 27 + 3, 12)),
        (r".*mlp\.fc1\.weight", (3072, 768)),
        (r".*mlp\.fc1\.bias", (3072,)),
        (r".*mlp\.fc2\.weight", (768, 3072)),
        (r"head\.weight", (1000, 768)),
        (r"head\.bias", (1000,)),
        (r".*", (768,)),  # norms, fc_norm, gammas, q/v biases, other biases
    )
    return next(shape for pattern, shape in rules if re.fullmatch(pattern, name))


@pytest.mark.parametrize(
    "variant,kind,group,shape_of",
    [
        ("simmim_swin_base_224", "swin", "swin_base_224_w7", swin_b_shape),
        ("simmim_vit_base_224", "vit", "vit_base_224", vit_b_shape),
    ],
)
def test_base_models_export_the_official_names_and_shapes(variant, kind, group, shape_of):
    config = load_config("finetune", variant)
    model = nnx.eval_shape(lambda: classification.build_classifier(config, 1000, nnx.Rngs(0)))
    abstract = pytree.flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    table = encoders.TORCH_TABLES[kind]
    exported = {}
    for path, leaf in abstract.items():  # One tensor at a time: the model is never built.
        stand_in = np.broadcast_to(np.float32(0), leaf.shape)
        ((name, value),) = convert.to_torch({path: stand_in}, table).items()
        assert name == convert.torch_name(path, table)
        exported[name] = value.shape
    official = json.loads(PARAM_GROUPS.read_text())[group]["params"]
    assert sorted(exported) == sorted(official)
    for name, shape in exported.items():
        assert shape == shape_of(name), name


def fixture_encoder(name: str) -> dict[str, np.ndarray]:
    """The encoder entries of an official tiny dump under the fine-tuning names (SimMIM's
    `encoder.` prefix dropped), without buffers and the pretraining mask token."""
    state = dict(np.load(FIXTURES / f"{name}_tiny_state.npz"))
    if name == "itpn":
        keep = re.compile(r"^(patch_embed\.|absolute_pos_embed$|blocks\.)")
        state = {k: v for k, v in state.items() if keep.match(k)}
    else:
        state = {k.removeprefix("encoder."): v for k, v in state.items()}
        state = {k: v for k, v in state.items() if not k.startswith("decoder.")}
    return {k: v for k, v in state.items() if not BUFFER.match(k) and k != "mask_token"}


def checkpoint_of(name: str, workdir: pathlib.Path) -> str:
    """A checkpoint of a feature model holding the official tiny dump `name`."""
    config = official_config(name)
    model = evaluate.build_feature_model(config, nnx.Rngs(params=TARGET_SEED))
    path = str(FIXTURES / f"{name}_tiny_state.npz")
    params, _ = init_from.initialize(path, config.model.name, on_mesh(model, config))
    save_state(workdir, params)
    return str(workdir)


@pytest.fixture(scope="module")
def swin_checkpoint(tmp_path_factory) -> str:
    return checkpoint_of("simmim_swin", tmp_path_factory.mktemp("swin_ckpt"))


@pytest.mark.parametrize("name", ["simmim_swin", "simmim_vit", "itpn"])
def test_tiny_official_dump_exports_back_exactly(name, tmp_path, swin_checkpoint):
    source = swin_checkpoint if name == "simmim_swin" else checkpoint_of(name, tmp_path / "run")
    out = tmp_path / "encoder.safetensors"
    state = export.export(source, str(out))
    expected = fixture_encoder(name)
    assert sorted(state) == sorted(expected)
    written = safetensors.numpy.load_file(str(out))
    for key, value in expected.items():
        assert state[key].dtype == np.float32, key
        np.testing.assert_array_equal(state[key], value, err_msg=key)
        np.testing.assert_array_equal(written[key], value, err_msg=key)


@pytest.mark.parametrize("name", ["simmim_swin", "simmim_vit", "itpn"])
def test_import_export_import_is_lossless(name, tmp_path):
    kind = official_config(name).model.name
    fixture = str(FIXTURES / f"{name}_tiny_state.npz")
    first = init_from.read_weights(fixture, kind).params
    out = tmp_path / "encoder.safetensors"
    exported = export.export(fixture, str(out), kind)
    again = init_from.read_weights(str(out), kind).params
    assert sorted(again) == sorted(k for k in first if k not in export.NOT_EXPORTED)
    for path, value in again.items():
        assert value.dtype == first[path].dtype and value.tobytes() == first[path].tobytes()
    twice = export.export(str(out), str(tmp_path / "again.safetensors"), kind)
    assert sorted(twice) == sorted(exported)
    for key, value in exported.items():
        assert twice[key].tobytes() == value.tobytes() and twice[key].shape == value.shape


@pytest.mark.parametrize("name", ["simmim_swin", "simmim_vit", "itpn"])
def test_a_weight_file_of_another_kind_is_refused(name, tmp_path):
    out = tmp_path / "x.safetensors"
    path = str(FIXTURES / f"{name}_tiny_state.npz")
    with pytest.raises(ConfigError, match="--model is needed"):
        export.export(path, str(out))
    for kind in set(encoders.KINDS) - {official_config(name).model.name}:
        with pytest.raises(ConfigError) as excinfo:
            export.export(path, str(out), kind)
        assert "\n" not in str(excinfo.value) and path in str(excinfo.value)
    assert not out.exists()


def test_a_checkpoint_of_another_kind_is_refused(tmp_path, swin_checkpoint):
    with pytest.raises(
        ConfigError, match=r"--model=vit, but .* holds encoder weights of kind swin"
    ):
        export.export(swin_checkpoint, str(tmp_path / "x.safetensors"), "vit")


def _run_cli(*flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-m", "mim_jax.export", *flags]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_command_line(tmp_path, swin_checkpoint):
    out = tmp_path / "cli" / "swin.safetensors"
    done = _run_cli(f"--init_from={swin_checkpoint}", f"--out={out}")
    assert done.returncode == 0, done.stderr
    written = safetensors.numpy.load_file(str(out))
    expected = fixture_encoder("simmim_swin")
    assert sorted(written) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(written[key], value, err_msg=key)
    missing = tmp_path / "absent"
    failed = _run_cli(f"--init_from={missing}", f"--out={tmp_path / 'y.safetensors'}")
    assert failed.returncode != 0
    errors = [line for line in failed.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("mim_jax.export: error: "), failed.stderr
    assert str(missing) in errors[0] and "Traceback" not in failed.stderr


# --- official weight files into init_from -------------------------------------------------


def _state_dict(name: str) -> dict[str, np.ndarray]:
    return dict(np.load(FIXTURES / f"{name}_tiny_state.npz"))


def _load_file(path, name: str, *, finetune: bool = False):
    config = official_config(name, finetune=finetune)
    kind = config.model.name
    model = classifier(config)
    state, report = init_from.initialize(str(path), kind, on_mesh(model, config))
    return flat(state), report


def _old_path(name: str) -> dict[str, np.ndarray]:
    """Encoder values of the official dump through the older name-table importer."""
    state = _state_dict(name)
    if name == "itpn":
        cfg = json.loads(str(np.load(FIXTURES / "itpn_tiny_io.npz")["meta_json"]))["cfg"]
        model = official_itpn_model(cfg, nnx.Rngs(params=SOURCE_SEED))
        itpn.load_torch(model, state)
    else:
        model = simmim.build_model(official_config(name), nnx.Rngs(params=SOURCE_SEED))
        convert.load_into(model, state, name.removeprefix("simmim_"))
    return encoder_values(flat(nnx.state(model, nnx.Param)))


def test_official_simmim_swin_npz_and_safetensors(tmp_path):
    expected = _old_path("simmim_swin")
    loaded, report = _load_file(FIXTURES / "simmim_swin_tiny_state.npz", "simmim_swin")
    assert report.loaded == sorted(encoder_values(loaded))
    assert report.loaded == sorted(set(expected) - {"encoder.mask_token"})
    assert report.new == ["head.bias", "head.kernel"]
    assert_loaded(loaded, expected, report.loaded)
    assert "encoder.mask_token" in report.dropped
    assert "layers.0.blocks.1.attn_mask" in report.dropped
    assert not any(k.startswith("decoder") for k in report.dropped)
    path = tmp_path / "swin.safetensors"
    safetensors.numpy.save_file(_state_dict("simmim_swin"), str(path))
    again, _ = _load_file(path, "simmim_swin")
    assert_loaded(again, loaded, encoder_values(loaded))


def test_official_simmim_vit_npz_into_the_fine_tuning_model():
    expected = _old_path("simmim_vit")
    shared = _state_dict("simmim_vit")["encoder.rel_pos_bias.relative_position_bias_table"]
    loaded, report = _load_file(FIXTURES / "simmim_vit_tiny_state.npz", "simmim_vit", finetune=True)
    tables = [f"encoder.blocks.{i}.attn.relative_position_bias_table" for i in range(2)]
    for table in tables:
        np.testing.assert_array_equal(loaded[table], shared)
    assert_loaded(loaded, expected, [k for k in report.loaded if k not in tables])
    assert report.new == ["fc_norm.bias", "fc_norm.scale", "head.bias", "head.kernel"]
    assert "encoder.norm.scale" in report.dropped


def test_official_itpn_npz_into_the_rpe_classifier():
    expected = _old_path("itpn")
    loaded, report = _load_file(FIXTURES / "itpn_tiny_state.npz", "itpn", finetune=True)
    tables = [k for k in loaded if k.endswith("relative_position_bias_table")]
    assert len(tables) == 2 and set(tables) <= set(report.new)
    assert report.loaded == sorted(expected)
    assert_loaded(loaded, expected, report.loaded)
    assert {"mask_token", "decoder_pos_embed", "fpn_modules.0.mlp.fc1.weight"} <= set(
        report.dropped
    )


def test_official_pth_with_a_model_wrapper(tmp_path):
    torch = pytest.importorskip("torch")
    state = {k: torch.from_numpy(v) for k, v in _state_dict("simmim_swin").items()}
    path = tmp_path / "swin.pth"
    torch.save({"model": state, "epoch": 3}, str(path))
    loaded, report = _load_file(path, "simmim_swin")
    assert_loaded(loaded, _old_path("simmim_swin"), report.loaded)
