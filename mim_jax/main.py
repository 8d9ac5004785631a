r"""mim_jax entry point.

  python -m mim_jax.main --config=configs/simmim.py:quickstart --workdir=/tmp/mim
  python -m mim_jax.main --config=configs/simmim.py:swin_base_192 --config.batch_size=2048 \
      --workdir=gs://bucket/run
  python -m mim_jax.main --config=configs/finetune.py:quickstart --config.init_from=/tmp/mim \
      --workdir=/tmp/ft
  python -m mim_jax.main --config=configs/evaluate.py:knn --config.init_from=/tmp/mim \
      --workdir=/tmp/knn

`config.mode` picks the job: pretrain and finetune run the train loop (running the same
command again resumes from the newest checkpoint in --workdir), evaluate restores and measures.
"""

from __future__ import annotations

import logging as pylogging
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from mim_jax import checkpoint, config_lib, convert, distributed, evaluate, train
from mim_jax.data import sources

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with ':variant[,key=value...]'.", lock_config=True
)
flags.DEFINE_string("workdir", None, "Where checkpoints, TensorBoard events and images go.")
flags.mark_flags_as_required(["config", "workdir"])

# Errors whose message is the whole story: shown as one line, without a traceback.
USER_ERRORS = (
    config_lib.ConfigError,
    sources.DataError,
    checkpoint.CheckpointMismatchError,
    convert.ConversionError,
    train.NonFiniteLossError,
)


def _hide_accelerators_from_tensorflow() -> None:
    """TensorFlow (used by CLU writers and TFDS) must not take accelerator memory from JAX."""
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")


class _QuietOrbax(pylogging.Filter):
    """Drops orbax's per-save INFO chatter; its warnings and errors still show."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        return record.levelno >= pylogging.WARNING or "/orbax/" not in record.pathname


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.get_absl_handler().addFilter(_QuietOrbax())
    config = FLAGS.config
    try:
        distributed.initialize_distributed()
        if jax.process_index() != 0:  # One host reports progress; the others only warn.
            logging.set_verbosity(logging.WARNING)
        _hide_accelerators_from_tensorflow()
        if config.mode == "evaluate":
            evaluate.run(config, FLAGS.workdir)
        else:
            train.train(config, FLAGS.workdir)
    except USER_ERRORS as e:
        logging.error("%s", e)
        raise SystemExit(f"mim_jax: error: {e}") from None


if __name__ == "__main__":
    app.run(main)
