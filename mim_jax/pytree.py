"""Pytree paths as dotted names ('layers.0.blocks.1.attn.qkv.kernel') and flat dicts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np


def param_path(path: Sequence[Any]) -> str:
    """Dotted name of a jax tree path, e.g. 'layers.0.blocks.1.attn.qkv.kernel'.

    A trailing `.value` entry (the nnx.Variable wrapper around the array) is dropped.
    """
    keys = list(path)
    if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
        keys = keys[:-1]
    parts = []
    for key in keys:
        if isinstance(key, jax.tree_util.DictKey | jax.tree_util.FlattenedIndexKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            parts.append(key.name)
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        else:
            raise TypeError(f"unsupported tree path entry {key!r}")
    return ".".join(parts)


def flatten(tree: Mapping) -> dict[str, np.ndarray]:
    """Nested dict (e.g. `nnx.to_pure_dict(state)`) -> {'a.b.0.c': array}."""
    return {param_path(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten(flat: Mapping[str, np.ndarray], like: Mapping) -> dict:
    """Inverse of `flatten` with the structure of `like`."""
    paths = list(flatten(like))
    leaves = [flat[p] for p in paths]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like), leaves)
