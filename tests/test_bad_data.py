"""Tests for unusual and unreadable images: every PIL mode decodes to the right RGB,
broken files raise BadImageError, the training pipeline replaces them deterministically, the
evaluation pipeline marks them invalid, and BadExamples counts them."""

import io
import json
import logging
import os

import helpers
import jax
import numpy as np
import pytest
from helpers import load_config
from jax.experimental import multihost_utils
from PIL import Image

from mim_jax.data import augment, bad_examples, sources
from mim_jax.data import input as input_lib

SEED = 7
GOOD = 40


def _save(image: Image.Image, fmt: str, **kwargs) -> bytes:
    encoded = io.BytesIO()
    image.save(encoded, fmt, **kwargs)
    return encoded.getvalue()


def _decode(image: Image.Image, fmt: str = "PNG", **kwargs) -> np.ndarray:
    """`image` saved as `fmt`, then decoded: uint8 `[H, W, 3]`."""
    out = sources.decode(_save(image, fmt, **kwargs), "test image")
    assert out.mode == "RGB"
    return np.asarray(out)


def _grey(values: np.ndarray) -> np.ndarray:
    return np.repeat(np.asarray(values, np.uint8)[..., None], 3, axis=-1)


# ---------------------------------------------------------------- decoding unusual modes


def test_sixteen_bit_grey_scales_to_eight_bits():
    values = np.array([[0, 1, 128, 129, 257, 1000], [32767, 32768, 40000, 65278, 65534, 65535]])
    want = _grey(np.round(values / 257.0))  # 65535 / 257 = 255 exactly.
    assert want[1, 5, 0] == 255 and want[0, 5, 0] == 4
    png = Image.fromarray(values.astype(np.uint16))
    assert Image.open(io.BytesIO(_save(png, "PNG"))).mode == "I;16"
    np.testing.assert_array_equal(_decode(png), want)
    for image in (Image.fromarray(values.astype(">u2")), Image.fromarray(values.astype(np.int32))):
        assert image.mode in ("I;16B", "I")
        np.testing.assert_array_equal(np.asarray(sources.to_rgb(image)), want)


def test_one_bit_and_grey():
    bits = np.array([[True, False, True], [False, False, True]])
    np.testing.assert_array_equal(_decode(Image.fromarray(bits)), _grey(255 * bits))
    grey = np.array([[0, 17, 255], [128, 3, 99]], np.uint8)
    np.testing.assert_array_equal(_decode(Image.fromarray(grey)), _grey(grey))


def test_cmyk_jpeg_matches_hand_conversion():
    inks = [(0, 0, 0, 0), (255, 0, 0, 0), (10, 100, 200, 50), (0, 0, 0, 255)]
    image = Image.new("CMYK", (32, 8))
    for k, ink in enumerate(inks):  # Flat 8x8 blocks survive JPEG at quality 100.
        image.paste(ink, (8 * k, 0, 8 * k + 8, 8))
    out = _decode(image, "JPEG", quality=100)
    for k, (c, m, y, black) in enumerate(inks):
        want = [(255 - ink) * (255 - black) / 255 for ink in (c, m, y)]
        np.testing.assert_allclose(
            out[:, 8 * k : 8 * k + 8], np.broadcast_to(want, (8, 8, 3)), atol=2
        )


PALETTE = [(200, 10, 30), (0, 128, 255), (40, 40, 40)]


@pytest.mark.parametrize("transparent", [False, True])
def test_palette_with_and_without_transparency(transparent):
    indices = np.array([[0, 1, 2], [2, 1, 0]], np.uint8)
    image = Image.fromarray(indices, "P")
    image.putpalette([v for colour in PALETTE for v in colour])
    out = _decode(image, **({"transparency": 2} if transparent else {}))
    colours = np.array(PALETTE, np.uint8)
    if transparent:
        colours[2] = sources.ALPHA_BACKGROUND
    np.testing.assert_array_equal(out, colours[indices])


def test_alpha_is_composited_over_white():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    alpha = np.array([0, 1, 128, 254, 255], np.uint8)[None].repeat(4, axis=0)
    a = alpha[..., None] / 255.0
    want = rgb * a + 255 * (1 - a)  # `[4, 5, 3]`, channel 0 also for the LA image.
    out = _decode(Image.fromarray(np.dstack([rgb, alpha]), "RGBA"))
    np.testing.assert_allclose(out, want, atol=1)
    np.testing.assert_array_equal(out[:, 4], rgb[:, 4])  # Opaque: unchanged.
    grey = Image.fromarray(np.dstack([rgb[..., 0], alpha]), "LA")
    np.testing.assert_allclose(_decode(grey), want[..., :1].repeat(3, axis=-1), atol=1)


