"""Block-level rematerialization (`config.remat`): what each encoder and decoder block keeps for
its backward pass.

  none  autodiff's (and the hand-written custom_vjp layers') residuals, all kept.
  full  only the block's inputs; the whole block runs again in the backward pass
        (`jax.checkpoint` with nothing saveable).
  dots  also the outputs of matmuls without batch dimensions (every Linear: qkv, proj, fc1,
        fc2); norms, GELU, softmax and the attention einsums (whose operands carry batch /
        head dimensions) run again from them (`dots_with_no_batch_dims_saveable`; unlike
        `dots_saveable` it does not keep the `[.., heads, q, k]` attention logits, the largest
        activations of a block).

The recomputation waits for the block's output cotangent. `jax.checkpoint` alone orders it
only with an optimization barrier over the saved values, which does not stop XLA:CPU from
scheduling the recomputed forward early, next to the original one: a stack of 8 checkpointed
MLP blocks compiled there to the same temp memory as without checkpointing (105 MB), and
SimMIM Swin-B/192 at batch 8 kept 80% of its temp memory. Here the saved values get
`+ 0 * (one element of the cotangent)` before the backward reads them (XLA keeps `x + 0 * y`
for floats): a data dependence every backend honours (the MLP stack: 14 MB), for one
elementwise pass over each block's saved values (its parameters included) per step.

The custom_vjp layers of `layers.py` compose with it: their forward rules run again in the
backward pass and their residuals come from that recomputation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

MODES = ("none", "full", "dots")
POLICIES = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def check(mode: str) -> str:
    """`mode` if it is one of MODES, else ValueError."""
    if mode not in MODES:
        raise ValueError(f"remat={mode!r} must be one of {', '.join(MODES)}")
    return mode


def _anchor(cotangents: Any) -> jax.Array:
    """0 times one element of the first floating-point cotangent: a scalar that exists only once
    the backward pass has reached the block."""
    for leaf in jax.tree.leaves(cotangents):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            return 0.0 * leaf.reshape(-1)[0].astype(jnp.float32)
    return jnp.zeros((), jnp.float32)


def _tie(leaf: Any, anchor: jax.Array) -> Any:
    if not isinstance(leaf, jax.Array) or not jnp.issubdtype(leaf.dtype, jnp.floating):
        return leaf
    return leaf + anchor.astype(leaf.dtype)


def checkpoint(f: Callable[..., Any], policy: Callable[..., bool] | None) -> Callable[..., Any]:
    """`jax.checkpoint(f, policy=policy)` (f pure, over pytrees of arrays) whose saved values
    reach the recomputation only through the output cotangent (module docstring)."""

    @jax.custom_vjp
    def rematerialized(*args):
        return f(*args)

    def fwd(*args):
        return jax.vjp(jax.checkpoint(f, policy=policy), *args)

    def bwd(vjp_fn, cotangents):
        anchor = _anchor(cotangents)
        return jax.tree.map(lambda leaf: _tie(leaf, anchor), vjp_fn)(cotangents)

    rematerialized.defvjp(fwd, bwd)
    return rematerialized


def call(mode: str, fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)` rematerialized per `mode`. `args` are modules, `nnx.Rngs` (drop path: the
    recomputation draws the same bits; the RNG counters advance once) and pytrees of arrays
    (or None); `fn` must not change a module's structure."""
    if mode == "none":
        return fn(*args)
    nodes = [i for i, a in enumerate(args) if isinstance(a, nnx.Pytree)]
    graphdef, state = nnx.split(tuple(args[i] for i in nodes))
    rest = [None if i in nodes else a for i, a in enumerate(args)]

    def pure(state, rest):
        merged = nnx.merge(graphdef, state)
        it = iter(merged)
        out = fn(*(next(it) if i in nodes else a for i, a in enumerate(rest)))
        return out, nnx.state(merged, nnx.RngCount)

    out, new_state = checkpoint(pure, POLICIES[check(mode)])(state, rest)
    nnx.update(tuple(args[i] for i in nodes), new_state)
    return out
