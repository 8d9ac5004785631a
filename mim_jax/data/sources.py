"""Random-access image sources, one per (data set, split): TFDS array_record, class folders and
the bundled scikit-image photos. `read(record)` gives an RGB PIL image and an int label (-1
where the source has none); `num_classes` is 0 for unlabeled sources.

Splits: `config.data.split` (training) and `config.data.val_split` (evaluation) name TFDS
splits; a folder source reads `<folder>/<split>` (with `validation` and `val` accepted for
each other), or the folder itself for the training split when it has no split sub-folders
(pretraining on a plain image folder); the bundled photos hold out the bottom quarter of every
photo for validation, so no pixel is shared between its splits.

Decoding (`decode`) applies the EXIF orientation and turns every PIL mode into RGB; a file that
cannot be decoded raises `BadImageError`, which the training pipeline answers by reading a
replacement record and the evaluation pipeline by an invalid blank example
(mim_jax.data.input). `describe(record)` names a record in messages: its file path, its TFDS
`name[split] record r`, or its bundled photo.
"""

from __future__ import annotations

import functools
import io
import os

import ml_collections
import numpy as np
from PIL import Image, ImageOps

from mim_jax.data import augment

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
BUNDLED_VAL_FRACTION = 0.25  # Bottom rows of each photo that only the validation split reads.
BUNDLED_VAL_CROPS = 16  # Validation crops per photo, evenly spaced along the held-out band.
BUNDLED_TRAIN_SCALE = (0.25, 1.0)  # Area fraction of the training region per train record.
BUNDLED_STREAM = 0xB0D1  # Seeds the fixed crop box of each bundled training record.
VAL_SPLIT_NAMES = ("validation", "val")
# Colour that transparent pixels are composited over (what an image viewer shows on a page).
ALPHA_BACKGROUND = (255, 255, 255)


class DataError(ValueError):
    """The data cannot be read as configured; the one-line message says what to do."""


class BadImageError(DataError):
    """One image cannot be decoded (truncated, empty, not an image, missing, too many pixels);
    the message names it. The pipelines replace or skip it (mim_jax.data.input)."""


