"""Host-local batches: training batches in a deterministic global order, and evaluation batches
that visit a split once, in order; both sharded over hosts.

Training. Every example has a global position `p` (step * global_batch + slot). Its record is
`permutation(seed, epoch)[p % N]` with `epoch = p // N`, a new permutation each epoch; its
augmentation draws come from `np.random.default_rng([seed, AUGMENT_STREAM, p])` (and random
erasing's from `[seed, ERASE_STREAM, p]`). Both are pure functions of (config.seed, p), so
batches do not depend on the worker count, the host count or the iteration history, and
`start_step` resumes exactly. An unreadable record (`sources.BadImageError`) is replaced by
record `replacement_record(seed, p, attempt, N)` for attempts 0, 1, ... (at most
`MAX_REPLACEMENTS`), again a pure function of (config.seed, p), so a resume sees the same
replacements; the example keeps position p's augmentation draws and lists the unreadable
records it hit in 'bad_records' (counted by mim_jax.data.bad_examples). Each host reads and
decodes only the records of its own rows of every global batch: the rows its devices hold
under the batch sharding (`sharding.host_batch_rows`), so the host-local arrays land where the
mesh puts them whatever the device order. The augmentation follows `config.mode`: pretraining
crops and flips (SPEC 1.2, 2.8); fine-tuning adds RandAugment or colour jitter and random
erasing (SPEC 1.8).

Evaluation. Global batch b holds the split's examples `[b * B, (b + 1) * B)` in record order
(optionally an evenly spaced subset), resized and centre-cropped; the last batch is padded
with blank images whose `valid` is False. An unreadable image is such a blank invalid example
too (excluded from every metric), with one warning per file and process.

grain runs the pipeline: a `MapDataset` over local example numbers -> read + augment ->
batch -> normalize (+ the caller's `batch_transform`), optionally in worker processes.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import sys
from collections.abc import Callable, Iterator, Sequence

import grain
import jax
import ml_collections
import numpy as np
from PIL import Image

from mim_jax.data import augment, sources
from mim_jax.data.sources import DataError

Batch = dict[str, np.ndarray]
BatchTransform = Callable[[Batch, int], Batch]

# Tags that separate the random streams seeded from config.seed.
ORDER_STREAM = 0x0D0E
AUGMENT_STREAM = 0xA06
ERASE_STREAM = 0xE5A
REPLACE_STREAM = 0x8E9
# Replacement reads per training example before its position is given up (DataError); also
# the length K of its 'bad_records'.
MAX_REPLACEMENTS = 8
# Unreadable evaluation images already warned about in this process.
_WARNED: set[str] = set()


def dataset_size(config: ml_collections.ConfigDict, split: str | None = None) -> int:
    """Examples per epoch of `split` (default: the training split `config.data.split`)."""
    return len(sources.make_source(config.data, split or config.data.split))


def num_classes(config: ml_collections.ConfigDict) -> int:
    """Class count of the labeled training split; DataError if the source has no labels."""
    count = sources.make_source(config.data, config.data.split).num_classes
    if count <= 0:
        raise DataError(
            f"config.data: the {config.data.source} source '{config.data.split}' has no labels "
            "(use a TFDS set with a 'label' feature, class sub-folders, or the bundled photos)"
        )
    return count


@functools.lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, size: int) -> np.ndarray:
    """Record order of `epoch`: int64 `[size]`, a pure function of its arguments."""
    return np.random.default_rng([seed, ORDER_STREAM, epoch]).permutation(size)


def replacement_record(seed: int, position: int, attempt: int, size: int) -> int:
    """Record read at `position` after `attempt + 1` unreadable ones: uniform over the `size`
    records, a pure function of the arguments."""
    rng = np.random.default_rng([seed, REPLACE_STREAM, position, attempt])
    return int(rng.integers(size))


def _train_augment(config: ml_collections.ConfigDict) -> functools.partial:
    """fn(image, rng) -> uint8 `[size, size, 3]`: the augmentation of `config.mode`."""
    d = config.data
    crop = dict(
        size=config.model.img_size,
        scale=tuple(d.crop_scale),
        ratio=tuple(d.crop_ratio),
        interpolation=d.interpolation,
        hflip=d.hflip,
    )
    if config.mode != "finetune":
        return functools.partial(augment.pretrain_augment, **crop)
    return functools.partial(
        augment.finetune_augment,
        **crop,
        color_jitter=d.color_jitter,
        auto_augment=d.auto_augment,
        mean=tuple(d.mean),
    )


class _ReadExample:
    """Local example number -> augmented example at its global position (grain `map`)."""

    def __init__(
        self,
        source: sources.Source,
        config: ml_collections.ConfigDict,
        rows: np.ndarray,
    ):
        self._source = source
        self._seed = config.seed
        self._global_batch = config.batch_size
        self._rows = rows
        self._augment = _train_augment(config)

    def __call__(self, local_example: int) -> Batch:
        step, slot = divmod(local_example, len(self._rows))
        position = step * self._global_batch + int(self._rows[slot])
        epoch, in_epoch = divmod(position, len(self._source))
        record = int(epoch_permutation(self._seed, epoch, len(self._source))[in_epoch])
        image, label, bad = self._read(position, record)
        rng = np.random.default_rng([self._seed, AUGMENT_STREAM, position])
        pixels = self._augment(image, rng=rng)
        return {
            "image": pixels,
            "label": np.int32(label),
            "index": np.int64(position),
            "bad_records": np.array(bad + [-1] * (MAX_REPLACEMENTS - len(bad)), np.int64),
        }

    def _read(self, position: int, record: int) -> tuple[Image.Image, int, list[int]]:
        """(image, label) of `record` or of its first readable replacement, and the
        unreadable records read on the way; DataError after `MAX_REPLACEMENTS` replacements."""
        bad = []
        for attempt in range(MAX_REPLACEMENTS + 1):
            try:
                return (*self._source.read(record), bad)
            except sources.BadImageError:
                bad.append(record)
            record = replacement_record(self._seed, position, attempt, len(self._source))
        names = ", ".join(self._source.describe(r) for r in bad[:3])
        raise DataError(
            f"example {position}: its record and {MAX_REPLACEMENTS} replacements are all "
            f"unreadable ({names}, ...): is config.data pointing at image data?"
        )


class _FinishBatch:
    """(step, uint8 batch) -> normalized float32 batch (random erasing per example when
    `erase_prob` > 0), then the caller's transform."""

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        batch_transform: BatchTransform | None,
        *,
        seed: int = 0,
        erase_prob: float = 0.0,
    ):
        self._mean = tuple(mean)
        self._std = tuple(std)
        self._batch_transform = batch_transform
        self._seed = seed
        self._erase_prob = erase_prob

    def __call__(self, step: int, batch: Batch) -> Batch:
        images = augment.normalize(batch["image"], self._mean, self._std)
        if self._erase_prob > 0:
            images = np.stack(
                [
                    augment.random_erase(
                        image,
                        prob=self._erase_prob,
                        rng=np.random.default_rng([self._seed, ERASE_STREAM, int(position)]),
                    )
                    for image, position in zip(images, batch["index"], strict=True)
                ]
            )
        batch["image"] = images
        if self._batch_transform is not None:
            batch = self._batch_transform(batch, step)
        return batch


