"""PyTorch state_dict -> mim_jax parameters, with one explicit name table per model.

A table is a list of (our-path regex, PyTorch-path template) pairs applied to the module part
of a parameter path; the leaf is renamed by kind (Linear/Conv `kernel` <-> `weight`, LayerNorm
`scale` <-> `weight`, `bias` <-> `bias`, other parameters keep their name) and the array is
laid out accordingly (Linear `[out, in]` -> `[in, out]`, Conv `[out, in, kh, kw]` ->
`[kh, kw, in, out]`, token `[1, 1, C]` -> `[C]`). Every PyTorch key must be used or be a
known buffer; every parameter of ours must be found; otherwise the import fails and says
which keys.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np
from flax import nnx

from mim_jax import pytree

# Official buffers that our models recompute as constants.
TORCH_BUFFERS = (r".*relative_position_index$", r".*attn_mask$")

# (regex on our path with the leaf already renamed, PyTorch key template). First match wins;
# a parameter that matches no row is an error, so every module of a model is listed here.
_W = r"(weight|bias)"
_BLOCK = r"^encoder\.layers\.(\d+)\.blocks\.(\d+)\."
SWIN_TABLE = (
    (rf"^encoder\.patch_embed\.(proj|norm)\.{_W}$", r"encoder.patch_embed.\1.\2"),
    (r"^encoder\.mask_token$", "encoder.mask_token"),
    (rf"{_BLOCK}(norm1|norm2)\.{_W}$", r"encoder.layers.\1.blocks.\2.\3.\4"),
    (rf"{_BLOCK}attn\.(qkv|proj)\.{_W}$", r"encoder.layers.\1.blocks.\2.attn.\3.\4"),
    (
        rf"{_BLOCK}attn\.relative_position_bias_table$",
        r"encoder.layers.\1.blocks.\2.attn.relative_position_bias_table",
    ),
    (rf"{_BLOCK}mlp\.(fc1|fc2)\.{_W}$", r"encoder.layers.\1.blocks.\2.mlp.\3.\4"),
    (
        rf"^encoder\.layers\.(\d+)\.downsample\.(norm|reduction)\.{_W}$",
        r"encoder.layers.\1.downsample.\2.\3",
    ),
    (rf"^encoder\.norm\.{_W}$", r"encoder.norm.\1"),
    (rf"^decoder\.proj\.{_W}$", r"decoder.0.\1"),
)
_VIT_BLOCK = r"^encoder\.blocks\.(\d+)\."
VIT_TABLE = (
    (rf"^encoder\.patch_embed\.proj\.{_W}$", r"encoder.patch_embed.proj.\1"),
    (r"^encoder\.(cls_token|mask_token|pos_embed)$", r"encoder.\1"),
    (
        r"^encoder\.rel_pos_bias\.relative_position_bias_table$",
        "encoder.rel_pos_bias.relative_position_bias_table",
    ),
    (rf"{_VIT_BLOCK}(norm1|norm2)\.{_W}$", r"encoder.blocks.\1.\2.\3"),
    (rf"{_VIT_BLOCK}(gamma_1|gamma_2)$", r"encoder.blocks.\1.\2"),
    (
        rf"{_VIT_BLOCK}attn\.(q_bias|v_bias|relative_position_bias_table)$",
        r"encoder.blocks.\1.attn.\2",
    ),
    (rf"{_VIT_BLOCK}attn\.(qkv|proj)\.{_W}$", r"encoder.blocks.\1.attn.\2.\3"),
    (rf"{_VIT_BLOCK}mlp\.(fc1|fc2)\.{_W}$", r"encoder.blocks.\1.mlp.\2.\3"),
    (rf"^encoder\.norm\.{_W}$", r"encoder.norm.\1"),
    (rf"^decoder\.proj\.{_W}$", r"decoder.0.\1"),
)
TABLES = {"swin": SWIN_TABLE, "vit": VIT_TABLE}


class ConversionError(ValueError):
    """The state_dict does not match the model (missing, unused or mis-shaped keys)."""


def torch_name(path: str, table) -> str:
    """Our dotted parameter path -> the PyTorch state_dict key."""
    module, _, leaf = path.rpartition(".")
    if leaf in ("kernel", "scale"):
        path = f"{module}.weight"
    for pattern, template in table:
        if re.match(pattern, path):
            return re.sub(pattern, template, path)
    raise ConversionError(f"no name-table entry for parameter '{path}'")


def _to_ours(value: np.ndarray, shape: tuple[int, ...], leaf: str) -> np.ndarray:
    value = np.asarray(value)
    if leaf == "kernel" and value.ndim == 4 and len(shape) == 2:  # 1x1 conv as Linear
        value = value[:, :, 0, 0].T
    elif leaf == "kernel" and value.ndim == 4:
        value = value.transpose(2, 3, 1, 0)
    elif leaf == "kernel" and value.ndim == 2:
        value = value.T
    elif value.shape != shape and value.size == int(np.prod(shape)):
        value = value.reshape(shape)  # tokens [1, 1, C] -> [C]
    return value


def import_torch(params: Mapping, state_dict: Mapping[str, np.ndarray], model_name: str) -> dict:
    """Returns `params` (nested dict) with every value taken from the PyTorch `state_dict`."""
    table = TABLES[model_name]
    ours = pytree.flatten(params)
    used, missing, bad_shape, out = set(), [], [], {}
    for path, current in ours.items():
        leaf = path.rpartition(".")[2]
        key = torch_name(path, table)
        if key not in state_dict:
            missing.append(f"{path} <- {key}")
            continue
        value = _to_ours(state_dict[key], tuple(current.shape), leaf)
        if value.shape != tuple(current.shape):
            bad_shape.append(f"{key} {np.shape(state_dict[key])} -> {path} {current.shape}")
            continue
        out[path] = value.astype(np.asarray(current).dtype)
        used.add(key)
    unused = [
        k for k in state_dict if k not in used and not any(re.match(b, k) for b in TORCH_BUFFERS)
    ]
    problems = []
    if missing:
        problems.append(f"missing in state_dict: {', '.join(missing)}")
    if bad_shape:
        problems.append(f"shape mismatch: {', '.join(bad_shape)}")
    if unused:
        problems.append(f"unused state_dict keys: {', '.join(unused)}")
    if problems:
        raise ConversionError("; ".join(problems))
    return pytree.unflatten(out, params)


def load_into(model: nnx.Module, state_dict: Mapping[str, np.ndarray], model_name: str) -> None:
    """Overwrites `model`'s parameters in place from a PyTorch state_dict (numpy values)."""
    state = nnx.state(model, nnx.Param)
    pure = nnx.to_pure_dict(state)
    nnx.replace_by_pure_dict(state, import_torch(pure, state_dict, model_name))
    nnx.update(model, state)


