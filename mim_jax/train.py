"""The one generic training loop (pretraining and fine-tuning): abstract init -> shardings ->
sharded init (+ `config.init_from` weights), a donated jitted step, orbax checkpoints with
auto-resume, CLU metrics, reconstruction grids, periodic evaluation, NaN guards.

A method (mim_jax/methods/*) is seen only through build_model, make_batch_transform, loss_fn and
the optional reconstruct (images for the grid), plus an optional teacher: a method that defines
`build_teacher(config, rngs)` gets a teacher model whose parameters live in the train state
(sharded by their logical names like the student's, checkpointed), initialized by
`init_teacher(config, student_params, teacher_params)` and advanced after every update by
`update_teacher(config, teacher_params, student_params, step, total_steps) -> (teacher_params,
metrics)` inside the jitted step (an EMA teacher; a frozen one returns its input). A fresh run
then calls the optional host-side `load_teacher(config, teacher_params) -> teacher_params` (e.g.
converted CLIP weights). `loss_fn` receives the teacher module (under stop_gradient) as
`teacher=`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from mim_jax import (
    checkpoint,
    config_checks,
    evaluate,
    init_from,
    nonfinite,
    optim,
    sharding,
    stop_signal,
    writers,
)
from mim_jax.accumulate import mean_over_micro_batches
from mim_jax.data import bad_examples, sources
from mim_jax.data import input as data_input
from mim_jax.methods import get_method

AUGMENT_STREAM = 0xA06  # Folded into the step key for the in-step augmentation stream.


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs besides the config: step, parameters, optimizer state
    and, for methods with a teacher, the teacher's parameters (else None)."""

    step: jax.Array
    params: nnx.State
    opt_state: optax.OptState
    teacher: nnx.State | None = None


@dataclasses.dataclass
class Setup:
    """A built experiment: model structure, shardings, state initializer and the step.

    Nothing is allocated until `init_state()` is called (a resumed run restores into
    `abstract_state` instead, so it never holds a second, freshly initialized copy).
    """

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    method: Any
    graphdef: nnx.GraphDef
    teacher_graphdef: nnx.GraphDef | None  # For methods with a teacher (module docstring).
    abstract_state: TrainState  # ShapeDtypeStructs carrying the target shardings.
    init_state: Callable[[], TrainState]
    schedule: optax.Schedule
    train_step: Callable
    steps_per_epoch: int
    total_steps: int
    place_batch: Callable[[dict], dict]  # Host-local batch -> global arrays on the mesh.