def host_rows(global_batch: int, process_index: int, process_count: int) -> np.ndarray:
    """Rows of a host-major layout: host p feeds the p-th contiguous block of each batch."""
    if global_batch % process_count:
        raise DataError(
            f"batch size {global_batch} is not divisible by the process count {process_count}"
        )
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index={process_index} not in [0, {process_count})")
    local = global_batch // process_count
    return np.arange(process_index * local, (process_index + 1) * local, dtype=np.int64)


def _rows(global_batch: int, rows: Sequence[int] | None) -> np.ndarray:
    """`rows` checked against the batch, or this process's host-major rows."""
    if rows is None:
        return host_rows(global_batch, jax.process_index(), jax.process_count())
    rows = np.asarray(rows, np.int64)
    if rows.ndim != 1 or not len(rows) or rows.min() < 0 or rows.max() >= global_batch:
        raise DataError(f"rows must index the global batch of {global_batch}")
    return rows


def _iterate(ds: grain.MapDataset, data: ml_collections.ConfigDict) -> Iterator[Batch]:
    """A grain iterator over `ds`, in `data.num_workers` worker processes when > 0."""
    read_options = grain.ReadOptions(num_threads=data.prefetch, prefetch_buffer_size=data.prefetch)
    iter_ds = ds.to_iter_dataset(read_options)
    if data.num_workers > 0:
        iter_ds = iter_ds.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=data.num_workers, per_worker_buffer_size=max(1, data.prefetch)
            )
        )
    return iter(iter_ds)


