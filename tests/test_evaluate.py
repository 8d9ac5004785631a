"""Tests for the evaluation path: ordered, padded evaluation batches (input.make_eval_iterator),
sharded feature extraction against an eager forward, top-k metrics by hand, the knn and
linear_probe jobs against a numpy kNN, and the feature forward on pretraining parameters."""

import json
import logging

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import load_config, tiny_simmim_config

from mim_jax import evaluate, sharding
from mim_jax.data import augment, sources
from mim_jax.data import input as input_lib
from mim_jax.methods import simmim
from mim_jax.models import encoders

EVAL_BATCH = 16
MAX_VAL = 37  # Not divisible by EVAL_BATCH: the last batch is padded.
BANK = 48  # Bundled training records (the kNN bank).


def _config(kind: str = "knn"):
    """configs/evaluate.py:<kind> with a tiny Swin on 32 px bundled crops, in-process data."""
    c = load_config("evaluate", kind)
    c.model.update(
        img_size=32, patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4
    )
    c.data.update(num_examples=BANK, num_workers=0, prefetch=0)
    c.eval.update(batch_size=EVAL_BATCH, max_val_examples=MAX_VAL)
    c.eval.linear_probe.update(epochs=3, batch_size=16, warmup_epochs=1)
    return c


def _reference_images(config, split: str, records: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(normalized eval images `[n, H, W, 3]`, labels `[n]`) of `records`, read one by one."""
    source = sources.make_source(config.data, split)
    images, labels = [], []
    for record in records:
        image, label = source.read(int(record))
        pixels = augment.eval_transform(
            image,
            size=config.model.img_size,
            crop_pct=config.data.crop_pct,
            interpolation=config.data.interpolation,
        )
        images.append(augment.normalize(pixels, config.data.mean, config.data.std))
        labels.append(label)
    return np.stack(images), np.array(labels)


def _all_batches(config, split: str, batch_size: int, **kwargs) -> tuple[input_lib.EvalData, list]:
    """(EvalData, its batches); checks the pass ends after `num_batches`."""
    data = input_lib.make_eval_iterator(config, split, batch_size=batch_size, **kwargs)
    batches = [next(data.batches) for _ in range(data.num_batches)]
    with pytest.raises(StopIteration):
        next(data.batches)
    data.batches.close()
    return data, batches


def _check_pass(config, batches, records: np.ndarray, batch_size: int) -> None:
    """Valid rows are `records` in order; the rest are blank, label -1."""
    images = np.concatenate([b["image"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    valid = np.concatenate([b["valid"] for b in batches])
    assert all(len(b["image"]) == batch_size for b in batches)
    assert images.dtype == np.float32 and labels.dtype == np.int32 and valid.dtype == bool
    n = len(records)
    np.testing.assert_array_equal(valid, np.arange(len(valid)) < n)
    want_images, want_labels = _reference_images(config, "validation", records)
    np.testing.assert_array_equal(labels[:n], want_labels)
    np.testing.assert_allclose(images[:n], want_images, atol=1e-6)
    blank = augment.normalize(np.zeros((1, 32, 32, 3), np.uint8), config.data.mean, config.data.std)
    np.testing.assert_array_equal(images[n:], np.broadcast_to(blank, images[n:].shape))
    np.testing.assert_array_equal(labels[n:], -1)


def test_eval_iterator_is_one_ordered_padded_pass():
    config = _config()
    size = 7 * sources.BUNDLED_VAL_CROPS
    data, batches = _all_batches(config, "validation", 24)
    assert (data.num_examples, data.num_batches) == (size, 5)  # 112 = 4 * 24 + 16
    assert batches[-1]["valid"].sum() == 16
    _check_pass(config, batches, np.arange(size), 24)
    data, _ = _all_batches(config, "validation", 24, max_examples=500)
    assert data.num_examples == size


def test_eval_iterator_evenly_spaced_subset():
    config = _config()
    data, batches = _all_batches(config, "validation", 24, max_examples=10)
    assert (data.num_examples, data.num_batches) == (10, 1)
    records = np.round(np.linspace(0, 7 * sources.BUNDLED_VAL_CROPS - 1, 10)).astype(int)
    _check_pass(config, batches, records, 24)


def test_eval_iterator_hosts_split_every_batch():
    config = _config()
    _, whole = _all_batches(config, "validation", 24, max_examples=60)
    hosts = [
        _all_batches(config, "validation", 24, max_examples=60, rows=input_lib.host_rows(24, i, 2))
        for i in range(2)
    ]
    assert [d.num_batches for d, _ in hosts] == [3, 3]
    for step, batch in enumerate(whole):
        for key in ("image", "label", "valid"):
            joined = np.concatenate([hosts[0][1][step][key], hosts[1][1][step][key]])
            np.testing.assert_array_equal(joined, batch[key])
    with pytest.raises(input_lib.DataError, match="not divisible by the process count 5"):
        input_lib.host_rows(24, 0, 5)


@pytest.fixture(scope="module")
def reference():
    """The knn config, its feature model (seed config.seed, eager) and eager pooled features
    of the bank (all BANK training records) and of the MAX_VAL evenly spaced val records."""
    config = _config()
    model = evaluate.build_feature_model(config, nnx.Rngs(params=config.seed))
    bank_images, bank_labels = _reference_images(config, "train", np.arange(BANK))
    val_records = np.round(np.linspace(0, 7 * sources.BUNDLED_VAL_CROPS - 1, MAX_VAL))
    val_images, val_labels = _reference_images(config, "validation", val_records)
    features = np.asarray(
        encoders.pooled_features(model.encoder, np.concatenate([bank_images, val_images]))
    )
    return dict(
        config=config,
        model=model,
        bank=features[:BANK],
        bank_labels=bank_labels,
        val=features[BANK:],
        val_labels=val_labels,
    )


def _forward(config, mesh, params, *, select: bool = False):
    """(make_forward of the feature model on `mesh`, `params` replicated on `mesh`)."""
    graphdef, abstract = nnx.split(
        nnx.eval_shape(lambda: evaluate.build_feature_model(config, nnx.Rngs(0))), nnx.Param
    )
    forward = evaluate.make_forward(graphdef, abstract, mesh, select=select)
    return forward, jax.device_put(params, sharding.replicated(mesh))


def test_sharded_extraction_matches_eager_forward_on_1_and_8_devices(reference):
    config = reference["config"]
    params = nnx.state(reference["model"], nnx.Param)
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = sharding.make_mesh(config.mesh, devices)
        assert mesh.shape["data"] == len(devices)
        forward, placed = _forward(config, mesh, params)
        data = input_lib.make_eval_iterator(
            config, "validation", batch_size=EVAL_BATCH, max_examples=MAX_VAL
        )
        assert data.num_batches == 3
        features, labels = evaluate.extract(forward, placed, data, mesh)
        assert features.shape == (MAX_VAL, 32) and features.dtype == np.float32
        np.testing.assert_allclose(features, reference["val"], atol=1e-5)
        np.testing.assert_array_equal(labels, reference["val_labels"])


def test_topk_metrics_by_hand():
    logits = np.array(
        [
            [0.1, 0.9, 0.3, 0.0, 0.0, 0.0],  # label 1 first: top-1 and top-5 hit
            [0.5, 0.4, 0.1, 0.0, 0.0, 0.3],  # label 5 third: top-5 only
            [0.0, 0.9, 0.8, 0.7, 0.6, 0.5],  # label 0 last: miss
            [1.0, 1.0, 0.0, 0.0, 0.0, 0.0],  # label 1 tied with 0, which ranks first
        ]
    )
    metrics = evaluate.topk_metrics(logits, np.array([1, 5, 0, 1]))
    assert metrics == {"top1": 25.0, "top5": 75.0}


def _numpy_knn_accuracy(bank, bank_labels, queries, labels, *, k=20, temperature=0.07):
    """DINO's weighted kNN in float64: cosine similarity, the k nearest vote exp(sim / T);
    (top-1, top-5) accuracy in percent."""
    unit = lambda x: x / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    sim = unit(queries) @ unit(bank).T
    scores = np.zeros((len(queries), 7))
    for q in range(len(queries)):
        for j in np.argsort(-sim[q], kind="stable")[:k]:
            scores[q, bank_labels[j]] += np.exp(sim[q, j] / temperature)
    ranks = np.argsort(-scores, axis=1, kind="stable")
    hits = ranks == labels[:, None]
    return 100.0 * hits[:, :1].any(1).mean(), 100.0 * hits[:, :5].any(1).mean()


@pytest.mark.parametrize("kind", ["knn", "linear_probe"])
def test_run_random_encoder_is_deterministic(kind, reference, tmp_path, caplog):
    config = _config(kind)
    texts = []
    for attempt in range(2):
        workdir = tmp_path / str(attempt)
        with caplog.at_level(logging.WARNING):
            results = evaluate.run(config, str(workdir))
        assert "randomly initialized" in caplog.text
        text = (workdir / "eval_results.json").read_text()
        assert json.loads(text) == results
        texts.append(text)
    assert texts[0] == texts[1]
    assert set(results) == {f"{kind}_top1", f"{kind}_top5"}
    assert 0 <= results[f"{kind}_top1"] <= results[f"{kind}_top5"] <= 100
    if kind == "knn":
        top1, top5 = _numpy_knn_accuracy(
            reference["bank"], reference["bank_labels"], reference["val"], reference["val_labels"]
        )
        assert results["knn_top1"] == pytest.approx(top1)
        assert results["knn_top5"] == pytest.approx(top5)


def test_select_forward_on_pretraining_params():
    config = tiny_simmim_config()
    pretrain = simmim.build_model(config, nnx.Rngs(1))
    pretrain_params = nnx.state(pretrain, nnx.Param)
    flat = {".".join(map(str, k)) for k, _ in nnx.to_flat_state(pretrain_params)}
    assert "encoder.mask_token" in flat and any(k.startswith("decoder.") for k in flat)
    feature_model = evaluate.build_feature_model(config, nnx.Rngs(2))
    params = nnx.state(feature_model, nnx.Param)
    encoder = dict(nnx.to_pure_dict(pretrain_params)["encoder"])
    del encoder["mask_token"]
    nnx.replace_by_pure_dict(params, {"encoder": encoder})  # Raises on any extra key.
    assert {".".join(map(str, k)) for k, _ in nnx.to_flat_state(params)} == {
        k for k in flat if k.startswith("encoder.") and k != "encoder.mask_token"
    }
    mesh = sharding.make_mesh(config.mesh)
    images = np.random.default_rng(0).normal(size=(16, 32, 32, 3)).astype(np.float32)
    local = dict(image=images, label=np.arange(16, dtype=np.int32), valid=np.ones(16, bool))
    outputs = {}
    for select, source in ((False, params), (True, pretrain_params)):
        forward, placed = _forward(config, mesh, source, select=select)
        with jax.set_mesh(mesh):
            out, labels, valid = forward(placed, sharding.global_batch(local, mesh))
        outputs[select] = np.asarray(out)
        np.testing.assert_array_equal(np.asarray(labels), local["label"])
        assert np.asarray(valid).all()
    np.testing.assert_allclose(outputs[True], outputs[False], atol=1e-6)
    eager = np.asarray(encoders.pooled_features(pretrain.encoder, images))
    np.testing.assert_allclose(outputs[True], eager, atol=1e-5)
