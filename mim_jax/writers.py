"""Logging and TensorBoard output, the one place that touches CLU: scalars, progress lines
(step, loss, img/s, ETA), config as hparams, parameter overview, reconstruction grids.
"""

from __future__ import annotations

import json
import logging
import time

import jax
import ml_collections
import numpy as np
from clu import metric_writers, parameter_overview, periodic_actions
from etils import epath
from flax import nnx
from PIL import Image

GRID_COLUMNS = ("input", "masked", "prediction", "pasted")
COUNTS = ("skipped_steps", "bad_examples")  # Shown in the progress line when non-zero.
GAP = 2


def reconstruction_grid(
    images: dict[str, np.ndarray], mean: tuple[float, ...], std: tuple[float, ...]
) -> np.ndarray:
    """uint8 grid: one row per image, columns input / masked / prediction / pasted.

    Inputs are in the normalized space `[n, H, W, 3]`; they are un-normalized with mean/std.
    """
    mean_ = np.asarray(mean, np.float32)
    std_ = np.asarray(std, np.float32)
    cols = [np.clip(images[k] * std_ + mean_, 0.0, 1.0) for k in GRID_COLUMNS]
    n, h, w, c = cols[0].shape
    grid = np.ones((n * h + (n - 1) * GAP, len(cols) * w + (len(cols) - 1) * GAP, c), np.float32)
    for i in range(n):
        for j, col in enumerate(cols):
            y, x = i * (h + GAP), j * (w + GAP)
            grid[y : y + h, x : x + w] = col[i]
    return (grid * 255.0 + 0.5).astype(np.uint8)


class Writer:
    """Metric writer for one run; only process 0 writes files, every process logs."""

    def __init__(self, workdir: str, config: ml_collections.ConfigDict, *, total_steps: int):
        self.workdir = epath.Path(workdir)  # Local paths and gs:// alike.
        self.config = config
        self.total_steps = total_steps
        self.is_chief = jax.process_index() == 0
        self.writer = metric_writers.create_default_writer(
            workdir, just_logging=not self.is_chief, asynchronous=True
        )
        self._last_time = time.perf_counter()
        self._last_step: int | None = None
        self.hooks: list[periodic_actions.PeriodicAction] = [
            periodic_actions.ReportProgress(
                num_train_steps=total_steps,
                writer=self.writer,
                every_steps=config.log_every_steps,
                every_secs=None,
            )
        ]
        if self.is_chief and config.profile_steps > 0:
            self.hooks.append(
                periodic_actions.Profile(
                    logdir=workdir, num_profile_steps=config.profile_steps, every_secs=None
                )
            )

    def step_done(self, step: int) -> None:
        """Runs the CLU periodic actions (progress/ETA notes, optional profiler trace)."""
        for hook in self.hooks:
            hook(step)

    def write_config(self, config: ml_collections.ConfigDict) -> None:
        """Records the config as TensorBoard hparams and as workdir/config.json."""
        self.writer.write_hparams({k: str(v) for k, v in _flatten_config(config.to_dict()).items()})
        if self.is_chief:
            self.workdir.mkdir(parents=True, exist_ok=True)
            (self.workdir / "config.json").write_text(config.to_json_best_effort(indent=2))

    def log_parameters(self, params: nnx.State) -> None:
        """Logs the parameter table (shapes, counts) once at the start."""
        pure = nnx.to_pure_dict(
            jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
        )
        parameter_overview.log_parameter_overview(pure, include_stats=False)

    def write_metrics(
        self,
        step: int,
        history: list[dict[str, np.ndarray]],
        extra: dict[str, float] | None = None,
    ) -> dict[str, float]:
        """Averages the interval's per-step metrics, adds `extra` (counts such as
        `skipped_steps`), writes them and logs a progress line. `history` may be empty (every
        step of the interval skipped)."""
        now = time.perf_counter()
        means = {k: float(np.mean([m[k] for m in history])) for k in (history or [{}])[0]}
        means.update(extra or {})
        if self._last_step is not None:
            dt = max(now - self._last_time, 1e-9)
            steps_per_s = (step - self._last_step) / dt
            means["img_per_sec"] = steps_per_s * self.config.batch_size
            means["img_per_sec_per_device"] = means["img_per_sec"] / jax.device_count()
            eta = (self.total_steps - step) / max(steps_per_s, 1e-9)
            rate = f"{means['img_per_sec']:.1f} img/s, ETA {_hms(eta)}"
        else:
            rate = f"first {len(history)} steps incl. compilation {now - self._last_time:.1f}s"
        self._last_time, self._last_step = now, step
        self.writer.write_scalars(step, means)
        counts = "".join(f"  {k} {means[k]:g}" for k in COUNTS if means.get(k))
        if history:
            logging.info(
                "step %d/%d  loss %.5f  lr %.3g  grad_norm %.3g%s  %s",
                step,
                self.total_steps,
                means["loss"],
                means["lr"],
                means["grad_norm"],
                counts,
                rate,
            )
        else:
            logging.warning(
                "step %d/%d  no update applied in this interval%s", step, self.total_steps, counts
            )
        return means

    def write_reconstruction(self, step: int, images: dict[str, np.ndarray]) -> None:
        """Writes the reconstruction grid to TensorBoard and workdir/reconstructions/."""
        grid = reconstruction_grid(images, self.config.data.mean, self.config.data.std)
        self.writer.write_images(step, {"reconstruction": grid[None]})
        if self.is_chief:
            out = self.workdir / "reconstructions"
            out.mkdir(parents=True, exist_ok=True)
            with (out / f"step_{step:08d}.png").open("wb") as f:
                Image.fromarray(grid).save(f, format="PNG")

    def close(self) -> None:
        """Flushes and closes the underlying writers."""
        self.writer.flush()
        self.writer.close()


def _flatten_config(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, list | tuple) else v
    return out


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


EVAL_RESULTS = "eval_results.json"


def write_eval_results(
    workdir: str, step: int, results: dict[str, float], writer: Writer | None = None
) -> None:
    """Logs evaluation results, writes them as TensorBoard scalars at `step` (through `writer`
    when a run has one) and, on process 0, merges them into workdir/eval_results.json."""
    logging.info(
        "evaluation at step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in results.items())
    )
    if writer is not None:
        writer.writer.write_scalars(step, results)
    else:
        scalars = metric_writers.create_default_writer(
            workdir, just_logging=jax.process_index() != 0
        )
        scalars.write_scalars(step, results)
        scalars.close()
    if jax.process_index() == 0:
        path = epath.Path(workdir) / EVAL_RESULTS
        old = json.loads(path.read_text()) if path.exists() else {}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**old, **results}, indent=2, sort_keys=True) + "\n")
