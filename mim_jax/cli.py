"""Command-line plumbing shared by the programs (`mim_jax.main`, `mim_jax.plan`): library
start-up chatter off, and every bad command line reported as ONE line on stderr,
`<program>: error: <message>`, without a traceback (tracebacks are for bugs).

Import this module before anything that loads TensorFlow (CLU's writers and TFDS load it, in
this process and in grain's worker processes, which inherit the environment): TensorFlow reads
the two variables below once, when it loads.
"""

from __future__ import annotations

import logging
import os

# TensorFlow's notices on load, each after absl's "All log messages before absl::InitializeLog()
# ...": "oneDNN custom operations are on ..." (printed at any log level unless oneDNN is off;
# TensorFlow only writes summaries and reads TFDS records here, so its oneDNN kernels do not
# matter) and "This TensorFlow binary is optimized to use available CPU instructions ...".
# Level 1 drops TensorFlow's C++ INFO lines and keeps its warnings and errors.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

from collections.abc import Callable, Sequence
from typing import NoReturn

import ml_collections
from absl import app, flags
from absl import logging as absl_logging
from ml_collections.config_flags import config_flags as config_flags_lib
from ml_collections.config_flags import config_path

from mim_jax import config_lib

# Python loggers whose INFO lines are start-up probes, not progress: jax's backend search
# ("Unable to initialize backend 'tpu': ... libtpu.so ..." on every machine without a TPU).
# Their warnings (e.g. a GPU without a CUDA jaxlib) still show.
QUIET_LOGGERS = ("jax._src.xla_bridge",)
# ml_collections' wrapper of a TypeError/ValueError raised by a config file's get_config: the
# message holds that error's traceback.
_WRAPPED = "Error whilst parsing config file"


class _QuietOrbax(logging.Filter):
    """Drops orbax's per-save INFO chatter; its warnings and errors still show, without the
    traceback it logs beside a failed save (the exception reaches the run, which reports it:
    one line for a storage error)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "/orbax/" not in record.pathname:
            return True
        record.exc_info, record.exc_text = None, None
        return record.levelno >= logging.WARNING


def quiet_libraries() -> None:
    """Silences the libraries' INFO chatter (QUIET_LOGGERS, orbax) but not our own logging."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    absl_logging.get_absl_handler().addFilter(_QuietOrbax())


def fail(program: str, message: str) -> NoReturn:
    """Exits with status 1 after one line on stderr: `<program>: error: <message>`."""
    one_line = "; ".join(line.strip() for line in str(message).splitlines() if line.strip())
    raise SystemExit(f"{program}: error: {one_line}")


def run(
    main: Callable[[list[str]], None],
    program: str,
    *,
    required: Sequence[str],
    config_flag: str = "config",
    load_libraries: Callable[[], None] | None = None,
) -> None:
    """`absl.app.run(main)` with quiet libraries and one-line errors for a bad command line:
    unknown or malformed flags, a missing `required` flag, positional arguments, and a config
    file (`--<config_flag>`) that cannot be loaded or overridden as asked.

    A program that imports its heavy libraries in `main` (so that a bad command line fails at
    once) passes `load_libraries`, which imports them: it runs before the rest of the command
    line is parsed when that names a flag not defined yet (a library's own flag).
    """
    quiet_libraries()
    parser = flags_parser(
        program, required=required, config_flag=config_flag, load_libraries=load_libraries
    )
    app.run(main, flags_parser=parser)


def flags_parser(
    program: str,
    *,
    required: Sequence[str],
    config_flag: str = "config",
    load_libraries: Callable[[], None] | None = None,
) -> Callable[[list[str]], list[str]]:
    """A `flags_parser` for `absl.app.run` (see `run`); returns `[argv[0]]`. An exception that
    is not a command-line mistake (a bug in a config file, say) keeps its traceback."""

    def parse(argv: list[str]) -> list[str]:
        try:
            rest = flags.FLAGS(argv, known_only=load_libraries is not None)
            if load_libraries and any(a.startswith("-") for a in rest[1:]):  # Still undefined.
                load_libraries()
                rest = flags.FLAGS(rest)
            _load_config(config_flag)
        except Exception as e:
            message = _command_line_message(e, argv, config_flag)
            if message is None:
                raise
            fail(program, message)
        missing = [f"--{name}" for name in required if flags.FLAGS[name].value is None]
        if missing:
            fail(program, f"missing required flag{'s' * (len(missing) > 1)} {', '.join(missing)}")
        if len(rest) > 1:
            fail(program, f"unexpected arguments: {' '.join(rest[1:])}")
        return rest

    return parse


def _load_config(config_flag: str) -> None:
    """ml_collections defers a config file that fails to load (a missing file, say) to the
    first use of the config; this uses it now, while the command line is being checked."""
    config = flags.FLAGS[config_flag].value
    if config is not None and not isinstance(config, ml_collections.ConfigDict):
        config.to_dict()  # Raises the deferred OSError.


def _command_line_message(
    error: BaseException, argv: Sequence[str], config_flag: str
) -> str | None:
    """The message of a mistake on the command line `argv` that flag parsing raised, or None
    when `error` is a bug (which should show its traceback)."""
    chain = _chain(error)
    for e in chain:  # A config file's own ConfigError (e.g. an unknown variant): its message.
        if isinstance(e, config_lib.ConfigError) and not str(e).startswith(_WRAPPED):
            return str(e)
    if isinstance(error, OSError) and _raised_by(error, config_flags_lib.__file__):
        # ml_collections' "Configuration is not available ..." around the load failure, whose
        # last line is the reason, e.g. "[Errno 2] No such file or directory: 'x.py'".
        cause = [e for e in chain if isinstance(e, OSError)][-1]
        reason = str(cause).strip().splitlines()[-1].strip()
        return f"cannot load the config file (--{config_flag}): {reason}"
    if _raised_by(error, config_path.__file__):  # Resolving a --config.<field> override.
        if isinstance(error, KeyError | AttributeError):
            return _unknown_field(chain, argv, config_flag)
        return str(error)
    if isinstance(error, flags.Error) and _WRAPPED not in str(error):
        return str(error)
    return None


def _chain(error: BaseException) -> list[BaseException]:
    """`error` and the exceptions it was raised from or while handling, outermost first."""
    chain = [error]
    while True:
        e = chain[-1]
        nxt = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
        if nxt is None or nxt in chain:
            return chain
        chain.append(nxt)


def _raised_by(error: BaseException, filename: str) -> bool:
    """Whether a frame of `error`'s traceback runs code from `filename`."""
    tb = error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == filename:
            return True
        tb = tb.tb_next
    return False


def _unknown_field(chain: list[BaseException], argv: Sequence[str], config_flag: str) -> str:
    """'--config.batchsize=3: unknown config key 'batchsize'. Did you mean "batch_size" ...?'
    from ml_collections' KeyErrors (the innermost names the missing key or says what failed)."""
    keys = [str(e.args[0]) for e in chain if isinstance(e, KeyError) and e.args]
    name = keys[-1] if keys else str(chain[-1])
    if not name.isidentifier():  # Not a missing key: e.g. a field of an int.
        return name
    hints = [
        line
        for e in chain
        for line in str(e.args[0] if e.args else "").splitlines()
        if line.startswith("Did you mean")
    ]
    overrides = [a.lstrip("-") for a in argv if a.lstrip("-").startswith(f"{config_flag}.")]
    used = [a for a in overrides if name in a.split("=", 1)[0].split(".")[1:]]
    where = f"--{used[0]}: " if used else ""
    return f"{where}unknown config key {name!r}" + (f". {hints[0]}" if hints else "")
