"""What a NaN or inf does to a run (`config.nonfinite`), inside the step and on the host.

`stop` (default): the host finds the first step whose loss, gradient norm or parameter norm is
not finite when it fetches the metrics (at log steps and before every save) and stops, naming
that step and the newest good checkpoint; the state after it is never saved.

`skip`: the jitted step applies an update only when the loss, the gradient norm and the
updated parameters' norm are finite; otherwise it keeps the parameters, optimizer state and
teacher, still advances the step (the data order is a function of the step) and reports
`skipped` = 1. The host counts skipped steps (`skipped_steps` in the logs and TensorBoard) and
stops after `config.max_skipped_steps` of them in a row. A skipped step's state is the previous
one, so no non-finite state exists to be saved.

`config.poison_loss_step` = k >= 0 makes step k's loss (and so its gradients) NaN: the tests'
way to exercise both modes through the real loop.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

CHECKED = ("loss", "grad_norm", "param_norm")


class NonFiniteLossError(FloatingPointError):
    """Loss, gradients or parameters became NaN/inf; no checkpoint is written after it."""


def poison(loss: jax.Array, step: jax.Array, poison_step: int) -> jax.Array:
    """`loss`, made NaN at logged step `poison_step` (the update from `step` = poison_step - 1)."""
    if poison_step < 0:
        return loss
    return loss * jnp.where(step + 1 == poison_step, jnp.nan, 1.0).astype(loss.dtype)


def update_is_finite(loss: jax.Array, grad_norm: jax.Array, param_norm: jax.Array) -> jax.Array:
    """Scalar bool: whether a step's update may be applied."""
    return jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(param_norm)


def keep_if(ok: jax.Array, new, old):
    """`new` where `ok`, else `old`, leaf by leaf (same structure; None leaves stay None)."""
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


class Guard:
    """Host-side policy over fetched `(step, metrics)` histories (module docstring)."""

    def __init__(self, mode: str, max_skipped: int, last_good: Callable[[], str]):
        """`last_good()` describes the newest good checkpoint for the stop message."""
        self.mode = mode
        self.max_skipped = max_skipped
        self.last_good = last_good
        self.in_a_row = 0
        self.total_skipped = 0

    def filter(
        self, history: list[tuple[int, dict[str, np.ndarray]]]
    ) -> tuple[list[dict[str, np.ndarray]], int]:
        """(metrics of the applied steps, without `skipped`; skipped count); raises
        NonFiniteLossError when the policy says stop."""
        kept, skipped = [], 0
        for step, metrics in history:
            if self.mode == "skip" and int(metrics["skipped"]):
                skipped += 1
                self.total_skipped += 1
                self.in_a_row += 1
                if self.in_a_row >= self.max_skipped:
                    raise NonFiniteLossError(
                        f"{self.in_a_row} steps in a row up to step {step} had a non-finite "
                        f"loss or gradient and were skipped (config.max_skipped_steps="
                        f"{self.max_skipped}): stopping; {self.last_good()}"
                    )
                continue
            self.in_a_row = 0
            for key in CHECKED:
                if not np.isfinite(metrics[key]):
                    raise NonFiniteLossError(
                        f"non-finite {key} ({metrics[key]}) at step {step}: stopping before any "
                        f"checkpoint of this state is written; {self.last_good()}"
                    )
            kept.append({k: v for k, v in metrics.items() if k != "skipped"})
        return kept, skipped
