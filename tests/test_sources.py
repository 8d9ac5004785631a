"""Tests for mim_jax/data/sources.py: disjoint bundled splits, folder splits, TFDS splits and
the class counts that `input.num_classes` reads from them."""

import io

import ml_collections
import numpy as np
import pytest
from PIL import Image

from mim_jax.data import input as input_lib
from mim_jax.data import sources

NUM_TRAIN_READ = 210  # Training records checked: 30 per photo.


def _data(**overrides) -> ml_collections.ConfigDict:
    """The `config.data` fields that sources read."""
    d = ml_collections.ConfigDict(
        dict(
            source="bundled",
            name="",
            split="train",
            val_split="validation",
            tfds_data_dir="",
            folder="",
            num_examples=1000,
        )
    )
    d.update(overrides)
    return d


def _coordinate_photo(width: int, height: int) -> Image.Image:
    """RGB image whose pixel (row, col) holds `row * 2048 + col` in base 256 (R lowest)."""
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    code = rows * 2048 + cols
    pixels = np.stack([code % 256, code // 256 % 256, code // 65536], axis=-1).astype(np.uint8)
    return Image.fromarray(pixels)


def _coordinates(image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) in the source photo of every pixel of a crop of a coordinate photo, `[h, w]`."""
    pixels = np.asarray(image).astype(np.int64)
    code = pixels[..., 0] + 256 * pixels[..., 1] + 65536 * pixels[..., 2]
    return code // 2048, code % 2048


def _check_box(image: Image.Image) -> tuple[int, int]:
    """(top, left) of `image`, checking it is an unscaled rectangle of its photo."""
    rows, cols = _coordinates(image)
    top, left = int(rows[0, 0]), int(cols[0, 0])
    want_rows, want_cols = np.meshgrid(
        top + np.arange(image.height), left + np.arange(image.width), indexing="ij"
    )
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_array_equal(cols, want_cols)
    return top, left


@pytest.fixture(scope="module")
def coordinate_photos():
    """Coordinate photos with the sizes of the real bundled photos, and their split rows."""
    photos = tuple(_coordinate_photo(*p.size) for p in sources.bundled_photos())
    split_rows = [p.height - int(p.height * sources.BUNDLED_VAL_FRACTION) for p in photos]
    return photos, split_rows


@pytest.fixture
def patched(coordinate_photos, monkeypatch):
    photos, split_rows = coordinate_photos
    monkeypatch.setattr(sources, "bundled_photos", lambda: photos)
    return photos, split_rows


def test_bundled_regions_hold_out_the_bottom_quarter(coordinate_photos):
    photos, split_rows = coordinate_photos
    for photo, split in zip(photos, split_rows, strict=True):
        train, val = sources.bundled_regions(photo)
        assert train == (0, split) and val == (split, photo.height)
        assert 0.24 < (photo.height - split) / photo.height <= 0.26


def test_bundled_validation_reads_only_held_out_rows(patched):
    photos, split_rows = patched
    val = sources.make_source(_data(), "validation")
    n = len(photos)
    assert len(val) == n * sources.BUNDLED_VAL_CROPS and val.num_classes == n
    lefts = {}
    for record in range(len(val)):
        image, label = val.read(record)
        assert label == record % n
        photo, split = photos[label], split_rows[label]
        top, left = _check_box(image)
        assert image.width == image.height == min(photo.height - split, photo.width)
        assert top >= split and top + image.height <= photo.height, record
        assert left + image.width <= photo.width, record
        lefts.setdefault(label, []).append((left, image.width))
    for label, boxes in lefts.items():
        # Evenly spaced (to a pixel) from the left edge to the right edge of the photo.
        (first, side), (last, _) = boxes[0], boxes[-1]
        assert first == 0 and last == photos[label].width - side
        steps = np.diff([left for left, _ in boxes])
        assert len(boxes) == sources.BUNDLED_VAL_CROPS and steps.max() - steps.min() <= 1
    # "val" names the same split.
    np.testing.assert_array_equal(
        np.asarray(sources.make_source(_data(), "val").read(9)[0]), np.asarray(val.read(9)[0])
    )


def test_bundled_training_reads_only_training_rows(patched):
    photos, split_rows = patched
    train = sources.make_source(_data(), "train")
    again = sources.make_source(_data(), "train")
    assert len(train) == 1000 and train.num_classes == len(photos)
    boxes = set()
    for record in range(NUM_TRAIN_READ):
        image, label = train.read(record)
        assert label == record % len(photos)
        top, left = _check_box(image)
        assert top + image.height <= split_rows[label], record
        assert left + image.width <= photos[label].width, record
        area = image.width * image.height / (split_rows[label] * photos[label].width)
        assert sources.BUNDLED_TRAIN_SCALE[0] * 0.98 <= area <= 1.0
        same, same_label = again.read(record)
        assert same_label == label
        np.testing.assert_array_equal(np.asarray(same), np.asarray(image))
        boxes.add((label, top, left, image.size))
    assert len(boxes) > 0.9 * NUM_TRAIN_READ  # Varied crops.


def test_bundled_rejects_other_splits():
    with pytest.raises(sources.DataError, match="not 'test'"):
        sources.make_source(_data(), "test")


def _write_png(path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((6, 8, 3), value, np.uint8)).save(path)


def _labels(source) -> list[tuple[int, int]]:
    """(pixel value, label) of every record."""
    out = []
    for record in range(len(source)):
        image, label = source.read(record)
        out.append((int(np.asarray(image)[0, 0, 0]), label))
    return out


@pytest.fixture
def split_folder(tmp_path):
    """train/{a,b,c} (values 10+, 20+, 30+) and val/{a,c} (values 110, 130)."""
    for name, value in (("a", 10), ("b", 20), ("c", 30)):
        for k in range(2):
            _write_png(tmp_path / "train" / name / f"{k}.png", value + k)
    for name, value in (("a", 110), ("c", 130)):
        _write_png(tmp_path / "val" / name / "0.png", value)
    return tmp_path


def test_folder_splits_share_the_training_class_indices(split_folder):
    data = _data(source="folder", folder=str(split_folder))
    train = sources.make_source(data, "train")
    assert train.num_classes == 3
    assert _labels(train) == [(10, 0), (11, 0), (20, 1), (21, 1), (30, 2), (31, 2)]
    for name in ("validation", "val"):
        val = sources.make_source(data, name)
        assert val.num_classes == 3
        assert _labels(val) == [(110, 0), (130, 2)]
    assert input_lib.num_classes(ml_collections.ConfigDict(dict(data=data))) == 3


def test_folder_validation_class_missing_from_training(split_folder):
    _write_png(split_folder / "val" / "d" / "0.png", 140)
    data = _data(source="folder", folder=str(split_folder))
    with pytest.raises(sources.DataError, match="missing from the training split: d"):
        sources.make_source(data, "validation")


def test_folder_layouts_that_would_mislabel(split_folder):
    data = _data(source="folder", folder=str(split_folder))
    for name in ("a", "c"):
        (split_folder / "val" / name / "0.png").rename(split_folder / "val" / f"{name}.png")
    with pytest.raises(sources.DataError, match=r"loose images .* training split has class"):
        sources.make_source(data, "validation")
    # val/ beside class folders without train/: val/ must not become a training class.
    (split_folder / "train").rename(split_folder / "x")
    with pytest.raises(sources.DataError, match="has a 'val' sub-folder but no 'train' one"):
        sources.make_source(data, "train")


def test_plain_class_folder_is_the_training_split(tmp_path):
    for name, value in (("x", 50), ("y", 60)):
        _write_png(tmp_path / name / "0.png", value)
    data = _data(source="folder", folder=str(tmp_path))
    assert _labels(sources.make_source(data, "train")) == [(50, 0), (60, 1)]
    with pytest.raises(sources.DataError, match="has no 'validation' sub-folder") as error:
        sources.make_source(data, "validation")
    assert "\n" not in str(error.value)


def test_folder_errors_and_unlabeled_class_count(tmp_path):
    missing = _data(source="folder", folder=str(tmp_path / "missing"))
    for split in ("train", "validation"):
        with pytest.raises(sources.DataError, match="is not a directory"):
            sources.make_source(missing, split)
    for k in range(2):
        _write_png(tmp_path / "flat" / f"{k}.png", k)
    flat = _data(source="folder", folder=str(tmp_path / "flat"))
    assert sources.make_source(flat, "train").num_classes == 0
    with pytest.raises(sources.DataError, match="has no labels"):
        input_lib.num_classes(ml_collections.ConfigDict(dict(data=flat)))


def test_bundled_class_count():
    assert input_lib.num_classes(ml_collections.ConfigDict(dict(data=_data()))) == 7


def _build_tiny_tfds(data_dir: str) -> None:
    """A 5-class image set with a 10-example train and a 6-example test split, offline."""
    import tensorflow_datasets as tfds

    class TinySplits(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
                    "label": tfds.features.ClassLabel(num_classes=5),
                }
            )
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            del dl_manager
            return {
                "train": self._generate_examples(0, 10),
                "test": self._generate_examples(10, 16),
            }

        def _generate_examples(self, start=0, stop=0):
            for k in range(start, stop):
                encoded = io.BytesIO()
                Image.fromarray(np.full((8, 12, 3), 10 * k, np.uint8)).save(encoded, format="PNG")
                encoded.seek(0)
                yield k, {"image": encoded, "label": k % 5}

    TinySplits(data_dir=data_dir, file_format="array_record").download_and_prepare()


def test_tfds_splits_and_class_count(tmp_path):
    _build_tiny_tfds(str(tmp_path))
    data = _data(source="tfds", name="tiny_splits", tfds_data_dir=str(tmp_path))
    test = sources.make_source(data, "test")
    assert len(test) == 6 and test.num_classes == 5
    # Image k is flat grey 10k with label k % 5: recover k from the pixels.
    keys = [(value // 10, label) for value, label in _labels(test)]
    assert sorted(k for k, _ in keys) == list(range(10, 16))
    assert all(label == k % 5 for k, label in keys)
    assert len(sources.make_source(data, "train")) == 10
    assert input_lib.num_classes(ml_collections.ConfigDict(dict(data=data))) == 5
    with pytest.raises(sources.DataError, match="'validation' is not a split"):
        sources.make_source(data, "validation")
