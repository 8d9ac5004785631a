"""Evaluation on frozen features: weighted kNN (DINO) and a linear probe (MAE recipe).

Both take host numpy features (the caller gathered them) and run on the device mesh:

* kNN follows DINO's `eval_knn.knn_classifier`: L2-normalized features, cosine similarity of
  each query to every bank feature, the top `k` neighbours vote for their class with weight
  `exp(sim / T)`. The bank is split by rows over the batch axes ('data', 'fsdp'); each shard
  scans its rows in fixed-size blocks keeping a running top `k`, the candidates are
  all-gathered and a final top `k` picks the global neighbours. Scores are bitwise equal on
  any device count: block matmuls have one shape, and equal similarities go to the lower bank
  index (`lax.top_k` prefers the lower position; candidates stay in bank order).
* The linear probe follows MAE's `main_linprobe.py`: features standardized with the train
  set's per-dimension mean and std (BatchNorm without affine, eps 1e-6), a Linear head
  (normal std 0.01 truncated at 2 std, bias 0), SGD with momentum, linear warmup then
  half-cycle cosine per step over fractional epochs, cross-entropy. Weight decay (0 by
  default) applies to the kernel only.

Every host must hold the full bank / training features (placement uses per-shard callbacks).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from mim_jax.sharding import BATCH_AXES, batch_shards, replicated

_NORM_EPS = 1e-12  # torch F.normalize clamps the norm at 1e-12
_BN_EPS = 1e-6  # MAE's linear-probe BatchNorm1d eps
_BANK_BLOCK = 1024  # bank rows per similarity matmul (fixed: results independent of shards)
_MIN_BLOCKS = 64  # small banks still spread over up to 64 shards
_STATS_ROWS = 65536  # rows per host chunk when accumulating the feature mean / variance


def _put(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """Host array (identical on every host) -> global jax.Array with `sharding`."""
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def _fetch(x: jax.Array) -> np.ndarray:
    """A replicated global array -> host numpy (multi-host safe: reads a local replica)."""
    return np.asarray(x.addressable_data(0))


def _normalize(x: jax.Array) -> jax.Array:
    """Rows scaled to unit L2 norm, float32 `[rows, dim]`."""
    x = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
    return x / jnp.maximum(norm, _NORM_EPS)


def _top_k_merge(values: jax.Array, labels: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The `k` largest of `values` `[chunk, candidates]` with their labels; equal values keep
    the lower position (candidates are laid out in bank order)."""
    values, pick = jax.lax.top_k(values, k)
    return values, jnp.take_along_axis(labels, pick, axis=1)


def _knn_chunk(
    bank: jax.Array,
    bank_labels: jax.Array,
    queries: jax.Array,
    *,
    k: int,
    block: int,
    temperature: float,
    num_classes: int,
) -> jax.Array:
    """Per shard: running top-k over blocks of `block` bank rows, gathered, global top-k.

    bank `[local_rows, dim]`, bank_labels `[local_rows]`, queries `[chunk, dim]` (replicated)
    -> class scores `[chunk, num_classes]`, identical on every shard. Every similarity comes
    from a `[chunk, dim] x [dim, block]` matmul of a block aligned to global row multiples of
    `block`, so its bits do not depend on how many shards split the bank.
    """
    q = _normalize(queries)
    dim = bank.shape[1]

    def scan_block(carry, rows):
        feats, labels = rows
        sim = jnp.matmul(q, _normalize(feats).T, precision=jax.lax.Precision.HIGHEST)
        sim = jnp.where(labels[None, :] >= 0, sim, -jnp.inf)
        values, index = jax.lax.top_k(sim, min(k, block))
        merged = (
            jnp.concatenate([carry[0], values], 1),
            jnp.concatenate([carry[1], labels[index]], 1),
        )
        return _top_k_merge(*merged, k), None

    init = (jnp.full((q.shape[0], k), -jnp.inf), jnp.full((q.shape[0], k), -1, jnp.int32))
    init = jax.lax.pcast(init, BATCH_AXES, to="varying")  # the carry differs per shard
    blocks = (bank.reshape(-1, block, dim), bank_labels.reshape(-1, block))
    (values, labels), _ = jax.lax.scan(scan_block, init, blocks)
    # [shards, chunk, k] -> [chunk, shards * k], shard-major = bank order.
    values = jax.lax.all_gather(values, BATCH_AXES, axis=1, tiled=True, to="invarying")
    labels = jax.lax.all_gather(labels, BATCH_AXES, axis=1, tiled=True, to="invarying")
    values, labels = _top_k_merge(values, labels, k)
    weights = jnp.exp(values / temperature)  # padding: exp(-inf) = 0
    votes = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)  # label -1 -> zero row
    return jnp.sum(weights[..., None] * votes, axis=1)


