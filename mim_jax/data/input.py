"""Host-local pretraining batches: sources, a deterministic global order, host sharding.

Every example has a global position `p` (step * global_batch + slot). Its record is
`permutation(seed, epoch)[p % N]` with `epoch = p // N`, a new permutation each epoch; its
augmentation draws come from `np.random.default_rng([seed, AUGMENT_STREAM, p])`. Both are pure
functions of (config.seed, p), so batches do not depend on the worker count, the host count
or the iteration history, and `start_step` resumes exactly. Each host reads and decodes only
the records of its own slice `[process_index * local_batch, ...)` of every global batch.

grain runs the pipeline: a `MapDataset` over local example numbers -> read + augment ->
batch -> normalize (+ the caller's `batch_transform`), optionally in worker processes.
"""

from __future__ import annotations

import functools
import io
import os
import sys
from collections.abc import Callable, Iterator, Sequence

import grain
import jax
import ml_collections
import numpy as np
from PIL import Image

from mim_jax.data import augment

Batch = dict[str, np.ndarray]
BatchTransform = Callable[[Batch, int], Batch]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# Colour photos that scikit-image ships inside its wheel (no download needed).
BUNDLED_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "rocket",
)
# Tags that separate the random streams seeded from config.seed.
ORDER_STREAM = 0x0D0E
AUGMENT_STREAM = 0xA06


class DataError(ValueError):
    """The data cannot be read as configured; the one-line message says what to do."""


def _decode(data: bytes | str, name: str) -> Image.Image:
    """Encoded image bytes or a file path -> RGB PIL image; DataError naming `name`."""
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
            return image.convert("RGB")
    except Exception as e:  # PIL raises many types for bad files.
        reason = " ".join(str(e).split())
        raise DataError(f"cannot decode image {name}: {type(e).__name__}: {reason}") from e


class _TfdsSource:
    """A TFDS split prepared as array_record, read by record number."""

    def __init__(self, name: str, split: str, data_dir: str):
        import tensorflow_datasets as tfds  # Heavy; only this source needs it.

        try:
            builder = tfds.builder(name, data_dir=data_dir or None)
        except tfds.core.DatasetNotFoundError as e:
            raise DataError(f"TFDS has no data set named '{name}' (config.data.name)") from e
        root = builder.data_dir_root
        if not builder.is_prepared():
            manual = ""
            if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
                manual = (
                    f"place its source files (for imagenet2012: ILSVRC2012_img_train.tar and "
                    f"ILSVRC2012_img_val.tar) in {root}/downloads/manual, then "
                )
            raise DataError(
                f"TFDS data set '{name}' is not prepared in {root}: {manual}run `tfds build "
                f"{name} --data_dir={root} --file_format=array_record` (mim_jax needs the "
                f"array_record format for random access), or set config.data.tfds_data_dir"
            )
        file_format = builder.info.file_format
        if file_format not in tfds.core.file_adapters.FileFormat.with_random_access():
            raise DataError(
                f"TFDS data set '{name}' in {root} is stored as {file_format.value}, which has "
                f"no random access: rebuild it with `tfds build {name} --data_dir={root} "
                f"--file_format=array_record`"
            )
        features = builder.info.features
        if "image" not in features:
            raise DataError(f"TFDS data set '{name}' has no 'image' feature")
        self._has_label = "label" in features
        self._where = f"{name}[{split}]"
        try:
            self._source = builder.as_data_source(
                split=split, decoders={"image": tfds.decode.SkipDecoding()}
            )
        except (KeyError, ValueError) as e:
            splits = ", ".join(sorted(builder.info.splits))
            raise DataError(
                f"config.data.split='{split}' is not a split of TFDS '{name}' ({splits})"
            ) from e

    def __len__(self) -> int:
        return len(self._source)

    def read(self, record: int) -> tuple[Image.Image, int]:
        example = self._source[record]
        image = _decode(example["image"], f"{self._where} record {record}")
        return image, int(example["label"]) if self._has_label else -1


class _FolderSource:
    """Class sub-folders (label = index of the sorted folder name) or a flat folder (-1)."""

    def __init__(self, folder: str):
        if not os.path.isdir(folder):
            raise DataError(f"config.data.folder='{folder}' is not a directory")
        self._root = folder
        with os.scandir(folder) as entries:
            names = sorted(e.name for e in entries if not e.name.startswith("."))
        classes = [n for n in names if os.path.isdir(os.path.join(folder, n))]
        loose = [n for n in names if _is_image(n) and os.path.isfile(os.path.join(folder, n))]
        files, labels = [], []
        for label, name in enumerate(classes):
            for path in _images_under(os.path.join(folder, name)):
                files.append(os.path.relpath(path, folder))
                labels.append(label)
        if files and loose:
            raise DataError(
                f"config.data.folder='{folder}' mixes loose images ({loose[0]}, ...) with class "
                f"sub-folders: use one layout"
            )
        if not files:
            files, labels = loose, [-1] * len(loose)
        if not files:
            raise DataError(
                f"config.data.folder='{folder}' holds no images ({'/'.join(IMAGE_EXTENSIONS)}) "
                f"directly or in class sub-folders"
            )
        self._files = files
        self._labels = labels

    def __len__(self) -> int:
        return len(self._files)

    def read(self, record: int) -> tuple[Image.Image, int]:
        path = os.path.join(self._root, self._files[record])
        return _decode(path, path), self._labels[record]


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _images_under(directory: str) -> list[str]:
    """Image files below `directory`, recursively, in a deterministic (sorted) order."""
    found = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(os.path.join(dirpath, f) for f in sorted(filenames) if _is_image(f))
    return found


