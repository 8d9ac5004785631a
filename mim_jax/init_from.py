"""`config.init_from`: fill a freshly initialized model's encoder (and, where the source has
one, its classifier head) from another run or from official weights, with the official key
surgery, and say in one log line what was loaded, resized, dropped and newly initialized.

Sources:
- a workdir (its newest checkpoint), a `checkpoints/` directory, or one checkpoint step
  directory of any mim_jax run: SimMIM (Swin, ViT), GreenMIM, iTPN (the student; the teacher is
  never read) or a fine-tuned classifier. Only `params` is read, as host numpy arrays.
- a weight file: `.pth` / `.pt` / `.bin` (PyTorch, read by torch's weights-only loader when
  torch is installed; no arbitrary unpickling), `.safetensors` or `.npz`, with the official
  PyTorch names. A state_dict nested under 'model' / 'state_dict' is unwrapped; as in the
  official fine-tuning code, when keys carry SimMIM's `encoder.` prefix only those are kept.

Weights are matched by our parameter paths (`encoder.*`, `head.*`, `fc_norm.*`) after the
model's surgery (`encoders.REMAP`: ViT's shared relative position bias copied into every block,
relative-position tables and absolute position embeddings resized to the new window or grid).
Everything else fails with one line naming the first mismatching parameters: a target encoder
parameter the source lacks (unless it may start fresh: a relative position table the source
has none of, a mask token), a source encoder parameter the target lacks (unless the target has
no place for it: a pretraining mask token, the final norm of a mean-pooling ViT), or a shape
that surgery cannot fix. Parameters outside the encoder (head, decoder) start fresh; with
`strict` (evaluating a fine-tuned checkpoint) nothing may start fresh.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import re

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from mim_jax import checkpoint, convert, pytree
from mim_jax.config_lib import ConfigError
from mim_jax.models import encoders

WEIGHT_FILES = (".pth", ".pt", ".bin", ".safetensors", ".npz")
# Source encoder parameters a target may have no place for.
UNUSED_OK = (r"^encoder\.mask_token$", r"^encoder\.norm\.(scale|bias)$")
# Target encoder parameters that may start fresh when the source has none.
NEW_OK = (r"relative_position_bias_table$", r"^encoder\.mask_token$")
_PREVIEW = 4


@dataclasses.dataclass
class Weights:
    """Weights read from a source: `params` by our dotted paths; `ignored` names what the
    source holds outside the encoder and classifier head (decoders, pyramids, buffers)."""

    params: dict[str, np.ndarray]
    ignored: list[str]
    origin: str
    step: int = 0  # The checkpoint's train step (0 for weight files).


def _preview(items: list[str], sep: str = ", ") -> str:
    more = f" (+{len(items) - _PREVIEW} more)" if len(items) > _PREVIEW else ""
    return sep.join(items[:_PREVIEW]) + more


def _latest_step_dir(directory: epath.Path) -> epath.Path | None:
    """The newest committed step of a checkpoint directory (orbax renames a step directory
    to its number only once the save is complete)."""
    steps = [
        int(d.name) for d in directory.iterdir() if d.name.isdigit() and (d / "default").is_dir()
    ]
    return directory / str(max(steps)) if steps else None


def resolve(path: str) -> epath.Path:
    """The checkpoint step directory or weight file that `path` names (module docstring)."""
    p = epath.Path(path)
    if p.suffix in WEIGHT_FILES and p.is_file():
        return p
    if (p / "default").is_dir():
        return p
    for directory in (p / "checkpoints", p):
        if directory.is_dir():
            step_dir = _latest_step_dir(directory)
            if step_dir is not None:
                return step_dir
    raise ConfigError(
        f"config.init_from='{path}' is neither a workdir with checkpoints, a checkpoint step "
        f"directory nor a weight file ({', '.join(WEIGHT_FILES)})"
    )


def _split_params(flat: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """(encoder + classifier weights, other names) of a flat parameter dict."""
    keep = re.compile(r"^(encoder|head|fc_norm)\.")
    params = {k: v for k, v in flat.items() if keep.match(k)}
    return params, sorted(k for k in flat if not keep.match(k))


def read_checkpoint(step_dir: epath.Path) -> Weights:
    """`params` of a mim_jax checkpoint step as host numpy arrays (nothing else is read)."""
    item = step_dir / "default"
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # orbax warns that the item has no step metadata.
    try:
        metadata = ocp.StandardCheckpointer().metadata(str(item)).item_metadata.tree
    finally:
        absl_logger.setLevel(level)
    wanted = {"params": metadata["params"]}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
    restored = ocp.PyTreeCheckpointer().restore(
        str(item),
        args=ocp.args.PyTreeRestore(item=wanted, restore_args=restore_args, partial_restore=True),
    )
    flat = {
        k.removeprefix("params.").removesuffix(".value"): np.asarray(v)
        for k, v in pytree.flatten(restored).items()
    }
    params, ignored = _split_params(flat)
    step = int(step_dir.name) if step_dir.name.isdigit() else 0
    return Weights(params, ignored, f"checkpoint {step_dir}", step)


def _load_torch_file(data: bytes, name: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise ConfigError(
            f"config.init_from='{name}': reading .pth files needs torch (pip install "
            "torch==2.13.0, CPU build), or convert the file to .safetensors / .npz"
        ) from e
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    for wrapper in ("model", "state_dict", "module"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    return {k: v.float().numpy() for k, v in state.items() if hasattr(v, "float")}


def read_state_dict(path: epath.Path) -> dict[str, np.ndarray]:
    """A PyTorch-named state_dict from a .pth / .safetensors / .npz file, float32 numpy."""
    data = path.read_bytes()
    if path.suffix == ".npz":
        with np.load(io.BytesIO(data)) as archive:
            state = {k: archive[k] for k in archive.files}
    elif path.suffix == ".safetensors":
        import safetensors.numpy

        state = safetensors.numpy.load(data)
    else:
        state = _load_torch_file(data, str(path))
    state = {k.removeprefix("module."): np.asarray(v, np.float32) for k, v in state.items()}
    if any(k.startswith("encoder.") for k in state):
        state = {
            k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")
        }
    return state


def read_weights(path: str, kind: str) -> Weights:
    """Encoder (+ head) weights from `path` for an encoder of `kind` (module docstring)."""
    where = resolve(path)
    if where.suffix in WEIGHT_FILES:
        params, unmapped = convert.from_torch(read_state_dict(where), encoders.TORCH_TABLES[kind])
        return Weights(params, unmapped, f"weights {where}")
    return read_checkpoint(where)


@dataclasses.dataclass
class Report:
    """What `match` did, by parameter path."""

    loaded: list[str]
    resized: list[str]
    new: list[str]
    dropped: list[str]
    step: int = 0  # The source checkpoint's train step (0 for weight files).

    def line(self, origin: str) -> str:
        parts = [f"init_from {origin}: loaded {len(self.loaded)}"]
        for name in ("resized", "new", "dropped"):
            items = getattr(self, name)
            if items:
                parts.append(f"{name} {len(items)} ({_preview(items)})")
        return "; ".join(parts)


def _mismatch(origin: str, problems: list[str]) -> checkpoint.CheckpointMismatchError:
    return checkpoint.CheckpointMismatchError(
        f"init_from {origin} does not fit the model: {_preview(problems, '; ')}"
    )


def match(
    weights: Weights, target: dict[str, tuple[int, ...]], kind: str, *, strict: bool = False
) -> tuple[dict[str, np.ndarray], Report]:
    """The source values for the `target` paths (shapes) after `kind`'s surgery, and the
    report; raises CheckpointMismatchError naming the first problems (module docstring)."""
    try:
        source, resized = encoders.REMAP[kind](weights.params, target)
    except ValueError as e:  # A position table that surgery cannot resize.
        raise _mismatch(weights.origin, [str(e)]) from e
    values, new, dropped, problems = {}, [], [], []
    for path, shape in target.items():
        value = source.get(path)
        encoder = path.startswith("encoder.")
        if value is not None and tuple(value.shape) == tuple(shape):
            values[path] = value
        elif value is not None and (encoder or strict):
            problems.append(f"{path} is {tuple(value.shape)}, model wants {tuple(shape)}")
        elif strict or (encoder and not any(re.search(p, path) for p in NEW_OK)):
            problems.append(f"{path} missing")
        else:
            new.append(path)
    for path in sorted(set(source) - set(values)):
        if path in target:
            dropped.append(f"{path} (shape)")  # A head of another class count: starts fresh.
        elif path.startswith("encoder.") and not any(re.match(p, path) for p in UNUSED_OK):
            problems.append(f"{path} unused")
        else:
            dropped.append(path)
    if problems:
        raise _mismatch(weights.origin, problems)
    return values, Report(sorted(values), resized, new, dropped + weights.ignored, weights.step)


def _place(value: np.ndarray, like: jax.Array) -> jax.Array:
    """`value` as a global array with `like`'s dtype and sharding (every host holds it)."""
    value = np.asarray(value, like.dtype)
    return jax.make_array_from_callback(value.shape, like.sharding, lambda index: value[index])


def initialize(
    path: str, kind: str, params: nnx.State, *, strict: bool = False
) -> tuple[nnx.State, Report]:
    """`params` (a model's parameter state, placed on the mesh) with the weights of `path`
    loaded where they match; logs and returns the report."""
    weights = read_weights(path, kind)
    pure = nnx.to_pure_dict(params)
    flat = pytree.flatten(pure)
    values, report = match(
        weights, {k: tuple(v.shape) for k, v in flat.items()}, kind, strict=strict
    )
    logging.info("%s", report.line(weights.origin))
    placed = {k: _place(values[k], v) if k in values else v for k, v in flat.items()}
    state = jax.tree.map(lambda x: x, params)
    nnx.replace_by_pure_dict(state, pytree.unflatten(placed, pure))
    return state, report
