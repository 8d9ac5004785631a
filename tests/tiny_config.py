"""The tests' tiny configs as a config file, for runs through the real CLI:

  python -m mim_jax.main --config=tests/tiny_config.py:simmim --workdir=...   (greenmim, itpn)

Each compiles in seconds; `--config.*` flags override fields as usual.
"""

import pathlib
import sys

import ml_collections

sys.path.insert(0, str(pathlib.Path(__file__).parent))

import helpers  # Found through the path above.

TINY = {
    "simmim": helpers.tiny_simmim_config,
    "greenmim": helpers.tiny_greenmim_config,
    "itpn": helpers.tiny_itpn_config,
}


def get_config(arg: str) -> ml_collections.ConfigDict:
    """The tiny config of method `arg`."""
    return TINY[arg]()
