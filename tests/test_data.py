"""Tests for mim_jax/data: crop sampling, normalization, order, resume, sharding, sources."""

import functools
import importlib.util
import io
import math
import pathlib

import helpers
import numpy as np
import pytest
from PIL import Image

from mim_jax.data import augment, sources
from mim_jax.data import input as input_lib

CONFIGS = pathlib.Path(__file__).parents[1] / "configs"


def _config(**data_overrides):
    spec = importlib.util.spec_from_file_location("simmim_config", CONFIGS / "simmim.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config("quickstart")
    c.model.img_size = 32
    c.batch_size = 8
    c.seed = 7
    c.data.num_workers = 0
    c.data.prefetch = 0  # Synchronous: reads happen only for batches asked for.
    c.data.update(data_overrides)
    return c


def _first_batches(config, count, **kwargs):
    it = input_lib.make_pretrain_iterator(config, **kwargs)
    batches = [next(it) for _ in range(count)]
    it.close()
    return batches


def _write_image(path, seed, size=(40, 56)):
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


@pytest.fixture
def class_folder(tmp_path):
    """8 classes with one image each (label == record identity), sorted names != creation."""
    for k, name in enumerate(["h", "g", "f", "e", "d", "c", "b", "a"]):
        ext = [".png", ".JPG", ".PnG", ".bmp"][k % 4]
        _write_image(tmp_path / "data" / f"class_{name}" / f"img{k}{ext}", seed=k)
    (tmp_path / "data" / "class_a" / "notes.txt").write_text("not an image")
    return tmp_path / "data"


def _reference_crop_box(height, width, scale, ratio, rng):
    """torchvision RandomResizedCrop.get_params, transcribed with the same random draws."""
    area = height * width
    for _attempt in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w = round(math.sqrt(target_area * aspect_ratio))
        h = round(math.sqrt(target_area / aspect_ratio))
        if 0 < w <= width and 0 < h <= height:
            i = rng.integers(0, height - h + 1)
            j = rng.integers(0, width - w + 1)
            return i, j, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = round(w / min(ratio))
    elif in_ratio > max(ratio):
        h = height
        w = round(h * max(ratio))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@pytest.mark.parametrize(
    "height,width,scale",
    [(300, 400, (0.67, 1.0)), (64, 48, (0.08, 1.0)), (50, 200, (0.9, 1.0)), (9, 9, (0.5, 1.0))],
)
def test_crop_box_matches_torchvision_reference(height, width, scale):
    ratio = (3 / 4, 4 / 3)
    for seed in range(300):
        got = augment.sample_crop_box(height, width, scale, ratio, np.random.default_rng(seed))
        want = _reference_crop_box(height, width, scale, ratio, np.random.default_rng(seed))
        assert got == tuple(int(v) for v in want), (seed, got, want)


def test_crop_box_statistics_and_fallback():
    height, width, scale, ratio = 300, 400, (0.67, 1.0), (3 / 4, 4 / 3)
    boxes = np.array(
        [
            augment.sample_crop_box(height, width, scale, ratio, np.random.default_rng(s))
            for s in range(2000)
        ]
    )
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    frac = h * w / (height * width)
    aspect = w / h
    # Rounding to whole pixels moves the area and ratio by well under 1 %.
    assert frac.min() > scale[0] * 0.99 and frac.max() <= 1.0
    assert aspect.min() > ratio[0] * 0.99 and aspect.max() < ratio[1] * 1.01
    assert frac.max() > 0.95 and frac.min() < 0.7  # The whole range is used.
    # No attempt can fit a 1000x10 image: torchvision's centred fallback, clamped ratio.
    rng = np.random.default_rng(0)
    assert augment.sample_crop_box(10, 1000, scale, ratio, rng) == (0, 493, 10, 13)
    assert augment.sample_crop_box(1000, 10, scale, ratio, rng) == (493, 0, 13, 10)


def test_pretrain_augment_crop_resize_and_flip():
    pixels = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    whole = np.asarray(image.resize((16, 16), Image.Resampling.BICUBIC))
    flips = 0
    for seed in range(40):
        out = augment.pretrain_augment(
            image,
            size=16,
            scale=(1, 1),
            ratio=(1, 1),
            interpolation="bicubic",
            hflip=True,
            rng=np.random.default_rng(seed),
        )
        assert out.shape == (16, 16, 3) and out.dtype == np.uint8
        flipped = np.array_equal(out, whole[:, ::-1])
        assert flipped or np.array_equal(out, whole)
        flips += flipped
    assert 10 < flips < 30
    # A box is cropped before resizing: a 24x24 crop resized to 24 is the crop itself.
    rng = np.random.default_rng(3)
    top, left, h, w = augment.sample_crop_box(48, 48, (0.25, 0.25), (1, 1), rng)
    out = augment.pretrain_augment(
        image,
        size=24,
        scale=(0.25, 0.25),
        ratio=(1, 1),
        interpolation="bilinear",
        hflip=False,
        rng=np.random.default_rng(3),
    )
    np.testing.assert_array_equal(out, pixels[top : top + h, left : left + w])


def test_normalize_values():
    images = np.array([[0, 255, 128]], np.uint8).reshape(1, 1, 1, 3)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    out = augment.normalize(images, mean, std)
    want = (np.array([0, 1, 128 / 255]) - np.array(mean)) / np.array(std)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out.reshape(3), want, rtol=1e-6)


