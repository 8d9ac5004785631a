"""kNN scores vs a brute-force numpy kNN, top-k accuracy by hand, linear probe on separable data."""

import jax
import numpy as np
import pytest

from mim_jax import probes

AUTO = (jax.sharding.AxisType.Auto,) * 3
AXES = ("data", "fsdp", "tensor")


def _mesh(shape: tuple[int, int, int]) -> jax.sharding.Mesh:
    devices = jax.devices()[: int(np.prod(shape))]
    return jax.make_mesh(shape, AXES, axis_types=AUTO, devices=devices)


def _brute_knn(bank, bank_labels, queries, num_classes, k, temperature):
    """DINO knn_classifier in float64 numpy: full similarity matrix, ties to the lower index."""

    def unit(x):
        x = x.astype(np.float64)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    sim = unit(queries) @ unit(bank).T
    sim[:, bank_labels < 0] = -np.inf
    scores = np.zeros((len(queries), num_classes))
    for q in range(len(queries)):
        for j in np.argsort(-sim[q], kind="stable")[:k]:
            if bank_labels[j] >= 0:
                scores[q, bank_labels[j]] += np.exp(sim[q, j] / temperature)
    return scores


@pytest.fixture(scope="module")
def knn_data():
    """Bank of 61 rows (not divisible by 8) with padding labels and duplicated rows of
    different classes on different shards; 37 queries, some equal to the duplicated rows."""
    rng = np.random.default_rng(0)
    num_classes, dim = 5, 16
    bank = rng.normal(size=(61, dim)).astype(np.float32)
    labels = rng.integers(0, num_classes, size=61)
    labels[[7, 30]] = -1
    bank[50], labels[3], labels[50] = bank[3], 1, 4  # tie: index 3 must win over 50
    bank[44], labels[12], labels[44] = 2.0 * bank[12], 0, 2  # same direction, larger norm
    queries = rng.normal(size=(37, dim)).astype(np.float32)
    queries[[0, 5]] = bank[[3, 12]]
    queries[9] = bank[7]  # nearest row is padding: must not vote
    return bank, labels, queries, num_classes


@pytest.mark.parametrize("k", [1, 20])
def test_knn_matches_brute_force_on_1_2x4_and_8_devices(knn_data, k):
    bank, labels, queries, num_classes = knn_data
    want = _brute_knn(bank, labels, queries, num_classes, k, 0.07)
    got = {}
    for shape in [(1, 1, 1), (2, 4, 1), (8, 1, 1)]:
        got[shape] = probes.knn_scores(
            bank, labels, queries, num_classes=num_classes, mesh=_mesh(shape), k=k, chunk=16
        )
        assert got[shape].shape == (37, num_classes) and got[shape].dtype == np.float32
        np.testing.assert_allclose(got[shape], want, rtol=2e-5, atol=0)
    np.testing.assert_array_equal(got[(1, 1, 1)], got[(8, 1, 1)])
    np.testing.assert_array_equal(got[(2, 4, 1)], got[(8, 1, 1)])
    if k == 1:  # the ties went to the lower index, the padding row never voted
        assert np.argmax(got[(8, 1, 1)][[0, 5]], axis=1).tolist() == [1, 0]
        assert got[(8, 1, 1)][9, :].max() < np.exp(1 / 0.07) / 2


def test_knn_rejects_bad_k(knn_data):
    bank, labels, queries, num_classes = knn_data
    with pytest.raises(ValueError, match="k="):
        probes.knn_scores(
            bank, labels, queries, num_classes=num_classes, mesh=_mesh((1, 1, 1)), k=62
        )


def test_topk_accuracy_by_hand():
    scores = np.array(
        [
            [0.1, 0.7, 0.2, 0.0],  # label 1: top-1 hit
            [0.5, 0.5, 0.0, 0.0],  # label 1: tie with class 0, which ranks first -> top-2 only
            [0.0, 0.0, 0.0, 0.0],  # label 3: all tied -> rank 4
            [0.3, 0.1, 0.2, 0.4],  # label 2: rank 3
        ]
    )
    labels = np.array([1, 1, 3, 2])
    assert probes.topk_accuracy(scores, labels, ks=(1, 2, 3, 4)) == {
        1: 0.25,
        2: 0.5,
        3: 0.75,
        4: 1.0,
    }


def _separable(rng, n, num_classes=4, dim=8):
    """Class means 10 apart on distinct axes plus unit noise, offset and scaled per dimension
    (so the standardization matters)."""
    y = rng.integers(0, num_classes, size=n)
    x = rng.normal(size=(n, dim)) + 10.0 * np.eye(num_classes, dim)[y]
    return (x * np.linspace(0.5, 20.0, dim) + 100.0).astype(np.float32), y


SETTINGS = probes.LinearProbeSettings(epochs=6, batch_size=64, lr=0.1, warmup_epochs=1, seed=3)


@pytest.fixture(scope="module")
def probe_data():
    rng = np.random.default_rng(1)
    return _separable(rng, 320), _separable(rng, 200)


def _accuracy(probe, x, y):
    return float((np.argmax(probe.logits(x), axis=1) == y).mean())


def test_linear_probe_separable_and_deterministic(probe_data):
    (x, y), (x_test, y_test) = probe_data
    mesh = _mesh((8, 1, 1))
    probe = probes.train_linear_probe(x, y, num_classes=4, settings=SETTINGS, mesh=mesh)
    np.testing.assert_allclose(probe.mean, x.mean(0), rtol=1e-5)
    np.testing.assert_allclose(probe.std, np.sqrt(x.astype(np.float64).var(0) + 1e-6), rtol=1e-5)
    assert probe.kernel.shape == (8, 4) and probe.bias.shape == (4,)
    assert _accuracy(probe, x, y) == 1.0
    assert _accuracy(probe, x_test, y_test) == 1.0
    again = probes.train_linear_probe(x, y, num_classes=4, settings=SETTINGS, mesh=mesh)
    for a, b in [(probe.kernel, again.kernel), (probe.bias, again.bias)]:
        np.testing.assert_array_equal(a, b)


def test_linear_probe_shuffled_labels_stay_near_chance(probe_data):
    (x, y), (x_test, y_test) = probe_data
    shuffled = np.random.default_rng(2).permutation(y)
    probe = probes.train_linear_probe(
        x, shuffled, num_classes=4, settings=SETTINGS, mesh=_mesh((8, 1, 1))
    )
    assert _accuracy(probe, x_test, y_test) < 0.45  # chance is 0.25


def test_linear_probe_batch_clamped_and_not_divisible(probe_data):
    """A batch larger than the data (clamped to 30 rows: not divisible by 8, replicated)."""
    (x, y), _ = probe_data
    settings = probes.LinearProbeSettings(epochs=20, batch_size=1000, lr=0.5, warmup_epochs=2)
    probe = probes.train_linear_probe(
        x[:30], y[:30], num_classes=4, settings=settings, mesh=_mesh((8, 1, 1))
    )
    assert _accuracy(probe, x[:30], y[:30]) == 1.0