def make_pretrain_iterator(
    config: ml_collections.ConfigDict,
    *,
    start_step: int = 0,
    batch_transform: BatchTransform | None = None,
    rows: Sequence[int] | None = None,
    source: sources.Source | None = None,
) -> Iterator[Batch]:
    """Endless host-local training batches of `config.data.split`; the k-th one is for step
    `start_step + k` (pretraining and fine-tuning alike: the augmentation follows the mode).

    Each batch: 'image' float32 `[local_batch, H, W, 3]` (H = W = config.model.img_size,
    normalized with config.data.mean/std), 'label' int32 `[local_batch]` (-1 where the source
    has none), 'index' int64 `[local_batch]`, the global example position
    `step * batch_size + rows[i]`, with `local_batch = len(rows)`, and 'bad_records' int64
    `[local_batch, MAX_REPLACEMENTS]`, the unreadable records each example replaced, padded
    with -1 (host-only, like 'index').

    Args:
      config: the full config (`mode`, `data`, `batch_size`, `seed`, `model.img_size`).
      start_step: first step to produce; resuming at step s gives exactly the batches a fresh
        iterator gives from its s-th on.
      batch_transform: `f(batch, step) -> batch`, run inside the pipeline (in grain worker
        processes when config.data.num_workers > 0), e.g. to add host-side masks. It is
        pickled into the workers: use a top-level function or a `functools.partial` of one.
      rows: the global batch rows this host feeds, in the order of its devices' shards
        (`sharding.host_batch_rows`); default: this process's block of a host-major layout
        (`host_rows(batch_size, jax.process_index(), jax.process_count())`).
      source: the training split's source when the caller already built one (listing a
        large folder once); default: built from `config.data`.

    Returns:
      A grain iterator; call `.close()` when done to stop worker processes early.
    """
    rows = _rows(config.batch_size, rows)
    if start_step < 0:
        raise DataError(f"start_step={start_step} must be >= 0")
    d = config.data
    if source is None:
        source = sources.make_source(d, d.split)
    erase_prob = d.reprob if config.mode == "finetune" else 0.0
    finish = _FinishBatch(d.mean, d.std, batch_transform, seed=config.seed, erase_prob=erase_prob)
    ds = (
        grain.MapDataset.range(sys.maxsize)
        .map(_ReadExample(source, config, rows))
        .batch(len(rows), drop_remainder=True)
        .map_with_index(finish)
    )[start_step:]
    return _iterate(ds, d)


def eval_records(size: int, max_examples: int) -> np.ndarray:
    """Record numbers an evaluation reads: all, or `max_examples` evenly spaced ones."""
    if 0 < max_examples < size:
        return np.round(np.linspace(0, size - 1, max_examples)).astype(np.int64)
    return np.arange(size, dtype=np.int64)


class _ReadEvalExample:
    """Local example number -> resized, centre-cropped example (blank and invalid past the
    end of the split)."""

    def __init__(
        self,
        source: sources.Source,
        records: np.ndarray,
        config: ml_collections.ConfigDict,
        global_batch: int,
        rows: np.ndarray,
    ):
        self._source = source
        self._records = records
        self._global_batch = global_batch
        self._rows = rows
        self._size = config.model.img_size
        self._crop_pct = config.data.crop_pct
        self._interpolation = config.data.interpolation

    def __call__(self, local_example: int) -> Batch:
        batch, slot = divmod(local_example, len(self._rows))
        position = batch * self._global_batch + int(self._rows[slot])
        if position >= len(self._records):
            return self._blank()
        record = int(self._records[position])
        try:
            image, label = self._source.read(record)
        except sources.BadImageError as e:
            if self._source.describe(record) not in _WARNED:
                _WARNED.add(self._source.describe(record))
                logging.warning("evaluating without an unreadable image (valid=False): %s", e)
            return self._blank()
        pixels = augment.eval_transform(
            image, size=self._size, crop_pct=self._crop_pct, interpolation=self._interpolation
        )
        return {"image": pixels, "label": np.int32(label), "valid": np.bool_(True)}

    def _blank(self) -> Batch:
        """A black example that no metric counts."""
        blank = np.zeros((self._size, self._size, 3), np.uint8)
        return {"image": blank, "label": np.int32(-1), "valid": np.bool_(False)}


@dataclasses.dataclass
class EvalData:
    """One pass over an evaluation split: `batches` yields `num_batches` host-local batches
    ('image' float32, 'label' int32, 'valid' bool) of global batches of `batch_size`, covering
    `num_examples` examples."""

    batches: Iterator[Batch]
    num_examples: int
    num_batches: int
    batch_size: int


def make_eval_iterator(
    config: ml_collections.ConfigDict,
    split: str,
    *,
    batch_size: int,
    max_examples: int = 0,
    rows: Sequence[int] | None = None,
) -> EvalData:
    """One ordered pass over `split` in global batches of `batch_size` (module docstring);
    `max_examples` > 0 reads an evenly spaced subset of that many examples; `rows` as for
    `make_pretrain_iterator`."""
    rows = _rows(batch_size, rows)
    d = config.data
    source = sources.make_source(d, split)
    records = eval_records(len(source), max_examples)
    num_batches = math.ceil(len(records) / batch_size)
    read = _ReadEvalExample(source, records, config, batch_size, rows)
    ds = (
        grain.MapDataset.range(num_batches * len(rows))
        .map(read)
        .batch(len(rows), drop_remainder=True)
        .map_with_index(_FinishBatch(d.mean, d.std, None))
    )
    return EvalData(_iterate(ds, d), len(records), num_batches, batch_size)
