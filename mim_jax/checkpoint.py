"""Orbax checkpointing of the whole train state: async saves, keep-N, preemption, and restore
onto the current mesh (so checkpoints move between device counts).

A restore whose shapes do not match the model fails with one line naming the first
mismatching parameters instead of orbax's traceback.
"""

from __future__ import annotations

import contextlib
import logging
import os

import orbax.checkpoint as ocp

from mim_jax.pytree import flatten


class CheckpointMismatchError(ValueError):
    """The checkpoint on disk does not fit the model built from the config."""


class CheckpointSaveError(OSError):
    """A checkpoint could not be written (disk full, permission denied); older ones are kept."""


class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager` for one train-state item."""

    def __init__(
        self,
        directory: str,
        *,
        max_to_keep: int,
        async_save: bool = True,
        best_metric: str | None = None,
    ):
        """With `best_metric`, the kept checkpoints are the highest by that metric (saved with
        `save_if_best`) instead of the newest."""
        if "://" not in directory:
            directory = os.path.abspath(directory)
        self.directory = directory
        self.best_metric = best_metric
        self._best: float | None = None
        best = {}
        if best_metric is not None:
            best = dict(
                best_fn=lambda metrics: metrics[best_metric],
                best_mode="max",
                keep_checkpoints_without_metrics=False,
            )
        self.manager = ocp.CheckpointManager(
            directory,
            item_handlers=ocp.StandardCheckpointHandler(),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                create=True,
                enable_async_checkpointing=async_save,
                **best,
            ),
        )

    def latest_step(self) -> int | None:
        """Newest fully written checkpoint step, or None."""
        return self.manager.latest_step()

    def save(self, step: int, state) -> None:
        """Starts saving `state` at `step` (async; committed atomically when done).

        A failed write (of this save or of the previous async one) raises CheckpointSaveError;
        the checkpoints already committed stay (orbax deletes old ones only after a commit).
        """
        with self._write_errors(step):
            self.manager.save(step, args=ocp.args.StandardSave(state), force=True)
        logging.info("saving checkpoint for step %d to %s", step, self.directory)

    def wait(self) -> None:
        """Blocks until pending saves are committed; CheckpointSaveError if one failed."""
        with self._write_errors(None):
            self.manager.wait_until_finished()

    @contextlib.contextmanager
    def _write_errors(self, step: int | None):
        try:
            yield
        except OSError as e:
            what = "a checkpoint" if step is None else f"checkpoint step {step}"
            raise CheckpointSaveError(
                f"cannot write {what} to {self.directory}: {e}; {self.describe_latest(step)}"
            ) from e

    def describe_latest(self, exclude: int | None = None) -> str:
        """'the last good checkpoint is step N in DIR' (or that there is none yet), leaving
        out step `exclude` (a save that failed)."""
        steps = [s for s in self.manager.all_steps() if s != exclude]
        if not steps:
            return f"no checkpoint in {self.directory} yet"
        return f"the last good checkpoint is step {max(steps)} in {self.directory}"

    def best_value(self) -> float | None:
        """The best `best_metric` value saved so far (it survives restarts), or None."""
        if self._best is None:
            step = self.manager.best_step()
            metrics = None if step is None else self.manager.metrics(step)
            self._best = None if metrics is None else float(metrics[self.best_metric])
        return self._best

    def save_if_best(self, step: int, state, metrics: dict[str, float]) -> float:
        """Saves `state` when `metrics[best_metric]` beats every earlier one; returns the best
        value after this step."""
        best = self.best_value()
        value = float(metrics[self.best_metric])
        if best is not None and value <= best:
            return best
        self.manager.save(
            step, args=ocp.args.StandardSave(state), metrics={self.best_metric: value}, force=True
        )
        self._best = value
        logging.info(
            "new best %s %.4g at step %d: saved to %s",
            self.best_metric,
            value,
            step,
            self.directory,
        )
        return value

    def reached_preemption(self, step: int) -> bool:
        """True when the cluster signalled preemption and every host should save now."""
        return self.manager.reached_preemption(step)

    def _check_shapes(self, step: int, abstract_state) -> None:
        stored = flatten(self.manager.item_metadata(step).tree)
        expected = flatten(abstract_state)
        stored = {k.removesuffix(".value"): v for k, v in stored.items()}
        problems = []
        for path, leaf in expected.items():
            key = path.removesuffix(".value")
            meta = stored.get(key)
            if meta is None:
                problems.append(f"{key} missing")
            elif tuple(meta.shape) != tuple(leaf.shape):
                problems.append(f"{key} is {tuple(meta.shape)}, model wants {tuple(leaf.shape)}")
        if problems:
            more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
            raise CheckpointMismatchError(
                f"checkpoint step {step} in {self.directory} does not match the config: "
                + "; ".join(problems[:3])
                + more
            )

    def restore(self, step: int, abstract_state):
        """Restores `step` with the shardings given in `abstract_state` (ShapeDtypeStructs)."""
        self._check_shapes(step, abstract_state)
        state = self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
        logging.info("restored checkpoint step %d from %s", step, self.directory)
        return state

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        with self._write_errors(None):
            self.manager.close()
