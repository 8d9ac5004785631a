"""One process of the localhost multi-process runs in tests/test_multiprocess.py (or a single
process, the reference): trains a tiny config of a method with `train.train`, the same loop
as the CLI, and writes what it saw as JSON: the logged metrics per step, the global example
positions this host read, its pid and process index.

  python tests/multiprocess_worker.py --method=simmim --workdir=... --out=... \
      [--process_id=0 --num_processes=2 --port=PORT] [--mesh=8,1,1] [--dcn=2]
      [--order=interleaved] [--groups=2] [--steps=4] [--sigterm_at=STEP]

`--order=interleaved` builds the mesh over the devices of both processes alternately (not
host-major, as TPU meshes from `jax.make_mesh` often are).
"""

import argparse
import functools
import json
import os
import pathlib
import signal
import sys

import jax
from absl import flags

sys.path[:0] = [str(pathlib.Path(__file__).parent), str(pathlib.Path(__file__).parents[1])]


def _config(method: str, args: argparse.Namespace):
    from helpers import tiny_greenmim_config, tiny_itpn_config, tiny_simmim_config

    if method == "simmim":
        c = tiny_simmim_config()
    elif method == "greenmim":
        c = tiny_greenmim_config()
        c.mask.groups = args.groups
    else:
        c = tiny_itpn_config()
    data, fsdp, tensor = (int(v) for v in args.mesh.split(","))
    c.mesh.update(data=data, fsdp=fsdp, tensor=tensor, dcn_data=args.dcn)
    c.update(total_steps=args.steps, checkpoint_every_steps=args.checkpoint_every)
    c.update(image_every_steps=args.steps, log_every_steps=1)
    return c


def _interleaved(devices: list) -> list:
    """Devices of all processes alternately: process 0's first, process 1's first, ..."""
    by_process = sorted({d.process_index for d in devices})
    columns = [[d for d in devices if d.process_index == p] for p in by_process]
    return [d for row in zip(*columns, strict=True) for d in row]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--process_id", type=int, default=0)
    parser.add_argument("--num_processes", type=int, default=1)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--mesh", default="-1,1,1")
    parser.add_argument("--dcn", type=int, default=1)
    parser.add_argument("--order", default="default")
    parser.add_argument("--groups", type=int, default=0)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--checkpoint_every", type=int, default=1000)
    parser.add_argument("--sigterm_at", type=int, default=0, help="Process 0 only: SIGTERM itself.")
    args = parser.parse_args()
    if args.num_processes > 1:
        jax.distributed.initialize(
            coordinator_address=f"localhost:{args.port}",
            num_processes=args.num_processes,
            process_id=args.process_id,
        )
    flags.FLAGS.mark_as_parsed()

    from mim_jax import sharding, train
    from mim_jax.data import input as data_input

    if args.order == "interleaved":
        make_mesh = sharding.make_mesh
        sharding.make_mesh = functools.partial(make_mesh, devices=_interleaved(jax.devices()))

    seen: list[int] = []
    real_iterator = data_input.make_pretrain_iterator

    def recording_iterator(*a, **kw):
        inner = real_iterator(*a, **kw)

        class Recorder:
            def __next__(self):
                batch = next(inner)
                seen.extend(int(i) for i in batch["index"])
                if len(seen) == args.sigterm_at * len(batch["index"]) and jax.process_index() == 0:
                    os.kill(os.getpid(), signal.SIGTERM)
                return batch

            def close(self):
                inner.close()

        return Recorder()

    data_input.make_pretrain_iterator = recording_iterator
    logged = train.train(_config(args.method, args), args.workdir)
    result = {
        "metrics": {str(step): values for step, values in logged.items()},
        "indices": seen,
        "pid": os.getpid(),
        "process": jax.process_index(),
    }
    pathlib.Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