# EXIF orientation -> what a viewer does to the stored pixels (EXIF 2.3, tag 0x0112).
ORIENTATIONS = {
    2: lambda a: a[:, ::-1],
    3: lambda a: np.rot90(a, 2),
    6: lambda a: np.rot90(a, -1),  # 90 degrees clockwise.
    8: lambda a: np.rot90(a, 1),
}


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_exif_orientation_png(orientation):
    stored = np.random.default_rng(orientation).integers(0, 256, (2, 3, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = _decode(Image.fromarray(stored), exif=exif)
    np.testing.assert_array_equal(out, ORIENTATIONS[orientation](stored))


def test_exif_orientation_jpeg():
    colours = np.array(
        [[[255, 0, 0], [0, 255, 0], [0, 0, 255]], [[0, 0, 0], [255, 255, 255], [255, 255, 0]]]
    )
    stored = np.kron(colours, np.ones((8, 8, 1))).astype(np.uint8)  # 2x3 flat 8x8 blocks.
    exif = Image.Exif()
    exif[0x0112] = 6
    out = _decode(Image.fromarray(stored), "JPEG", quality=100, subsampling=0, exif=exif)
    assert out.shape == (24, 16, 3)
    # Block centres, away from JPEG's ringing at the colour edges.
    np.testing.assert_allclose(out[4::8, 4::8], np.rot90(colours, -1), atol=3)


# ---------------------------------------------------------------- unreadable files


def _png_bytes(size=(40, 56)) -> bytes:
    pixels = np.random.default_rng(size).integers(0, 256, (*size, 3), dtype=np.uint8)
    return _save(Image.fromarray(pixels), "PNG")


def _truncated_png(path):
    path.write_bytes(_png_bytes()[:2000])


def _truncated_jpeg(path):
    data = _save(Image.fromarray(np.zeros((40, 56, 3), np.uint8) + 90), "JPEG")
    path.write_bytes(data[: len(data) // 2])


def _broken_link(path):
    os.symlink(path.parent / "gone.png", path)


BROKEN = {
    "truncated.png": _truncated_png,
    "truncated.jpg": _truncated_jpeg,
    "empty.png": lambda path: path.write_bytes(b""),
    "text.jpg": lambda path: path.write_text("not an image at all\n"),
    "link.png": _broken_link,
    "missing.png": lambda path: None,
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_files_raise_bad_image_error(tmp_path, name):
    path = tmp_path / name
    BROKEN[name](path)
    with pytest.raises(sources.BadImageError, match=f"cannot decode image {path}: ") as error:
        sources.decode(str(path), str(path))
    assert isinstance(error.value, sources.DataError) and "\n" not in str(error.value)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bombs_raise(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    for side in (12, 20):  # Over the limit (refused here); over twice it (refused by PIL).
        path = tmp_path / f"bomb{side}.png"
        path.write_bytes(_save(Image.new("L", (side, side)), "PNG"))
        with pytest.raises(sources.BadImageError, match=f"bomb{side}.png: DecompressionBomb"):
            sources.decode(str(path), str(path))
    path.write_bytes(_save(Image.new("L", (10, 10)), "PNG"))
    assert sources.decode(str(path), str(path)).size == (10, 10)


@pytest.mark.parametrize("size", [(1, 1), (3, 2), (2, 3)])
def test_tiny_images_are_upscaled(size):
    colour = (10, 200, 30)
    image = Image.new("RGB", size, colour)
    crop = dict(scale=(0.67, 1.0), ratio=(3 / 4, 4 / 3), interpolation="bicubic", hflip=True)
    outputs = [
        augment.pretrain_augment(image, size=16, rng=np.random.default_rng(0), **crop),
        augment.eval_transform(image, size=16, crop_pct=0.875, interpolation="bicubic"),
    ]
    for out in outputs:
        np.testing.assert_array_equal(out, np.broadcast_to(colour, (16, 16, 3)))


def test_describe_bundled():
    name = sources.BUNDLED_PHOTOS[9 % len(sources.BUNDLED_PHOTOS)]
    assert (
        sources.BundledSource("train", 20).describe(9) == f"bundled photo {name} (train record 9)"
    )


# ---------------------------------------------------------------- pipelines on a folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """GOOD small images (2 of them 1x1 and 3x2) and 2 broken files, in one flat folder;
    returns (folder, sorted file paths, the broken paths)."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for k in range(GOOD):
        size = {0: (1, 1), 1: (2, 3)}.get(k, tuple(rng.integers(12, 30, 2)))
        pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"img{k:02d}{'.png' if k % 2 else '.jpg'}")
    broken = [root / "img05b.png", root / "img20b.jpg"]
    _truncated_png(broken[0])
    broken[1].write_text("not an image")
    files = sorted(str(p) for p in root.iterdir())
    return root, files, sorted(str(p) for p in broken)


def _config(root, **data):
    c = load_config("simmim", "quickstart")
    c.model.img_size = 16
    c.batch_size = 8
    c.seed = SEED
    assert c.data.crop_scale == (0.67, 1.0) and c.data.interpolation == "bilinear"
    c.data.update(
        {"source": "folder", "folder": str(root), "num_workers": 0, "prefetch": 0, **data}
    )
    return c


def _batches(config, count, start_step=0):
    it = input_lib.make_pretrain_iterator(config, start_step=start_step)
    batches = [next(it) for _ in range(count)]
    it.close()
    return batches


def _expected_example(config, files, broken, position):
    """(bad records, final record) at `position`, recomputed from the documented rules."""
    n = len(files)
    order = np.random.default_rng([SEED, input_lib.ORDER_STREAM, position // n]).permutation(n)
    record, bad = int(order[position % n]), []
    while files[record] in broken:
        rng = np.random.default_rng([SEED, input_lib.REPLACE_STREAM, position, len(bad)])
        bad.append(record)
        record = int(rng.integers(n))
    return bad, record


@pytest.fixture(scope="module")
def six_batches(folder):
    """The first 6 batches (48 examples, over one epoch of 42 records)."""
    return _batches(_config(folder[0]), 6)


def test_replacements_follow_the_documented_rule(folder, six_batches):
    root, files, broken = folder
    config = _config(root)
    hit = set()
    for batch in six_batches:
        assert batch["bad_records"].shape == (8, input_lib.MAX_REPLACEMENTS)
        for position, image, bad_row in zip(
            batch["index"], batch["image"], batch["bad_records"], strict=True
        ):
            bad, record = _expected_example(config, files, broken, int(position))
            np.testing.assert_array_equal(bad_row, bad + [-1] * (len(bad_row) - len(bad)))
            hit.update(files[r] for r in bad)
            pixels = augment.pretrain_augment(
                Image.open(files[record]).convert("RGB"),
                size=16,
                scale=(0.67, 1.0),
                ratio=(3 / 4, 4 / 3),
                interpolation="bilinear",
                hflip=True,
                rng=np.random.default_rng([SEED, input_lib.AUGMENT_STREAM, int(position)]),
            )
            want = (pixels / 255.0 - np.array(config.data.mean)) / np.array(config.data.std)
            np.testing.assert_allclose(image, want, atol=1e-5)
    assert sorted(hit) == broken  # One epoch reads every record.


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_resume_and_worker_processes_see_the_same_replacements(folder, six_batches):
    replaced = [s for s, b in enumerate(six_batches) if (b["bad_records"] >= 0).any()]
    step = replaced[-1]
    assert step >= 1
    (resumed,) = _batches(_config(folder[0]), 1, start_step=step)
    _assert_same(resumed, six_batches[step])
    workers = _batches(_config(folder[0], num_workers=1, prefetch=1), 2, start_step=step - 1)
    _assert_same(workers[0], six_batches[step - 1])
    _assert_same(workers[1], six_batches[step])


def test_tracker_counts_the_planted_files(folder, six_batches, tmp_path):
    root, files, broken = folder
    source = sources.make_source(_config(root).data, "train")
    tracker = bad_examples.BadExamples(source.describe, len(source), 0.05, always_allowed=0)
    for batch in six_batches:
        tracker.update(batch)
    assert tracker.count == 0  # Nothing is counted before a sync.
    tracker.sync()
    assert tracker.count == 2 and sorted(tracker.paths.values()) == broken
    assert tracker.examples_read == 48
    tracker.check()  # 2 <= 0.05 * min(48, 42) = 2.1.
    tracker.save(str(tmp_path))
    saved = json.loads((tmp_path / bad_examples.BAD_EXAMPLES_FILE).read_text())
    assert saved["examples_read"] == 48
    assert [e["path"] for e in saved["bad"]] == broken
    assert [files[e["record"]] for e in saved["bad"]] == broken
    resumed = bad_examples.BadExamples(source.describe, len(source), 0.04, always_allowed=0)
    resumed.restore(str(tmp_path))
    resumed.examples_read = 48
    assert resumed.count == 2
    with pytest.raises(sources.DataError, match=r"2 distinct images are unreadable") as error:
        resumed.check()  # 2 > 0.04 * 42 = 1.68.
    assert broken[0] in str(error.value) and "\n" not in str(error.value)


def test_all_unreadable_gives_one_line_error(tmp_path):
    for k in range(2):
        (tmp_path / f"{k}.jpg").write_text("text")
    with pytest.raises(input_lib.DataError, match="its record and 8 replacements") as error:
        _batches(_config(tmp_path), 1)
    assert str(tmp_path / "0.jpg") in str(error.value) and "\n" not in str(error.value)


def test_eval_marks_unreadable_images_invalid(folder, caplog):
    root, files, broken = folder
    config = _config(root)
    caplog.set_level(logging.WARNING)
    for _ in range(2):  # A second pass warns no more.
        data = input_lib.make_eval_iterator(config, "train", batch_size=8)
        batches = [next(data.batches) for _ in range(data.num_batches)]
        data.batches.close()
    valid = np.concatenate([b["valid"] for b in batches])
    want = np.array([f not in broken for f in files] + [False] * (48 - len(files)))
    np.testing.assert_array_equal(valid, want)
    images = np.concatenate([b["image"] for b in batches])
    blank = -np.array(config.data.mean) / np.array(config.data.std)
    np.testing.assert_allclose(
        images[~valid], np.broadcast_to(blank, images[~valid].shape), atol=1e-6
    )
    warned = [r.getMessage() for r in caplog.records if "unreadable image" in r.getMessage()]
    assert len(warned) == 2 and all(any(b in m for m in warned) for b in broken)


# ---------------------------------------------------------------- tracker rules


def _bad_batch(rows: int, *records: int) -> dict:
    bad = np.full((rows, input_lib.MAX_REPLACEMENTS), -1, np.int64)
    bad.flat[: len(records)] = records
    return {"bad_records": bad}


def test_limit_rule():
    tracker = bad_examples.BadExamples(str, 1000, 0.01)
    tracker.update(_bad_batch(16, *range(10)))
    tracker.sync()
    tracker.check()  # 10 files in the first batch: within ALWAYS_ALLOWED.
    tracker.update(_bad_batch(16, 10))
    tracker.sync()
    assert tracker.limit() == 10
    with pytest.raises(sources.DataError, match="11 distinct images"):
        tracker.check()
    tracker.examples_read = 5000  # The fraction of min(read, size) = 1000 -> limit 10.
    with pytest.raises(sources.DataError):
        tracker.check()
    tracker.dataset_size = 2000  # Limit 20.
    tracker.check()


def test_sync_merges_hosts_and_ignores_duplicates(monkeypatch):
    theirs, their_reads = [5, 3, 9], 8  # The other host's since the last sync.
    calls = []

    def allgather(x):
        """Two hosts: this one's `x` stacked on the other's (counts, then padded records)."""
        calls.append(x)
        if len(calls) == 1:
            return np.stack([x, np.array([len(theirs), their_reads], np.int32)])
        return np.stack([x, np.array(theirs + [-1] * (len(x) - len(theirs)), np.int32)])

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
    tracker = bad_examples.BadExamples(lambda r: f"file{r}", 100, 0.5)
    tracker.update(_bad_batch(4, 3, 3, 7))
    tracker.update(_bad_batch(4, 7))
    tracker.sync()
    assert sorted(tracker.paths) == [3, 5, 7, 9] and tracker.paths[9] == "file9"
    assert tracker.examples_read == 16 and len(calls) == 2


# ---------------------------------------------------------------- TFDS


def _build_tfds_with_a_corrupt_record(data_dir: str) -> None:
    """6 flat grey images (20k, label k % 2) as TFDS "tiny_corrupt"; image 3 is a truncated PNG."""
    examples = []
    for k in range(6):
        data = _save(Image.fromarray(np.full((8, 8, 3), 20 * k, np.uint8)), "PNG")
        examples.append((data[:40] if k == 3 else data, k % 2))
    helpers.build_tiny_tfds(data_dir, "tiny_corrupt", examples, num_classes=2)


def test_tfds_corrupt_record_is_replaced(tmp_path):
    _build_tfds_with_a_corrupt_record(str(tmp_path))
    config = _config(tmp_path, source="tfds", name="tiny_corrupt", tfds_data_dir=str(tmp_path))
    config.data.update(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    source = sources.make_source(config.data, "train")
    bad = []
    for record in range(len(source)):
        try:
            source.read(record)
        except sources.BadImageError as e:
            bad.append(record)
            assert f"tiny_corrupt[train] record {record}: " in str(e)
    assert len(bad) == 1
    (batch,) = _batches(config, 1)  # 8 positions: every record read at least once.
    assert set(batch["bad_records"][batch["bad_records"] >= 0]) == set(bad)
    k = np.round(batch["image"][:, 0, 0, 0] * 255 / 20).astype(int)
    assert 3 not in k  # Flat grey 20k: the corrupt image 3 never reaches a batch.
    np.testing.assert_array_equal(batch["label"], k % 2)
    tracker = bad_examples.BadExamples(source.describe, len(source), 0.0, always_allowed=1)
    tracker.update(batch)
    tracker.sync()
    assert tracker.paths == {bad[0]: f"tiny_corrupt[train] record {bad[0]}"}
