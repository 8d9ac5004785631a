"""Shared test helpers: tiny configs that compile in seconds on a 2-core CPU."""

import importlib.util
import io
import pathlib
from collections.abc import Sequence

import ml_collections

ROOT = pathlib.Path(__file__).parents[1]


def load_config(file: str, arg: str = "") -> ml_collections.ConfigDict:
    """`get_config(arg)` of configs/<file>.py."""
    spec = importlib.util.spec_from_file_location(f"config_{file}", ROOT / "configs" / f"{file}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def _tiny_run(c: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
    """Batch 16, 4 steps, in-process synchronous data, logs every step, then `overrides`."""
    c.batch_size = 16
    c.total_steps = 4
    c.data.num_workers = 0
    c.data.prefetch = 0
    c.data.num_examples = 64
    c.async_checkpointing = False
    c.log_every_steps = 1
    c.image_every_steps = 1000
    c.checkpoint_every_steps = 1000
    c.num_images = 2
    c.update_from_flattened_dict(overrides)
    return c


def tiny_simmim_config(**overrides) -> ml_collections.ConfigDict:
    """A 2-stage Swin (8x8 then 4x4 tokens, window 4: one shifted stage) on 32 px bundled crops;
    every sharded dimension divides 8."""
    c = load_config("simmim", "quickstart")
    c.model.update(
        img_size=32, patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4
    )
    c.mask.patch_size = 16
    return _tiny_run(c, overrides)


def tiny_greenmim_config(**overrides) -> ml_collections.ConfigDict:
    """GreenMIM on a 2-stage Swin (16x16 then 8x8 tokens, window 4; stage 1 grouped, stage 2
    in masking mode) on 32 px bundled crops, 8 px mask units (4 of 16 visible)."""
    c = load_config("greenmim", "quickstart")
    c.model.update(
        img_size=32, patch_size=2, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4
    )
    c.mask.update(patch_size=8, group_size=(0, 0), num_groups=(0, 0))
    c.decoder.update(embed_dim=16, num_heads=2)
    return _tiny_run(c, overrides)


def tiny_itpn_config(**overrides) -> ml_collections.ConfigDict:
    """iTPN with the EMA teacher on a one-block HiViT (16-d) and a one-block decoder, 32 px."""
    c = load_config("itpn", "quickstart")
    c.model.update(img_size=32, embed_dim=16, mlp_depth=1, depth=1, num_heads=2, fpn_dim=16)
    c.decoder.update(embed_dim=16, depth=1, num_heads=2)
    c.mask.ratio = 0.5
    return _tiny_run(c, overrides)


def build_tiny_tfds(
    data_dir: str, dataset_name: str, examples: Sequence[tuple[bytes, int]], num_classes: int
) -> None:
    """Prepares a TFDS dataset `dataset_name` (train split, array_record) from encoded PNGs and
    labels, offline and without TensorFlow (the images are pre-encoded)."""
    import tensorflow_datasets as tfds  # Here, so grain workers importing tests skip it.

    class TinyDataset(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        name = dataset_name
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            image = tfds.features.Image(shape=(None, None, 3), encoding_format="png")
            label = tfds.features.ClassLabel(num_classes=num_classes)
            features = tfds.features.FeaturesDict({"image": image, "label": label})
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            del dl_manager
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for k, (data, label) in enumerate(examples):
                yield k, {"image": io.BytesIO(data), "label": label}

    TinyDataset(data_dir=data_dir, file_format="array_record").download_and_prepare()