def test_batch_equals_independent_recompute(class_folder):
    config = _config(source="folder", folder=str(class_folder), interpolation="bicubic")
    files = sorted(class_folder.glob("class_*/img*"))  # Sorted by class folder == label.
    for step, batch in enumerate(_first_batches(config, 2)):
        assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
        assert batch["label"].dtype == np.int32 and batch["index"].dtype == np.int64
        np.testing.assert_array_equal(batch["index"], step * 8 + np.arange(8))
        for p, image, label in zip(batch["index"], batch["image"], batch["label"], strict=True):
            epoch = int(p) // len(files)
            order = np.random.default_rng([7, input_lib.ORDER_STREAM, epoch]).permutation(8)
            record = order[p % len(files)]
            assert label == record
            rng = np.random.default_rng([7, input_lib.AUGMENT_STREAM, int(p)])
            pixels = augment.pretrain_augment(
                Image.open(files[record]).convert("RGB"),
                size=32,
                scale=(0.67, 1.0),
                ratio=(3 / 4, 4 / 3),
                interpolation="bicubic",
                hflip=True,
                rng=rng,
            )
            want = (pixels / 255.0 - np.array(config.data.mean)) / np.array(config.data.std)
            np.testing.assert_allclose(image, want, atol=1e-5)


def test_epochs_are_permutations_that_differ(class_folder):
    config = _config(source="folder", folder=str(class_folder))
    first, second = _first_batches(config, 2)
    assert sorted(first["label"]) == list(range(8))  # Epoch 0 reads each record once.
    assert sorted(second["label"]) == list(range(8))
    assert not np.array_equal(first["label"], second["label"])


def _add_step(batch, step, *, offset):
    batch["step"] = np.full(len(batch["index"]), step + offset, np.int64)
    return batch


def test_determinism_and_exact_resume():
    config = _config(source="bundled", num_examples=20)
    transform = functools.partial(_add_step, offset=1000)
    fresh = _first_batches(config, 4, batch_transform=transform)
    again = _first_batches(config, 4, batch_transform=transform)
    for a, b in zip(fresh, again, strict=True):
        for key in ("image", "label", "index", "step"):
            np.testing.assert_array_equal(a[key], b[key])
    assert not np.allclose(fresh[0]["image"], fresh[1]["image"])
    assert [int(b["step"][0]) for b in fresh] == [1000, 1001, 1002, 1003]
    (resumed,) = _first_batches(config, 1, start_step=3, batch_transform=transform)
    for key in ("image", "label", "index", "step"):
        np.testing.assert_array_equal(resumed[key], fresh[3][key])
    config.seed = 8
    (other_seed,) = _first_batches(config, 1)
    assert not np.allclose(other_seed["image"], fresh[0]["image"])


def test_process_sharding_reads_only_own_records(class_folder, monkeypatch):
    config = _config(source="folder", folder=str(class_folder))
    reads = []
    original = sources.FolderSource.read

    def counting_read(self, record):
        reads.append(record)
        return original(self, record)

    monkeypatch.setattr(sources.FolderSource, "read", counting_read)
    whole = _first_batches(config, 3, rows=input_lib.host_rows(8, 0, 1))
    whole_reads, reads[:] = list(reads), []
    hosts, host_reads = [], []
    for process_index in range(2):
        hosts.append(_first_batches(config, 3, rows=input_lib.host_rows(8, process_index, 2)))
        host_reads.append(list(reads))
        reads[:] = []
    assert len(whole_reads) == 24 and [len(r) for r in host_reads] == [12, 12]
    for step in range(3):
        for key in ("image", "label", "index"):
            joined = np.concatenate([hosts[0][step][key], hosts[1][step][key]])
            np.testing.assert_array_equal(joined, whole[step][key])
        for process_index in range(2):
            # Each host decoded exactly the records of its own half of the global batch.
            own = host_reads[process_index][step * 4 : step * 4 + 4]
            assert own == list(hosts[process_index][step]["label"])
            start = step * 8 + 4 * process_index
            assert own == whole_reads[start : start + 4]


