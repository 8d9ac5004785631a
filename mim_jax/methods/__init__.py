"""Pretraining methods. Each module provides build_model, make_batch_transform, loss_fn and
reconstruct (see methods/simmim.py for the interface)."""

from __future__ import annotations

import importlib
from types import ModuleType

from mim_jax.config_lib import ConfigError

METHODS = ("simmim", "greenmim", "itpn", "classification")


def get_method(name: str) -> ModuleType:
    """The method module for `config.method`."""
    if name not in METHODS:
        raise ConfigError(f"config.method='{name}' must be one of: {', '.join(METHODS)}")
    return importlib.import_module(f"mim_jax.methods.{name}")