@functools.cache
def _knn_fn(mesh: jax.sharding.Mesh, k: int, block: int, temperature: float, num_classes: int):
    """Jitted shard_map of `_knn_chunk` on `mesh` (cached: one compilation per setting)."""
    fn = functools.partial(
        _knn_chunk, k=k, block=block, temperature=temperature, num_classes=num_classes
    )
    mapped = jax.shard_map(
        fn,
        mesh=mesh,
        in_specs=(PartitionSpec(BATCH_AXES, None), PartitionSpec(BATCH_AXES), PartitionSpec()),
        out_specs=PartitionSpec(),
    )
    return jax.jit(mapped, out_shardings=replicated(mesh))


def knn_scores(
    bank: np.ndarray,
    bank_labels: np.ndarray,
    queries: np.ndarray,
    *,
    num_classes: int,
    mesh: jax.sharding.Mesh,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 256,
) -> np.ndarray:
    """Weighted-kNN class scores `[num_queries, num_classes]` float32.

    bank `[rows, dim]` with bank_labels `[rows]` (labels < 0 are padding and never vote),
    queries `[num_queries, dim]`; both normalized here. Queries run in chunks of `chunk`
    rows (the last one padded), so the program compiles once.
    """
    _check_knn_inputs(bank, bank_labels, queries, num_classes, k)
    # Blocks depend on the bank size only (at most _BANK_BLOCK rows, at least _MIN_BLOCKS of
    # them, a multiple of 8 rows); the bank pads to whole blocks on every shard.
    rows = bank.shape[0]
    block = min(_BANK_BLOCK, -(-rows // (8 * _MIN_BLOCKS)) * 8)
    pad = -rows % (block * batch_shards(mesh))
    bank = np.pad(np.asarray(bank, np.float32), ((0, pad), (0, 0)))
    bank_labels = np.pad(np.asarray(bank_labels, np.int32), (0, pad), constant_values=-1)
    num = queries.shape[0]
    chunk = max(1, min(chunk, num))
    queries = np.pad(np.asarray(queries, np.float32), ((0, -num % chunk), (0, 0)))
    with jax.set_mesh(mesh):
        bank_dev = _put(bank, NamedSharding(mesh, PartitionSpec(BATCH_AXES, None)))
        labels_dev = _put(bank_labels, NamedSharding(mesh, PartitionSpec(BATCH_AXES)))
        fn = _knn_fn(mesh, k, block, float(temperature), num_classes)
        outs = [
            fn(bank_dev, labels_dev, _put(queries[i : i + chunk], replicated(mesh)))
            for i in range(0, queries.shape[0], chunk)
        ]
        scores = [_fetch(o) for o in outs]
    return np.concatenate(scores)[:num] if scores else np.zeros((0, num_classes), np.float32)


def _check_knn_inputs(
    bank: np.ndarray, bank_labels: np.ndarray, queries: np.ndarray, num_classes: int, k: int
) -> None:
    """Raises ValueError on mismatched shapes, labels >= num_classes or k outside the bank."""
    if bank.ndim != 2 or queries.ndim != 2 or bank.shape[1] != queries.shape[1]:
        raise ValueError(f"bank {bank.shape} and queries {queries.shape} must be [rows, dim]")
    if np.shape(bank_labels) != bank.shape[:1]:
        raise ValueError(f"bank_labels {np.shape(bank_labels)} must be [{bank.shape[0]}]")
    if np.size(bank_labels) and np.max(bank_labels) >= num_classes:
        raise ValueError(f"bank label {np.max(bank_labels)} >= num_classes={num_classes}")
    if not 1 <= k <= bank.shape[0]:
        raise ValueError(f"k={k} must be in [1, {bank.shape[0]}] (the bank size)")


def topk_accuracy(
    scores: np.ndarray, labels: np.ndarray, ks: tuple[int, ...] = (1, 5)
) -> dict[int, float]:
    """Fraction (0..1) of rows whose label is among the `k` highest scores, for each k.

    scores `[rows, classes]`, labels `[rows]`; equal scores rank the lower class index first.
    """
    order = np.argsort(-np.asarray(scores), axis=1, kind="stable")
    hits = order == np.asarray(labels)[:, None]
    return {k: float(hits[:, :k].any(axis=1).mean()) if len(hits) else 0.0 for k in ks}


@dataclasses.dataclass(frozen=True)
class LinearProbeSettings:
    """MAE linear-probe hyper-parameters (lr is the actual peak lr, not per-256 scaled)."""

    epochs: int = 90
    batch_size: int = 256
    lr: float = 0.1
    weight_decay: float = 0.0
    warmup_epochs: int = 10
    momentum: float = 0.9
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class LinearProbe:
    """A trained probe: standardization `mean`, `std` `[dim]`, `kernel` `[dim, classes]`,
    `bias` `[classes]` (all float32 numpy)."""

    mean: np.ndarray
    std: np.ndarray
    kernel: np.ndarray
    bias: np.ndarray

    def logits(self, features: np.ndarray) -> np.ndarray:
        """Class logits `[rows, classes]` for features `[rows, dim]`."""
        x = (np.asarray(features, np.float32) - self.mean) / self.std
        return x @ self.kernel + self.bias


def _feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and sqrt(population var + eps), float64 sums over row chunks."""
    n = features.shape[0]
    chunks = range(0, n, _STATS_ROWS)
    mean = sum(features[i : i + _STATS_ROWS].sum(0, dtype=np.float64) for i in chunks) / n
    sq = sum(
        np.square(features[i : i + _STATS_ROWS].astype(np.float64) - mean).sum(0) for i in chunks
    )
    return mean.astype(np.float32), np.sqrt(sq / n + _BN_EPS).astype(np.float32)


def _lr_schedule(settings: LinearProbeSettings, steps_per_epoch: int) -> optax.Schedule:
    """MAE `adjust_learning_rate` at fractional epoch `count / steps_per_epoch` (min lr 0)."""
    warmup, epochs = settings.warmup_epochs, settings.epochs

    def schedule(count: jax.Array) -> jax.Array:
        epoch = count / steps_per_epoch
        warm = settings.lr * epoch / max(warmup, 1e-8)
        progress = (epoch - warmup) / max(epochs - warmup, 1e-8)
        cosine = settings.lr * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(epoch < warmup, warm, cosine)

    return schedule


def _make_step(tx: optax.GradientTransformation):
    """One SGD step of the standardized linear head on a minibatch x `[batch, dim]`, y `[batch]`."""

    def step(params, opt_state, mean, std, x, y):
        def loss_fn(p):
            logits = ((x - mean) / std) @ p["kernel"] + p["bias"]
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        updates, opt_state = tx.update(jax.grad(loss_fn)(params), opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return step


def _optimizer(settings: LinearProbeSettings, steps_per_epoch: int) -> optax.GradientTransformation:
    """torch-style SGD: decay added to the kernel's gradient, then momentum, then lr."""
    return optax.chain(
        optax.masked(
            optax.add_decayed_weights(settings.weight_decay), {"kernel": True, "bias": False}
        ),
        optax.sgd(_lr_schedule(settings, steps_per_epoch), momentum=settings.momentum),
    )


def train_linear_probe(
    features: np.ndarray,
    labels: np.ndarray,
    *,
    num_classes: int,
    settings: LinearProbeSettings,
    mesh: jax.sharding.Mesh,
) -> LinearProbe:
    """Trains a linear classifier on frozen features `[rows, dim]` with labels `[rows]`.

    Minibatches (batch clamped to `rows`, last partial batch of each epoch dropped) are drawn
    from a numpy Generator seeded with `settings.seed`, so equal inputs give equal weights.
    Rows of a minibatch are split over the batch axes when the shard count divides the batch.
    """
    features = np.asarray(features, np.float32)
    labels = np.asarray(labels, np.int32)
    n, dim = features.shape
    if labels.shape != (n,) or n == 0:
        raise ValueError(f"labels {labels.shape} must be [{n}] with at least one row")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes})")
    batch = min(settings.batch_size, n)
    steps_per_epoch = n // batch
    mean, std = _feature_stats(features)
    key = jax.random.key(settings.seed)
    kernel = 0.01 * np.asarray(jax.random.truncated_normal(key, -2.0, 2.0, (dim, num_classes)))
    params = {"kernel": kernel, "bias": np.zeros(num_classes, np.float32)}
    tx = _optimizer(settings, steps_per_epoch)
    rep = replicated(mesh)
    split = batch % batch_shards(mesh) == 0
    y_rows = NamedSharding(mesh, PartitionSpec(BATCH_AXES)) if split else rep
    x_rows = NamedSharding(mesh, PartitionSpec(BATCH_AXES, None)) if split else rep
    rng = np.random.default_rng(settings.seed)
    with jax.set_mesh(mesh):
        params = jax.tree.map(lambda a: _put(np.asarray(a, np.float32), rep), params)
        opt_state = jax.jit(tx.init, out_shardings=rep)(params)
        mean_dev, std_dev = _put(mean, rep), _put(std, rep)
        step = jax.jit(_make_step(tx), out_shardings=rep, donate_argnums=(0, 1))
        for _ in range(settings.epochs):
            order = rng.permutation(n)
            for i in range(steps_per_epoch):
                idx = np.sort(order[i * batch : (i + 1) * batch])  # sorted: faster host gather
                x, y = _put(features[idx], x_rows), _put(labels[idx], y_rows)
                params, opt_state = step(params, opt_state, mean_dev, std_dev, x, y)
        kernel, bias = _fetch(params["kernel"]), _fetch(params["bias"])
    return LinearProbe(mean=mean, std=std, kernel=kernel, bias=bias)