def test_batch_size_not_divisible_by_processes():
    with pytest.raises(input_lib.DataError, match="not divisible by the process count 3"):
        input_lib.host_rows(_config().batch_size, 0, 3)


def test_folder_sources_class_and_flat(class_folder, tmp_path):
    config = _config(source="folder", folder=str(class_folder))
    assert input_lib.dataset_size(config) == 8  # notes.txt is not an image.
    flat = tmp_path / "flat"
    for k in range(3):
        _write_image(flat / f"{k}.jpeg", seed=k, size=(20, 30))
    config = _config(source="folder", folder=str(flat))
    assert input_lib.dataset_size(config) == 3
    (batch,) = _first_batches(config, 1)
    np.testing.assert_array_equal(batch["label"], -1)
    assert batch["image"].shape == (8, 32, 32, 3)


def test_folder_errors(tmp_path):
    with pytest.raises(input_lib.DataError, match="is not a directory"):
        input_lib.dataset_size(_config(source="folder", folder=str(tmp_path / "missing")))
    (tmp_path / "empty" / "class_a").mkdir(parents=True)
    with pytest.raises(input_lib.DataError, match="holds no images"):
        input_lib.dataset_size(_config(source="folder", folder=str(tmp_path / "empty")))
    bad = tmp_path / "bad"
    _write_image(bad / "good.png", seed=0)
    (bad / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    with pytest.raises(sources.BadImageError, match=r"cannot decode image .*broken\.jpg"):
        sources.FolderSource(str(bad)).read(0)
    batch = next(input_lib.make_pretrain_iterator(_config(source="folder", folder=str(bad))))
    assert set(batch["bad_records"].ravel()) == {-1, 0}  # Replaced, not a stop.


def test_bundled_photos_are_rgb_and_labelled_by_photo():
    photos = sources.bundled_photos()
    assert len(photos) == len(sources.BUNDLED_PHOTOS)
    assert all(p.mode == "RGB" and min(p.size) >= 300 for p in photos)
    config = _config(source="bundled", num_examples=14)
    assert input_lib.dataset_size(config) == 14
    (batch,) = _first_batches(config, 1)
    np.testing.assert_array_less(batch["label"], len(photos))
    assert (batch["label"] >= 0).all()


def _build_tiny_tfds(data_dir: str) -> None:
    """12 labelled flat images (height 24 + k, value 20k, label k % 4) as TFDS "tiny_images"."""
    examples = []
    for k in range(12):
        encoded = io.BytesIO()
        Image.fromarray(np.full((24 + k, 40, 3), 20 * k, np.uint8)).save(encoded, format="PNG")
        examples.append((encoded.getvalue(), k % 4))
    helpers.build_tiny_tfds(data_dir, "tiny_images", examples, num_classes=4)


def test_tfds_source_and_not_prepared_error(tmp_path):
    _build_tiny_tfds(str(tmp_path / "tfds"))
    config = _config(source="tfds", name="tiny_images", tfds_data_dir=str(tmp_path / "tfds"))
    config.data.update(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), hflip=False)
    assert input_lib.dataset_size(config) == 12
    (batch,) = _first_batches(config, 1)
    # Image k is flat grey 20k/255 with label k % 4: recover k and check both.
    k = np.round(batch["image"][:, 0, 0, 0] * 255 / 20).astype(int)
    want = np.broadcast_to((20 * k / 255.0)[:, None, None, None], batch["image"].shape)
    np.testing.assert_allclose(batch["image"], want, atol=1e-6)
    np.testing.assert_array_equal(batch["label"], k % 4)
    assert len(set(k)) == 8

    config.data.update(name="imagenet2012", tfds_data_dir=str(tmp_path / "empty"))
    with pytest.raises(input_lib.DataError) as error:
        input_lib.dataset_size(config)
    message = str(error.value)
    assert "not prepared" in message and "downloads/manual" in message
    assert f"tfds build imagenet2012 --data_dir={tmp_path / 'empty'}" in message
    assert "--file_format=array_record" in message and "\n" not in message
    config.data.name = "no_such_data_set"
    with pytest.raises(input_lib.DataError, match="TFDS has no data set named 'no_such_data_set'"):
        input_lib.dataset_size(config)


def test_worker_processes_match_in_process():
    config = _config(source="bundled", num_examples=20)
    transform = functools.partial(_add_step, offset=0)
    in_process = _first_batches(config, 3, start_step=1, batch_transform=transform)
    config.data.update(num_workers=2, prefetch=1)
    workers = _first_batches(config, 3, start_step=1, batch_transform=transform)
    for a, b in zip(in_process, workers, strict=True):
        for key in ("image", "label", "index", "step"):
            np.testing.assert_array_equal(a[key], b[key])