def schedule_steps(config: ml_collections.ConfigDict, num_examples: int) -> tuple[int, int]:
    """(steps per epoch, total steps) from the data set size and the config."""
    steps_per_epoch = max(1, num_examples // config.batch_size)
    total = config.total_steps if config.total_steps > 0 else config.num_epochs * steps_per_epoch
    return steps_per_epoch, int(total)


def _abstract_model(config: ml_collections.ConfigDict, method) -> nnx.Module:
    return nnx.eval_shape(lambda: method.build_model(config, nnx.Rngs(params=config.seed)))


def has_teacher(method) -> bool:
    """Whether the method keeps a teacher model in the train state."""
    return hasattr(method, "build_teacher")


def _build_teacher(config: ml_collections.ConfigDict, method) -> nnx.Module:
    return method.build_teacher(config, nnx.Rngs(params=config.seed + 2))


def make_train_step(
    config: ml_collections.ConfigDict,
    method,
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    teacher_graphdef: nnx.GraphDef | None = None,
    total_steps: int = 0,
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """The pure train step (not yet jitted): loss, grads, AdamW update, teacher update, metrics.

    With `config.accum_steps` = k > 1 the batch is split into k micro-batches (mim_jax/
    accumulate.py), scanned with the gradients summed; loss, aux metrics and gradients are
    their means, followed by one optimizer and teacher update. As micro-batches are
    equal-sized, the mean loss equals the full batch's for per-row means (GreenMIM, iTPN,
    cross-entropy); SimMIM's L1 divides by each micro-batch's masked-pixel count, which equals
    the full batch's share when every image masks the same number of patches (its masks do).
    """
    dropout_key = jax.random.key(config.seed + 1)
    accum = config.get("accum_steps", 1)
    group_keys = tuple(getattr(method, "GROUP_KEYS", ()))
    skip_nonfinite = config.get("nonfinite", "stop") == "skip"
    poison_step = config.get("poison_loss_step", -1)

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        step_key = jax.random.fold_in(dropout_key, state.step)
        kwargs = {}
        if teacher_graphdef is not None:
            frozen = jax.lax.stop_gradient(state.teacher)
            kwargs["teacher"] = nnx.merge(teacher_graphdef, frozen)

        def grads_of(params: nnx.State, batch: dict[str, jax.Array], key: jax.Array):
            def compute_loss(params: nnx.State):
                # Built inside the grad trace (NNX needs that): drop path, and in-step
                # augmentation (fine-tuning's Mixup/CutMix) on a separate stream.
                rngs = nnx.Rngs(dropout=key, augment=jax.random.fold_in(key, AUGMENT_STREAM))
                loss, aux = method.loss_fn(nnx.merge(graphdef, params), batch, rngs, **kwargs)
                return nonfinite.poison(loss, state.step, poison_step), aux

            return jax.value_and_grad(compute_loss, has_aux=True)(params)

        if accum == 1:
            (loss, aux), grads = grads_of(state.params, batch, step_key)
        else:
            (loss, aux), grads = mean_over_micro_batches(
                grads_of, state.params, batch, step_key, accum, group_keys
            )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        teacher = state.teacher
        if teacher_graphdef is not None:
            teacher, teacher_metrics = method.update_teacher(
                config, teacher, params, state.step, total_steps
            )
            aux = {**aux, **teacher_metrics}
        metrics = {
            "loss": loss,
            "grad_norm": optax.global_norm(grads),
            "param_norm": optax.global_norm(params),
            "lr": schedule(state.step),
            **aux,
        }
        if skip_nonfinite:  # mim_jax/nonfinite.py: a non-finite update is not applied.
            ok = nonfinite.update_is_finite(loss, metrics["grad_norm"], metrics["param_norm"])
            params, opt_state, teacher = nonfinite.keep_if(
                ok, (params, opt_state, teacher), (state.params, state.opt_state, state.teacher)
            )
            metrics["skipped"] = (~ok).astype(jnp.int32)
        new_state = TrainState(
            step=state.step + 1, params=params, opt_state=opt_state, teacher=teacher
        )
        return new_state, metrics

    return train_step


def setup(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, num_examples: int) -> Setup:
    """Builds the model abstractly and derives shardings; the state is born sharded on init."""
    method = get_method(config.method)
    steps_per_epoch, total_steps = schedule_steps(config, num_examples)
    graphdef, abstract_params = nnx.split(_abstract_model(config, method), nnx.Param)
    tx, schedule = optim.make_optimizer(config, abstract_params, steps_per_epoch, total_steps)
    rules = tuple(tuple(r) for r in config.sharding_rules)
    param_shardings = sharding.tree_shardings(
        abstract_params, nnx.get_partition_spec(abstract_params), rules, mesh
    )
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    replicated = sharding.replicated(mesh)
    opt_shardings = sharding.shardings_like_params(abstract_opt, param_shardings, replicated)
    teacher_graphdef = teacher_shardings = None
    if has_teacher(method):
        teacher_graphdef, abstract_teacher = nnx.split(
            nnx.eval_shape(lambda: _build_teacher(config, method)), nnx.Param
        )
        teacher_shardings = sharding.tree_shardings(
            abstract_teacher, nnx.get_partition_spec(abstract_teacher), rules, mesh
        )
    state_shardings = TrainState(
        step=replicated, params=param_shardings, opt_state=opt_shardings, teacher=teacher_shardings
    )

    def init() -> TrainState:
        model = method.build_model(config, nnx.Rngs(params=config.seed))
        params = nnx.state(model, nnx.Param)
        teacher = None
        if teacher_graphdef is not None:
            fresh = nnx.state(_build_teacher(config, method), nnx.Param)
            teacher = method.init_teacher(config, params, fresh)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            teacher=teacher,
        )

    init_jit = jax.jit(init, out_shardings=state_shardings)

    def init_state() -> TrainState:
        with jax.set_mesh(mesh):
            state = init_jit()
        if config.init_from:
            params, _ = init_from.initialize(config.init_from, config.model.name, state.params)
            state = state.replace(params=params)
            if teacher_graphdef is not None:  # An EMA teacher starts as the loaded student.
                state = state.replace(teacher=method.init_teacher(config, params, state.teacher))
        if teacher_graphdef is not None and hasattr(method, "load_teacher"):
            loaded = method.load_teacher(config, state.teacher)
            state = state.replace(teacher=jax.device_put(loaded, teacher_shardings))
        return state

    abstract = jax.tree.map(
        lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
        jax.eval_shape(init),
        state_shardings,
    )
    step_fn = jax.jit(
        make_train_step(
            config,
            method,
            graphdef,
            tx,
            schedule,
            teacher_graphdef=teacher_graphdef,
            total_steps=total_steps,
        ),
        in_shardings=(state_shardings, None),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )
    group_keys = getattr(method, "GROUP_KEYS", ())
    place_batch = functools.partial(
        sharding.global_batch,
        mesh=mesh,
        batch_size=config.batch_size,
        group_keys=group_keys,
        num_groups=method.num_mask_groups(config, mesh) if group_keys else 1,
    )
    return Setup(
        config=config,
        mesh=mesh,
        method=method,
        graphdef=graphdef,
        teacher_graphdef=teacher_graphdef,
        abstract_state=abstract,
        init_state=init_state,
        schedule=schedule,
        train_step=step_fn,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        place_batch=place_batch,
    )


def make_reconstruct_fn(s: Setup, num_images: int) -> Callable:
    """Jitted fn(params, batch) -> dict of replicated `[n, H, W, 3]` images for the grid.

    Runs on the whole (sharded) batch, whose layout may tie examples to per-group arrays
    (GreenMIM plans), and keeps the first `num_images`.
    """

    def fn(params: nnx.State, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        images = s.method.reconstruct(nnx.merge(s.graphdef, params), batch)
        return {k: v[:num_images] for k, v in images.items()}

    return jax.jit(fn, out_shardings=sharding.replicated(s.mesh))


# Host-side bookkeeping that the step does not consume.
HOST_ONLY_KEYS = ("index", "bad_records")


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[int, dict[str, float]]:
    """Pretrains or fine-tunes per `config`, resuming from the newest checkpoint in `workdir`
    (else starting from `config.init_from`, if set).

    Returns the metrics logged by this run: {step: interval means}.
    """
    config_checks.validate(config)
    mesh = sharding.make_mesh(config.mesh)
    sharding.check_batch_size(config.batch_size, mesh)
    if config.mode == "finetune" and config.num_classes <= 0:
        config.num_classes = data_input.num_classes(config)
    source = sources.make_source(config.data, config.data.split)
    num_examples = len(source)
    sharding.log_mesh(mesh)  # After the checks above: a bad config stays one line.
    s = setup(config, mesh, num_examples)
    with contextlib.ExitStack() as stack:
        stop = stop_signal.StopSignal(mesh)  # Installed first, restored last (after saves).
        stack.callback(stop.close)
        ckpt = checkpoint.Checkpointer(
            os.path.join(workdir, "checkpoints"),
            max_to_keep=config.keep_checkpoints,
            async_save=config.async_checkpointing,
        )
        # Runs last on exit: pending saves hold good states (non-finite ones never reach save).
        stack.callback(ckpt.close)
        latest = ckpt.latest_step()
        if latest is not None and config.init_from:
            logging.info("resuming from step %d; config.init_from is not read again", latest)
        state = s.init_state() if latest is None else ckpt.restore(latest, s.abstract_state)
        start_step = int(jax.device_get(state.step))
        writer = writers.Writer(workdir, config, total_steps=s.total_steps)
        stack.callback(writer.close)
        if start_step == 0:
            writer.write_config(config)
            writer.log_parameters(state.params)
        logging.info(
            "steps %d -> %d (%d per epoch, %d examples, global batch %d)",
            start_step,
            s.total_steps,
            s.steps_per_epoch,
            num_examples,
            config.batch_size,
        )
        batches = data_input.make_pretrain_iterator(
            config,
            start_step=start_step,
            batch_transform=s.method.make_batch_transform(config, s.mesh),
            rows=sharding.host_batch_rows(s.mesh, config.batch_size),
            source=source,
        )
        stack.callback(batches.close)
        bad = bad_examples.BadExamples(
            source.describe,
            num_examples,
            config.data.max_bad_fraction,
            examples_read=start_step * config.batch_size,
        )
        bad.restore(workdir)
        periodic = evaluate.PeriodicEval(s, workdir)
        stack.callback(periodic.close)
        guard = nonfinite.Guard(config.nonfinite, config.max_skipped_steps, ckpt.describe_latest)
        hooks = _Hooks(ckpt, writer, periodic, guard, stop, bad)
        return _loop(s, state, start_step, batches, hooks)


@dataclasses.dataclass
class _Hooks:
    """The host-side services one run's loop consults besides the step."""

    ckpt: checkpoint.Checkpointer
    writer: writers.Writer
    periodic: evaluate.PeriodicEval
    guard: nonfinite.Guard
    stop: stop_signal.StopSignal
    bad: bad_examples.BadExamples


def _write_logs(h: _Hooks, done: int, pending: list) -> dict[str, float]:
    """Fetches the interval's metrics, applies the non-finite policy, counts the unreadable
    images (over all hosts: every process calls this at the same steps), writes the means."""
    kept, skipped = h.guard.filter(jax.device_get(pending))
    h.bad.sync()
    h.bad.save(h.writer.workdir)
    extra = {"bad_examples": float(h.bad.count)}
    if h.guard.mode == "skip":
        extra["skipped_steps"] = float(skipped)
    logged = h.writer.write_metrics(done, kept, extra)
    h.bad.check()
    return logged


def _loop(
    s: Setup, state: TrainState, start_step: int, batches, h: _Hooks
) -> dict[int, dict[str, float]]:
    """Steps from `start_step` to the end (or to a stop signal); returns the logged metrics by
    step."""
    config = s.config
    has_images = hasattr(s.method, "reconstruct")
    reconstruct = make_reconstruct_fn(s, config.num_images) if has_images else None
    pending: list[tuple[int, dict[str, jax.Array]]] = []
    logged: dict[int, dict[str, float]] = {}
    with jax.set_mesh(s.mesh):
        for step in range(start_step, s.total_steps):
            host_batch = next(batches)
            h.bad.update(host_batch)
            batch = s.place_batch({k: v for k, v in host_batch.items() if k not in HOST_ONLY_KEYS})
            state, metrics = s.train_step(state, batch)
            done = step + 1
            pending.append((done, metrics))
            h.writer.step_done(done)
            is_last = done == s.total_steps
            stopping = h.ckpt.reached_preemption(done) or h.stop.should_stop(done)
            if done % config.log_every_steps == 0 or is_last or stopping:
                logged[done] = _write_logs(h, done, pending)
                pending = []
            if has_images and (done % config.image_every_steps == 0 or is_last):
                h.writer.write_reconstruction(
                    done, jax.device_get(reconstruct(state.params, batch))
                )
            results = h.periodic.maybe_run(done, state, is_last)
            if results is not None:
                writers.write_eval_results(h.writer.workdir, done, results, h.writer)
            if done % config.checkpoint_every_steps == 0 or is_last or stopping:
                if h.guard.mode == "stop":  # Under `skip` no non-finite state exists.
                    h.guard.filter(jax.device_get(pending))
                h.ckpt.save(done, state)
            if stopping:
                h.ckpt.wait()
                logging.warning(
                    "%s: saved checkpoint step %d to %s; exiting (run the same command to resume)",
                    h.stop.name or "preemption",
                    done,
                    h.ckpt.directory,
                )
                break
    return logged