def decode(data: bytes | str, name: str) -> Image.Image:
    """Encoded image bytes or a file path -> upright RGB PIL image (`to_rgb`).

    The EXIF orientation, if any, is applied (`ImageOps.exif_transpose`), so the pixels are
    the way a viewer shows them. Raises BadImageError naming `name` when PIL cannot open or
    fully load the image (truncated, zero bytes, not an image, a missing file or broken link)
    or it has more than `PIL.Image.MAX_IMAGE_PIXELS` pixels (a decompression bomb; PIL itself
    refuses twice that many before reading any pixel).
    """
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
            limit = Image.MAX_IMAGE_PIXELS
            if limit and image.width * image.height > limit:
                raise Image.DecompressionBombError(
                    f"{image.width}x{image.height} pixels exceed PIL.Image.MAX_IMAGE_PIXELS={limit}"
                )
            image.load()
            ImageOps.exif_transpose(image, in_place=True)
    except Exception as e:  # PIL raises many types for bad files.
        reason = " ".join(str(e).split())
        raise BadImageError(f"cannot decode image {name}: {type(e).__name__}: {reason}") from e
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """A loaded PIL image of any mode -> RGB.

    Integer greyscale ('I;16', 'I;16B', 'I;16L', 'I;16N', 'I': what 16-bit PNG and TIFF
    decoders give) is scaled `round(v * 255 / 65535)` after clipping to [0, 65535], so 65535
    -> 255 (PIL's own conversion clips every value above 255 to 255). Alpha (RGBA, LA, PA,
    premultiplied modes) and transparency (a palette's transparent entries, a tRNS colour) are
    composited over white `ALPHA_BACKGROUND`: transparent pixels have no defined colour, and
    torchvision's loader, which drops alpha, shows whatever the encoder left there (often
    black). Opaque images are unaffected, so they match torchvision's `convert('RGB')`.
    Every other mode ('1', 'L', 'P', 'CMYK', 'YCbCr', ...) uses PIL's conversion (CMYK:
    `R = (255 - C) * (255 - K) / 255`, likewise G, B; Adobe's inverted CMYK JPEGs are
    un-inverted by PIL's decoder).
    """
    if image.mode.startswith("I"):
        values = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        grey = (values * 255 + 65535 // 2) // 65535
        return Image.fromarray(grey.astype(np.uint8), "L").convert("RGB")
    if image.has_transparency_data:
        background = Image.new("RGBA", image.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


class TfdsSource:
    """A TFDS split prepared as array_record, read by record number."""

    def __init__(self, name: str, split: str, data_dir: str):
        import tensorflow_datasets as tfds  # Heavy; only this source needs it.

        try:
            builder = tfds.builder(name, data_dir=data_dir or None)
        except tfds.core.DatasetNotFoundError as e:
            raise DataError(f"TFDS has no data set named '{name}' (config.data.name)") from e
        _check_prepared(tfds, builder, name)
        features = builder.info.features
        if "image" not in features:
            raise DataError(f"TFDS data set '{name}' has no 'image' feature")
        self._has_label = "label" in features
        self.num_classes = int(features["label"].num_classes) if self._has_label else 0
        self._where = f"{name}[{split}]"
        try:
            self._source = builder.as_data_source(
                split=split, decoders={"image": tfds.decode.SkipDecoding()}
            )
        except (KeyError, ValueError) as e:
            splits = ", ".join(sorted(builder.info.splits))
            raise DataError(f"'{split}' is not a split of TFDS '{name}' ({splits})") from e

    def __len__(self) -> int:
        return len(self._source)

    def describe(self, record: int) -> str:
        """`name[split] record r`, for messages."""
        return f"{self._where} record {record}"

    def read(self, record: int) -> tuple[Image.Image, int]:
        example = self._source[record]
        image = decode(example["image"], self.describe(record))
        return image, int(example["label"]) if self._has_label else -1


def _check_prepared(tfds, builder, name: str) -> None:
    """DataError with the build command unless the builder is prepared as array_record."""
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


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _images_under(directory: str) -> list[str]:
    """Image files below `directory`, recursively, in a deterministic (sorted) order."""
    found = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(os.path.join(dirpath, f) for f in sorted(filenames) if _is_image(f))
    return found


def _listing(folder: str) -> tuple[list[str], list[str]]:
    """(class sub-folder names, loose image file names) of `folder`, sorted."""
    with os.scandir(folder) as entries:
        names = sorted(e.name for e in entries if not e.name.startswith("."))
    classes = [n for n in names if os.path.isdir(os.path.join(folder, n))]
    loose = [n for n in names if _is_image(n) and os.path.isfile(os.path.join(folder, n))]
    return classes, loose


class FolderSource:
    """Class sub-folders (label = index of the class name in `classes`, by default the sorted
    sub-folders of `folder`) or a flat folder of images (label -1; an error when the training
    split's `classes` are given)."""

    def __init__(self, folder: str, classes: list[str] | None = None):
        if not os.path.isdir(folder):
            raise DataError(f"config.data.folder: '{folder}' is not a directory")
        self._root = folder
        found, loose = _listing(folder)
        labeled_split = bool(classes)  # The training split (classes given) has class folders.
        classes = found if classes is None else classes
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise DataError(
                f"'{folder}' has class folders missing from the training split: "
                f"{', '.join(unknown[:3])}"
            )
        files, labels = [], []
        for label, name in enumerate(classes):
            if name in found:
                for path in _images_under(os.path.join(folder, name)):
                    files.append(os.path.relpath(path, folder))
                    labels.append(label)
        if files and loose:
            raise DataError(
                f"'{folder}' mixes loose images ({loose[0]}, ...) with class sub-folders: "
                "use one layout"
            )
        self.num_classes = len(classes) if files else 0
        if not files and loose and labeled_split:
            raise DataError(
                f"'{folder}' holds loose images ({loose[0]}, ...) but the training split has "
                "class folders: put them in the same class sub-folders"
            )
        if not files:
            files, labels = loose, [-1] * len(loose)
        if not files:
            raise DataError(
                f"'{folder}' holds no images ({'/'.join(IMAGE_EXTENSIONS)}) directly or in "
                "class sub-folders"
            )
        self._files = files
        self._labels = labels

    def __len__(self) -> int:
        return len(self._files)

    def describe(self, record: int) -> str:
        """The record's file path."""
        return os.path.join(self._root, self._files[record])

    def read(self, record: int) -> tuple[Image.Image, int]:
        path = self.describe(record)
        return decode(path, path), self._labels[record]


def _split_folder(data: ml_collections.ConfigDict, split: str) -> str:
    """The folder of `split` under `config.data.folder` (module docstring)."""
    root = data.folder
    if not os.path.isdir(root):
        raise DataError(f"config.data.folder='{root}' is not a directory")
    names = VAL_SPLIT_NAMES if split in VAL_SPLIT_NAMES else (split,)
    for name in names:
        if os.path.isdir(os.path.join(root, name)):
            return os.path.join(root, name)
    if split == data.split:
        held_out = [n for n in VAL_SPLIT_NAMES if os.path.isdir(os.path.join(root, n))]
        if held_out:  # Else the validation folder would be read as a training class.
            raise DataError(
                f"config.data.folder='{root}' has a '{held_out[0]}' sub-folder but no "
                f"'{split}' one: put the training class folders in {split}/"
            )
        return root
    raise DataError(
        f"config.data.folder='{root}' has no '{split}' sub-folder (splits are sub-folders of "
        "class folders, e.g. train/ and val/)"
    )


@functools.cache
def bundled_photos() -> tuple[Image.Image, ...]:
    """scikit-image's sample colour photos as RGB PIL images (loaded once per process)."""
    from skimage import data as skimage_data

    try:
        return tuple(
            Image.fromarray(getattr(skimage_data, name)()).convert("RGB") for name in BUNDLED_PHOTOS
        )
    except Exception as e:
        raise DataError(f"cannot load the scikit-image sample photos: {e}") from e


def bundled_regions(photo: Image.Image) -> tuple[tuple[int, int], tuple[int, int]]:
    """(train rows, validation rows) of a photo as [start, stop) ranges: the bottom
    `BUNDLED_VAL_FRACTION` of the rows is validation, the rest training."""
    split_row = photo.height - int(photo.height * BUNDLED_VAL_FRACTION)
    return (0, split_row), (split_row, photo.height)


class BundledSource:
    """The bundled photos as a labeled set (label = photo id).

    Training records (`num_examples` of them): record r is a fixed crop of photo
    `r % n_photos`'s training region, its box drawn like a RandomResizedCrop (area
    `BUNDLED_TRAIN_SCALE`) from a generator seeded by r. Validation records: record r is the
    `r // n_photos`-th of `BUNDLED_VAL_CROPS` square crops, evenly spaced along photo
    `r % n_photos`'s held-out bottom band. Training and validation share no pixel.
    """

    def __init__(self, split: str, num_examples: int):
        if num_examples <= 0:
            raise DataError(f"config.data.num_examples={num_examples} must be > 0")
        self.is_val = split in VAL_SPLIT_NAMES
        if not self.is_val and split != "train":
            raise DataError(f"the bundled photos have splits train and validation, not '{split}'")
        self.num_classes = len(BUNDLED_PHOTOS)
        self._num_examples = self.num_classes * BUNDLED_VAL_CROPS if self.is_val else num_examples

    def __len__(self) -> int:
        return self._num_examples

    def describe(self, record: int) -> str:
        """The photo the record is cut from, for messages."""
        split = "validation" if self.is_val else "train"
        photo = BUNDLED_PHOTOS[record % self.num_classes]
        return f"bundled photo {photo} ({split} record {record})"

    def read(self, record: int) -> tuple[Image.Image, int]:
        label = record % self.num_classes
        photo = bundled_photos()[label]
        (top, bottom), (val_top, val_bottom) = bundled_regions(photo)
        if self.is_val:
            side = min(val_bottom - val_top, photo.width)
            left = (record // self.num_classes) * (photo.width - side) // (BUNDLED_VAL_CROPS - 1)
            return photo.crop((left, val_top, left + side, val_top + side)), label
        rng = np.random.default_rng([BUNDLED_STREAM, record])
        y, x, h, w = augment.sample_crop_box(
            bottom - top, photo.width, BUNDLED_TRAIN_SCALE, (3 / 4, 4 / 3), rng
        )
        return photo.crop((x, top + y, x + w, top + y + h)), label


Source = TfdsSource | FolderSource | BundledSource


def make_source(data: ml_collections.ConfigDict, split: str) -> Source:
    """The source of `split` for `config.data` (see the module docstring for split names)."""
    if data.source == "tfds":
        return TfdsSource(data.name, split, data.tfds_data_dir)
    if data.source == "folder":
        classes = None
        if split != data.split:  # Labels follow the training split's class folders.
            train = _split_folder(data, data.split)
            classes = _listing(train)[0]
        return FolderSource(_split_folder(data, split), classes)
    if data.source == "bundled":
        return BundledSource(split, data.num_examples)
    raise DataError(f"config.data.source='{data.source}' must be one of tfds, folder, bundled")
