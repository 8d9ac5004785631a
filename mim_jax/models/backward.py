"""Hand-written backward passes that can be switched off, to measure what each one buys.

The memory-saving backwards (`layers.linear`, `layer_norm`, `_norm_linear`, `gelu`,
`softmax`, GreenMIM's `permute_tokens`, `grouped_core` and `take_rows`, the norm-pix head's
`linear_mse`) are declared with `custom_vjp` here instead of `jax.custom_vjp`. With
`MIM_JAX_AUTODIFF=all` (or a comma-separated list of their function names) in the environment
when a step is traced, the named ones are differentiated by autodiff of the same forward: same
values, autodiff's residuals. `mim_jax.plan` reports the switch, so a TPU memory plan can be
compared with and without them.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence

import jax

ENV = "MIM_JAX_AUTODIFF"


def autodiff_names() -> frozenset[str]:
    """The function names (or 'all') whose hand-written backward is switched off now."""
    return frozenset(n.strip() for n in os.environ.get(ENV, "").split(",") if n.strip())


class custom_vjp:  # noqa: N801  (a drop-in for jax.custom_vjp)
    """`jax.custom_vjp(fun)` unless `fun`'s name (or 'all') is in MIM_JAX_AUTODIFF."""

    def __init__(self, fun: Callable, nondiff_argnums: Sequence[int] = ()):
        functools.update_wrapper(self, fun)
        self._fun = fun
        self._custom = jax.custom_vjp(fun, nondiff_argnums=tuple(nondiff_argnums))

    def defvjp(self, fwd: Callable, bwd: Callable) -> None:
        """As `jax.custom_vjp.defvjp`."""
        self._custom.defvjp(fwd, bwd)

    def __call__(self, *args):
        off = autodiff_names()
        autodiff = "all" in off or self._fun.__name__ in off
        return (self._fun if autodiff else self._custom)(*args)
