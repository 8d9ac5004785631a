"""Graceful stops on SIGTERM / SIGINT / SIGUSR1: save at the next step boundary, then exit 0.

Preemptible VMs and Kubernetes send SIGTERM before a kill, SLURM sends a chosen signal before
its time limit (`#SBATCH --signal=USR1@120`), and Ctrl-C sends SIGINT. The first of these only
sets a flag; the train loop asks `should_stop(step)` after dispatching each step and, when it
is true, saves a checkpoint at that step, waits for it to commit and returns. A second signal
exits at once (status 128 + signal number): a checkpoint being written then is left
uncommitted, which orbax ignores on restore (its writes go to a temporary directory renamed on
commit), so the previous checkpoint stays the newest.

With several processes, every host must stop at the same step (the save is collective) even
though the signal may reach only some of them. Each host's flag goes through a max over all
devices, dispatched after step t and read after step t + 1 has been dispatched: the read waits
only for step t, never stalls the device queue, and gives every host the same answer.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopSignal:
    """Installs the handlers (main thread only) until `close()`; `should_stop(step)` is the
    hosts' agreed answer at a step boundary."""

    def __init__(self, mesh: jax.sharding.Mesh | None = None):
        self.received: int | None = None  # The first signal's number.
        self._previous: dict[int, object] = {}
        self._pending: jax.Array | None = None
        self._sharding = None
        if mesh is not None and jax.process_count() > 1:
            flat = jax.sharding.Mesh(mesh.devices.reshape(-1), ("hosts",))
            self._sharding = NamedSharding(flat, PartitionSpec("hosts"))
            self._any = jax.jit(jnp.max, out_shardings=NamedSharding(flat, PartitionSpec()))
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        del frame
        if self.received is not None:  # A second signal: no more waiting.
            os.write(2, f"\n{signal.Signals(signum).name} again: exiting now\n".encode())
            os._exit(128 + signum)
        self.received = signum

    @property
    def name(self) -> str:
        """The received signal's name, e.g. 'SIGTERM' ('' before any)."""
        return "" if self.received is None else signal.Signals(self.received).name

    def should_stop(self, step: int) -> bool:
        """Whether every host stops after `step` (one process: a signal has arrived)."""
        if self._sharding is None:
            return self.received is not None
        agreed = self._pending is not None and bool(jax.device_get(self._pending))
        local = np.full(
            (len(self._sharding.addressable_devices),), self.received is not None, np.int32
        )
        flags = jax.make_array_from_process_local_data(self._sharding, local, (jax.device_count(),))
        self._pending = self._any(flags)
        if agreed:
            logging.warning("stop requested on some host: stopping after step %d", step)
        return agreed

    def close(self) -> None:
        """Restores the handlers that were installed before."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
