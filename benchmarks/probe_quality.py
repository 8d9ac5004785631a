r"""Does pretraining learn? Pretrains the SimMIM quickstart, then measures kNN, linear-probe
and fine-tuning top-1 of the pretrained encoder next to a randomly initialized encoder of the
same config, on the bundled labeled photos (train and validation from disjoint regions).
Prints one JSON line.

  python benchmarks/probe_quality.py --workdir=/tmp/probe_quality
  python benchmarks/probe_quality.py --workdir=/tmp/pq --pretrain_steps=1200 --finetune_steps=300

Everything runs in this process through the same code as the CLI jobs: `train.train` for
pretraining and fine-tuning (configs/simmim.py:quickstart, configs/finetune.py:quickstart) and
`evaluate.run` for configs/evaluate.py:knn / :linear_probe. The random-init baselines use the
same configs with `init_from` empty. An existing pretraining workdir is resumed, not redone.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import ml_collections
from absl import app, flags, logging
from probe import host_info

from mim_jax import evaluate, train

ROOT = pathlib.Path(__file__).parents[1]
FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Where the runs go (one sub-directory per job).")
flags.DEFINE_integer("pretrain_steps", 600, "SimMIM quickstart pretraining steps.")
flags.DEFINE_integer("finetune_steps", 300, "Fine-tuning steps (each of the two encoders).")
flags.mark_flags_as_required(["workdir"])


def load_config(name: str, arg: str) -> ml_collections.ConfigDict:
    """`get_config(arg)` of configs/<name>.py."""
    spec = importlib.util.spec_from_file_location(f"config_{name}", ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def measure(workdir: str, init_from: str, finetune_steps: int) -> dict[str, float]:
    """kNN, linear-probe and fine-tuning top-1 (percent) of the encoder `init_from` names
    (random when empty)."""
    results = {}
    for kind in ("knn", "linear_probe"):
        config = load_config("evaluate", kind)
        config.init_from = init_from
        results.update(evaluate.run(config, os.path.join(workdir, kind)))
    config = load_config("finetune", f"quickstart,total_steps={finetune_steps}")
    config.init_from = init_from
    config.eval.every_steps = finetune_steps
    finetune_dir = os.path.join(workdir, "finetune")
    train.train(config, finetune_dir)
    with open(os.path.join(finetune_dir, "eval_results.json")) as f:
        results["finetune_top1"] = json.load(f)["top1"]
    return {k: round(v, 2) for k, v in results.items() if k.endswith("top1")}


def main(argv: list[str]) -> None:
    del argv
    start = time.perf_counter()
    pretrain_dir = os.path.join(FLAGS.workdir, "pretrain")
    config = load_config("simmim", f"quickstart,total_steps={FLAGS.pretrain_steps}")
    losses = train.train(config, pretrain_dir)
    pretrained = measure(
        os.path.join(FLAGS.workdir, "pretrained"), pretrain_dir, FLAGS.finetune_steps
    )
    random_init = measure(os.path.join(FLAGS.workdir, "random_init"), "", FLAGS.finetune_steps)
    line = {
        "benchmark": "probe_quality",
        "pretrain": "configs/simmim.py:quickstart",
        "pretrain_steps": FLAGS.pretrain_steps,
        "final_pretrain_loss": round(losses[max(losses)]["loss"], 4) if losses else None,
        "finetune_steps": FLAGS.finetune_steps,
        "pretrained": pretrained,
        "random_init": random_init,
        "linear_probe_gain": round(
            pretrained["linear_probe_top1"] - random_init["linear_probe_top1"], 2
        ),
        "seconds": round(time.perf_counter() - start, 1),
        "platform": jax.devices()[0].platform,
        **host_info(),
    }
    logging.info("probe quality: %s", line)
    print(json.dumps(line))


if __name__ == "__main__":
    app.run(main)
