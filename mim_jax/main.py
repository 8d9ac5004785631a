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

A bad command line or config fails at once, before the run's libraries load (jax, TensorFlow,
orbax, grain: seconds), with one line: `mim_jax: error: <message>`.
"""

from __future__ import annotations

from absl import flags, logging
from ml_collections import config_flags

from mim_jax import cli, config_checks, config_lib

PROGRAM = "mim_jax"
FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with ':variant[,key=value...]'.", lock_config=True
)
flags.DEFINE_string("workdir", None, "Where checkpoints, TensorBoard events and images go.")


def load_libraries() -> None:
    """Imports what a run needs (seconds), which also defines the libraries' own flags (e.g.
    --grain_py_debug_mode); `cli.run` calls it first when the command line names one."""
    from mim_jax import evaluate, train  # noqa: F401


def user_errors() -> tuple[type[Exception], ...]:
    """Errors whose message is the whole story: shown as one line, without a traceback."""
    from mim_jax import checkpoint, convert, nonfinite
    from mim_jax.data import sources

    return (
        config_lib.ConfigError,
        sources.DataError,
        checkpoint.CheckpointMismatchError,
        checkpoint.CheckpointSaveError,
        convert.ConversionError,
        nonfinite.NonFiniteLossError,
    )


def _hide_accelerators_from_tensorflow() -> None:
    """TensorFlow (used by CLU writers and TFDS) must not take accelerator memory from JAX."""
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")


def main(argv: list[str]) -> None:
    del argv  # `cli.run` has rejected positional arguments.
    config = FLAGS.config
    try:
        config_checks.validate(config)  # At once: the libraries below take seconds to load.
    except config_lib.ConfigError as e:
        cli.fail(PROGRAM, str(e))
    import jax

    from mim_jax import distributed, evaluate, train

    try:
        distributed.initialize_distributed()
        if jax.process_index() != 0:  # One host reports progress; the others only warn.
            logging.set_verbosity(logging.WARNING)
        _hide_accelerators_from_tensorflow()
        if config.mode == "evaluate":
            evaluate.run(config, FLAGS.workdir)
        else:
            train.train(config, FLAGS.workdir)
    except user_errors() as e:
        cli.fail(PROGRAM, str(e))


if __name__ == "__main__":
    cli.run(main, PROGRAM, required=("config", "workdir"), load_libraries=load_libraries)