@functools.cache
def _bundled_photos() -> tuple[Image.Image, ...]:
    """scikit-image's sample colour photos as RGB PIL images (loaded once per process)."""
    from skimage import data as skimage_data

    try:
        return tuple(
            Image.fromarray(getattr(skimage_data, name)()).convert("RGB") for name in BUNDLED_PHOTOS
        )
    except Exception as e:
        raise DataError(f"cannot load the scikit-image sample photos: {e}") from e


class _BundledSource:
    """`num_examples` virtual records; record r is photo r % n_photos with label = photo id."""

    def __init__(self, num_examples: int):
        if num_examples <= 0:
            raise DataError(f"config.data.num_examples={num_examples} must be > 0")
        self._num_examples = num_examples

    def __len__(self) -> int:
        return self._num_examples

    def read(self, record: int) -> tuple[Image.Image, int]:
        photo = record % len(BUNDLED_PHOTOS)
        return _bundled_photos()[photo], photo


Source = _TfdsSource | _FolderSource | _BundledSource


def _make_source(data: ml_collections.ConfigDict) -> Source:
    if data.source == "tfds":
        return _TfdsSource(data.name, data.split, data.tfds_data_dir)
    if data.source == "folder":
        return _FolderSource(data.folder)
    if data.source == "bundled":
        return _BundledSource(data.num_examples)
    raise DataError(f"config.data.source='{data.source}' must be one of tfds, folder, bundled")


def dataset_size(config: ml_collections.ConfigDict) -> int:
    """Examples per epoch of the configured source (bundled: config.data.num_examples)."""
    return len(_make_source(config.data))


@functools.lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, size: int) -> np.ndarray:
    """Record order of `epoch`: int64 `[size]`, a pure function of its arguments."""
    return np.random.default_rng([seed, ORDER_STREAM, epoch]).permutation(size)


class _ReadExample:
    """Local example number -> augmented example at its global position (grain `map`)."""

    def __init__(
        self,
        source: Source,
        config: ml_collections.ConfigDict,
        local_batch: int,
        process_index: int,
    ):
        self._source = source
        self._seed = config.seed
        self._global_batch = config.batch_size
        self._local_batch = local_batch
        self._offset = process_index * local_batch
        d = config.data
        self._augment = dict(
            size=config.model.img_size,
            scale=tuple(d.crop_scale),
            ratio=tuple(d.crop_ratio),
            interpolation=d.interpolation,
            hflip=d.hflip,
        )

    def __call__(self, local_example: int) -> Batch:
        step, slot = divmod(local_example, self._local_batch)
        position = step * self._global_batch + self._offset + slot
        epoch, in_epoch = divmod(position, len(self._source))
        record = int(epoch_permutation(self._seed, epoch, len(self._source))[in_epoch])
        image, label = self._source.read(record)
        rng = np.random.default_rng([self._seed, AUGMENT_STREAM, position])
        pixels = augment.pretrain_augment(image, rng=rng, **self._augment)
        return {"image": pixels, "label": np.int32(label), "index": np.int64(position)}


class _FinishBatch:
    """(step, uint8 batch) -> normalized float32 batch, then the caller's transform."""

    def __init__(
        self, mean: Sequence[float], std: Sequence[float], batch_transform: BatchTransform | None
    ):
        self._mean = tuple(mean)
        self._std = tuple(std)
        self._batch_transform = batch_transform

    def __call__(self, step: int, batch: Batch) -> Batch:
        batch["image"] = augment.normalize(batch["image"], self._mean, self._std)
        if self._batch_transform is not None:
            batch = self._batch_transform(batch, step)
        return batch


def make_pretrain_iterator(
    config: ml_collections.ConfigDict,
    *,
    start_step: int = 0,
    batch_transform: BatchTransform | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[Batch]:
    """Endless host-local pretraining batches; the k-th one is for step `start_step + k`.

    Each batch: 'image' float32 `[local_batch, H, W, 3]` (H = W = config.model.img_size,
    normalized with config.data.mean/std), 'label' int32 `[local_batch]` (-1 where the source
    has none) and 'index' int64 `[local_batch]`, the global example position
    `step * batch_size + process_index * local_batch + i`, with
    `local_batch = config.batch_size // process_count`.

    Args:
      config: the full config (`data`, `batch_size`, `seed`, `model.img_size`).
      start_step: first step to produce; resuming at step s gives exactly the batches a fresh
        iterator gives from its s-th on.
      batch_transform: `f(batch, step) -> batch`, run inside the pipeline (in grain worker
        processes when config.data.num_workers > 0), e.g. to add host-side masks. It is
        pickled into the workers: use a top-level function or a `functools.partial` of one.
      process_index, process_count: this host and the host count; default
        `jax.process_index()` / `jax.process_count()`.

    Returns:
      A grain iterator; call `.close()` when done to stop worker processes early.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if config.batch_size % process_count:
        raise DataError(
            f"config.batch_size={config.batch_size} is not divisible by the process count "
            f"{process_count}"
        )
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index={process_index} not in [0, {process_count})")
    if start_step < 0:
        raise DataError(f"start_step={start_step} must be >= 0")
    local_batch = config.batch_size // process_count
    d = config.data
    source = _make_source(d)
    ds = (
        grain.MapDataset.range(sys.maxsize)
        .map(_ReadExample(source, config, local_batch, process_index))
        .batch(local_batch, drop_remainder=True)
        .map_with_index(_FinishBatch(d.mean, d.std, batch_transform))
    )[start_step:]
    read_options = grain.ReadOptions(num_threads=d.prefetch, prefetch_buffer_size=d.prefetch)
    iter_ds = ds.to_iter_dataset(read_options)
    if d.num_workers > 0:
        iter_ds = iter_ds.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=d.num_workers, per_worker_buffer_size=max(1, d.prefetch)
            )
        )
    return iter(iter_ds)
