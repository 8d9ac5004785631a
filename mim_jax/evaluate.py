"""Evaluation on one feature path: a jitted, sharded forward over an ordered pass of a split
(mim_jax.data.input.make_eval_iterator), gathered on the host, then top-1/top-5, weighted kNN
or a linear probe (mim_jax.probes).

Jobs (`config.mode == "evaluate"`, `config.eval.kind`):
  top1          a fine-tuned classifier restored from `config.init_from` (every parameter must
                load), top-1 / top-5 on `config.data.val_split`;
  knn           the pooled features of a pretrained encoder (any method's checkpoint or official
                weights): the bank is `config.data.split`, the queries `val_split`; DINO's
                weighted vote over the k nearest by cosine (`eval.knn_k`, `eval.knn_temperature`);
  linear_probe  the same frozen features, extracted once; a linear classifier trained on the
                bank with optax (`eval.linear_probe`), accuracy on `val_split`.
Each writes its metrics (percent) to workdir/eval_results.json and TensorBoard. Features are
evaluation transforms (resize + centre crop) of both splits, no augmentation.

During training, `PeriodicEval` runs top-1/top-5 of the fine-tuned classifier every
`eval.every_steps` (keeping the best checkpoint beside the last), or, for pretraining with
`eval.knn_every_steps`, the kNN top-1 of the current encoder.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mim_jax import checkpoint, config_checks, init_from, probes, sharding, writers
from mim_jax.config_lib import ConfigError
from mim_jax.data import input as data_input
from mim_jax.data.sources import DataError
from mim_jax.methods import classification
from mim_jax.models import encoders


class FeatureExtractor(nnx.Module):
    """An encoder seen through its pooled features (`encoders.pooled_features`); parameters
    under `encoder.` as in every pretraining model and the classifier."""

    def __init__(self, encoder: nnx.Module):
        self.encoder = encoder

    def __call__(self, images: jax.Array) -> jax.Array:
        """images `[batch, H, W, 3]` -> `[batch, C]` float32."""
        return encoders.pooled_features(self.encoder, images).astype(jnp.float32)


def build_feature_model(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> FeatureExtractor:
    """The encoder of `config.model` (no mask token), for frozen-feature evaluation."""
    dtype = jnp.dtype(config.dtype)
    return FeatureExtractor(encoders.build_encoder(config.model, rngs=rngs, dtype=dtype))


def _subset(tree: dict, like: dict) -> dict:
    """The entries of nested dict `tree` at the keys of `like` (recursively)."""
    return {k: _subset(tree[k], v) if isinstance(v, dict) else tree[k] for k, v in like.items()}


def make_forward(
    graphdef: nnx.GraphDef, abstract: nnx.State, mesh: jax.sharding.Mesh, *, select: bool = False
) -> Callable:
    """Jitted fn(params, batch) -> (outputs, labels, valid), all replicated: the model of
    `graphdef` (without dropout) on `batch['image']`. With `select`, `params` may be a larger
    state holding the model's parameters (a pretraining model's for the feature extractor):
    only the paths of `abstract` are taken."""
    like = nnx.to_pure_dict(abstract)

    def forward(params: nnx.State, batch: dict[str, jax.Array]):
        if select:
            state = jax.tree.map(lambda x: x, abstract)
            nnx.replace_by_pure_dict(state, _subset(nnx.to_pure_dict(params), like))
            params = state
        outputs = nnx.merge(graphdef, params)(batch["image"])
        return outputs.astype(jnp.float32), batch["label"], batch["valid"]

    return jax.jit(forward, out_shardings=sharding.replicated(mesh))


def extract(
    forward: Callable, params: nnx.State, data: data_input.EvalData, mesh: jax.sharding.Mesh
) -> tuple[np.ndarray, np.ndarray]:
    """(outputs `[N, ...]`, labels `[N]`) of every valid example of one pass, in order."""
    if data.num_examples == 0:
        raise DataError("an evaluation split holds no examples")
    outputs, labels = [], []
    with jax.set_mesh(mesh):
        for _ in range(data.num_batches):
            batch = sharding.global_batch(next(data.batches), mesh, batch_size=data.batch_size)
            out, label, valid = (np.asarray(x.addressable_data(0)) for x in forward(params, batch))
            outputs.append(out[valid])
            labels.append(label[valid])
    data.batches.close()
    return np.concatenate(outputs), np.concatenate(labels)


def eval_data(
    config: ml_collections.ConfigDict, split: str, max_examples: int, mesh
) -> data_input.EvalData:
    """One ordered pass over `split` in global batches of `config.eval.batch_size`, this host
    reading the rows its devices hold."""
    batch = config.eval.batch_size
    rows = sharding.host_batch_rows(mesh, batch)
    return data_input.make_eval_iterator(
        config, split, batch_size=batch, max_examples=max_examples, rows=rows
    )


def topk_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """{'top1', 'top5'} in percent (ties to the lower class index)."""
    accuracy = probes.topk_accuracy(logits, labels, ks=(1, 5))
    return {"top1": 100.0 * accuracy[1], "top5": 100.0 * accuracy[5]}


@dataclasses.dataclass
class FeatureSplits:
    """Pooled features and labels of the bank (training) split and the validation split."""

    bank: np.ndarray
    bank_labels: np.ndarray
    val: np.ndarray
    val_labels: np.ndarray


def extract_splits(
    config: ml_collections.ConfigDict, forward: Callable, params: nnx.State, mesh
) -> FeatureSplits:
    """Features of `config.data.split` and `val_split` (subsets per `config.eval`)."""
    e, d = config.eval, config.data
    bank = eval_data(config, d.split, e.max_train_examples, mesh)
    val = eval_data(config, d.val_split, e.max_val_examples, mesh)
    return FeatureSplits(
        *extract(forward, params, bank, mesh), *extract(forward, params, val, mesh)
    )


def knn_metrics(
    config: ml_collections.ConfigDict, f: FeatureSplits, num_classes: int, mesh
) -> dict[str, float]:
    """{'knn_top1', 'knn_top5'} in percent."""
    scores = probes.knn_scores(
        f.bank,
        f.bank_labels,
        f.val,
        num_classes=num_classes,
        mesh=mesh,
        k=min(config.eval.knn_k, len(f.bank)),
        temperature=config.eval.knn_temperature,
    )
    accuracy = probes.topk_accuracy(scores, f.val_labels, ks=(1, 5))
    return {"knn_top1": 100.0 * accuracy[1], "knn_top5": 100.0 * accuracy[5]}


def linear_probe_metrics(
    config: ml_collections.ConfigDict, f: FeatureSplits, num_classes: int, mesh
) -> dict[str, float]:
    """{'linear_probe_top1', 'linear_probe_top5'} in percent."""
    settings = probes.LinearProbeSettings(**config.eval.linear_probe.to_dict())
    probe = probes.train_linear_probe(
        f.bank, f.bank_labels, num_classes=num_classes, settings=settings, mesh=mesh
    )
    accuracy = probes.topk_accuracy(probe.logits(f.val), f.val_labels, ks=(1, 5))
    return {"linear_probe_top1": 100.0 * accuracy[1], "linear_probe_top5": 100.0 * accuracy[5]}


def _restored(model_fn: Callable, config, mesh, *, strict: bool) -> tuple:
    """(graphdef, abstract params, params on the mesh with `config.init_from` loaded, step)."""
    graphdef, abstract = nnx.split(nnx.eval_shape(model_fn), nnx.Param)
    rules = tuple(tuple(r) for r in config.sharding_rules)
    shardings = sharding.tree_shardings(abstract, nnx.get_partition_spec(abstract), rules, mesh)
    with jax.set_mesh(mesh):
        params = jax.jit(lambda: nnx.state(model_fn(), nnx.Param), out_shardings=shardings)()
    if not config.init_from:
        logging.warning("config.init_from is empty: evaluating a randomly initialized encoder")
        return graphdef, abstract, params, 0
    params, report = init_from.initialize(
        config.init_from, config.model.name, params, strict=strict
    )
    return graphdef, abstract, params, report.step


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """The evaluation job of `config.eval.kind` (module docstring); returns its metrics."""
    config_checks.validate(config)
    mesh = sharding.make_mesh(config.mesh)
    shards = sharding.batch_shards(mesh)
    if config.eval.batch_size % shards:
        raise ConfigError(
            f"config.eval.batch_size={config.eval.batch_size} must be divisible by data*fsdp="
            f"{shards}"
        )
    num_classes = config.num_classes or data_input.num_classes(config)
    if config.init_from:  # A wrong path fails before anything is compiled.
        init_from.resolve(config.init_from)
    sharding.log_mesh(mesh)
    rngs = lambda: nnx.Rngs(params=config.seed)
    if config.eval.kind == "top1":
        model_fn = lambda: classification.build_classifier(config, num_classes, rngs())
    else:
        model_fn = lambda: build_feature_model(config, rngs())
    strict = config.eval.kind == "top1"
    graphdef, abstract, params, step = _restored(model_fn, config, mesh, strict=strict)
    forward = make_forward(graphdef, abstract, mesh)
    if config.eval.kind == "top1":
        e = config.eval
        val = eval_data(config, config.data.val_split, e.max_val_examples, mesh)
        results = topk_metrics(*extract(forward, params, val, mesh))
    else:
        features = extract_splits(config, forward, params, mesh)
        metric = knn_metrics if config.eval.kind == "knn" else linear_probe_metrics
        results = metric(config, features, num_classes, mesh)
    writers.write_eval_results(workdir, step, results)
    return results


class PeriodicEval:
    """Evaluation inside the train loop (module docstring): `maybe_run(step, state, is_last)`
    returns the metrics when one is due (else None) and, when fine-tuning, saves the state of
    the best top-1 so far in workdir/checkpoints_best (one kept)."""

    def __init__(self, s, workdir: str):
        config = s.config
        self.config, self.mesh = config, s.mesh
        self.finetune = config.mode == "finetune"
        self.every = config.eval.every_steps if self.finetune else config.eval.knn_every_steps
        self.best = None
        if self.every <= 0:
            return
        if config.eval.batch_size % sharding.batch_shards(s.mesh):
            raise ConfigError(
                f"config.eval.batch_size={config.eval.batch_size} must be divisible by "
                f"data*fsdp={sharding.batch_shards(s.mesh)}"
            )
        if self.finetune:
            abstract = jax.tree.map(lambda x: x, s.abstract_state.params)
            self.forward = make_forward(s.graphdef, abstract, s.mesh)
            self.best = checkpoint.Checkpointer(
                os.path.join(workdir, "checkpoints_best"), max_to_keep=1, best_metric="top1"
            )
        else:
            graphdef, abstract = nnx.split(
                nnx.eval_shape(lambda: build_feature_model(config, nnx.Rngs(0))), nnx.Param
            )
            self.forward = make_forward(graphdef, abstract, s.mesh, select=True)
            self.num_classes = data_input.num_classes(config)

    def maybe_run(self, step: int, state, is_last: bool) -> dict[str, float] | None:
        """Metrics of `state` at `step` when an evaluation is due."""
        if self.every <= 0 or not (step % self.every == 0 or is_last):
            return None
        e = self.config.eval
        if not self.finetune:
            features = extract_splits(self.config, self.forward, state.params, self.mesh)
            return knn_metrics(self.config, features, self.num_classes, self.mesh)
        val = eval_data(self.config, self.config.data.val_split, e.max_val_examples, self.mesh)
        results = topk_metrics(*extract(self.forward, state.params, val, self.mesh))
        best = self.best.save_if_best(step, state, results)
        return {**results, "best_top1": best}

    def close(self) -> None:
        """Waits for the best checkpoint's pending save."""
        if self.best is not None:
            self.best.close()