# --- encoder weights in the official fine-tuning names (init_from, export) -----------------------

# The classifier head rows (official fine-tuning models: `head`, and `fc_norm` after pooling).
HEAD_ROWS = ((r"^(fc_norm|head)\.(weight|bias)$", r"\1.\2"),)
# Parameters stored with PyTorch's leading singleton axes (`[1, 1, C]` tokens, `[1, N, C]`
# position tables) and as plain vectors / matrices here.
_TOKEN_LEAVES = ("cls_token", "mask_token", "pos_embed", "absolute_pos_embed")


def classifier_table(table, torch_prefix: str = "encoder.") -> tuple:
    """A pretraining-model table's encoder rows with `torch_prefix` dropped from the PyTorch
    names (SimMIM stores its encoder under `encoder.`; the official fine-tuning models and timm
    do not), plus `HEAD_ROWS`: our classifier paths <-> the fine-tuning model's names."""
    prefix = re.escape(torch_prefix)
    rows = [
        (pattern, template[len(torch_prefix) :])
        for pattern, template in table
        if template.startswith(torch_prefix) and pattern.startswith(rf"^{prefix}")
    ]
    return (*rows, *HEAD_ROWS)


def _groups(pattern: str) -> list[str]:
    """The top-level capture groups' sub-patterns of a name-table regex (no nesting in ours)."""
    return re.findall(r"\(([^()]*)\)", pattern)


def _invert_row(pattern: str, template: str) -> tuple[str, str]:
    """(PyTorch-name regex, our-path template) of a (our regex, PyTorch template) row."""
    groups = _groups(pattern)
    torch_regex = re.escape(template)
    for i, sub in enumerate(groups, start=1):
        torch_regex = torch_regex.replace(re.escape(f"\\{i}"), f"({sub})", 1)
    ours = pattern.removeprefix("^").removesuffix("$")
    for i, sub in enumerate(groups, start=1):
        ours = ours.replace(f"({sub})", f"\\{i}", 1)
    return f"^{torch_regex}$", ours.replace(r"\.", ".")


def _leaf_to_ours(path: str, value: np.ndarray) -> tuple[str, np.ndarray]:
    """Renames a PyTorch leaf and lays its value out as ours: Linear `[out, in]` -> kernel
    `[in, out]`, Conv `[out, in, kh, kw]` -> `[kh, kw, in, out]`, LayerNorm weight -> scale,
    leading singleton axes of tokens and position tables dropped."""
    module, _, leaf = path.rpartition(".")
    if leaf == "weight" and value.ndim >= 2:
        value = value.T if value.ndim == 2 else value.transpose(2, 3, 1, 0)
        return f"{module}.kernel", value
    if leaf == "weight":
        return f"{module}.scale", value
    if leaf in _TOKEN_LEAVES:
        return path, value.reshape(value.shape[-2:] if leaf.endswith("pos_embed") else (-1,))
    return path, value


def from_torch(state_dict: Mapping[str, np.ndarray], table) -> tuple[dict, list[str]]:
    """PyTorch names and layouts -> {our dotted path: array} through `table`'s rows inverted;
    also returns the keys no row maps (buffers, other model parts), sorted."""
    inverted = [_invert_row(p, t) for p, t in table]
    ours, unmapped = {}, []
    for key, value in state_dict.items():
        for regex, template in inverted:
            if re.match(regex, key):
                path, array = _leaf_to_ours(re.sub(regex, template, key), np.asarray(value))
                ours[path] = array
                break
        else:
            unmapped.append(key)
    return ours, sorted(unmapped)


def to_torch(flat: Mapping[str, np.ndarray], table) -> dict[str, np.ndarray]:
    """{our dotted path: array} -> the PyTorch state_dict (names by `table`, PyTorch layouts);
    the inverse of `from_torch`."""
    out = {}
    for path, value in flat.items():
        value = np.asarray(value)
        leaf = path.rpartition(".")[2]
        if leaf == "kernel":
            value = value.T if value.ndim == 2 else value.transpose(3, 2, 0, 1)
        elif leaf in ("cls_token", "mask_token"):
            value = value.reshape(1, 1, -1)
        elif leaf.endswith("pos_embed"):
            value = value[None]
        out[torch_name(path, table)] = np.ascontiguousarray(value)
    return out
