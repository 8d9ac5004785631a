"""Counts the unreadable images that the training pipeline replaced, over worker processes and
hosts, and stops the run when they are too many.

Every training example carries 'bad_records' int64 `[MAX_REPLACEMENTS]`: the unreadable
records it replaced, padded with -1 (mim_jax.data.input). `BadExamples` keeps the distinct ones
with their paths. The rule (`check`): with `D = min(examples_read, dataset_size)` (after one
epoch every record has been read, so the count tends to the data set's unreadable share), the
run stops once more than `max(always_allowed, max_bad_fraction * D)` distinct records are
unreadable. `always_allowed` (default 10) keeps a few bad files in the first batches from
stopping a run by chance; the fraction rules from then on.

In the train loop (all processes):

    bad = BadExamples(source.describe, num_examples, max_bad_fraction,
                      examples_read=start_step * config.batch_size)
    bad.restore(workdir)              # the distinct records that earlier runs found
    bad.update(batch)                 # every step, before dropping host-only keys
    bad.sync(); bad.check()           # at log steps; log bad.count
    bad.save(workdir)                 # with each checkpoint (writes on process 0 only)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from mim_jax.data.sources import DataError

BAD_EXAMPLES_FILE = "bad_examples.json"
ALWAYS_ALLOWED = 10  # Distinct unreadable files tolerated whatever the fraction.
LOGGED_PATHS = 10  # The first distinct unreadable files are logged by path.


def _gather(new: np.ndarray, reads: int) -> tuple[np.ndarray, int]:
    """(the union of every process's `new` records, the sum of their `reads`): two allgathers,
    the counts first so that every process pads its records to the same length."""
    counts = multihost_utils.process_allgather(np.array([len(new), reads], np.int32))
    width = int(counts[:, 0].max())
    if width == 0:
        return np.zeros(0, np.int32), int(counts[:, 1].sum())
    padded = np.full(width, -1, np.int32)
    padded[: len(new)] = new
    everyone = np.asarray(multihost_utils.process_allgather(padded))
    return np.unique(everyone[everyone >= 0]), int(counts[:, 1].sum())


class BadExamples:
    """Distinct unreadable training records (module docstring).

    Attributes:
      paths: {record: path} of the distinct unreadable records, as of the last `sync`.
      examples_read: training examples read by all processes, as of the last `sync`.
    """

    def __init__(
        self,
        describe: Callable[[int], str],
        dataset_size: int,
        max_bad_fraction: float,
        *,
        examples_read: int = 0,
        always_allowed: int = ALWAYS_ALLOWED,
    ):
        if not 0 <= max_bad_fraction <= 1:
            raise ValueError(f"max_bad_fraction={max_bad_fraction} must be in [0, 1]")
        self._describe = describe
        self.dataset_size = dataset_size
        self.max_bad_fraction = max_bad_fraction
        self.always_allowed = always_allowed
        self.examples_read = examples_read
        self.paths: dict[int, str] = {}
        self._new: set[int] = set()  # This process's, since the last sync.
        self._new_reads = 0
        self._written = 0  # Distinct records in workdir/bad_examples.json.

    @property
    def count(self) -> int:
        """Distinct unreadable records found so far (all processes, as of the last `sync`)."""
        return len(self.paths)

    def update(self, batch: Mapping[str, np.ndarray]) -> None:
        """Notes a host-local batch: its rows and its 'bad_records' `[rows, K]`."""
        bad = np.asarray(batch["bad_records"])
        self._new_reads += len(bad)
        self._new.update(int(r) for r in bad[bad >= 0])

    def sync(self) -> None:
        """Merges every process's records and reads since the last sync (collective: all
        processes call it at the same steps), logging the paths of the first new files."""
        new = np.array(sorted(self._new - self.paths.keys()), np.int32)
        reads = self._new_reads
        if jax.process_count() > 1:
            new, reads = _gather(new, reads)
        self._new, self._new_reads = set(), 0
        self.examples_read += reads
        for record in (int(r) for r in new):
            if record not in self.paths:
                self._add(record)

    def _add(self, record: int) -> None:
        self.paths[record] = self._describe(record)
        if self.count <= LOGGED_PATHS:
            last = self.count == LOGGED_PATHS
            logging.warning(
                "unreadable image %s (record %d) replaced by another record: %d so far%s",
                self.paths[record],
                record,
                self.count,
                "; further ones are counted, not logged" if last else "",
            )

    def limit(self) -> float:
        """The most distinct unreadable records `check` accepts now."""
        seen = min(self.examples_read, self.dataset_size)
        return max(self.always_allowed, self.max_bad_fraction * seen)

    def check(self) -> None:
        """One-line DataError when more than `limit()` distinct records are unreadable."""
        if self.count > self.limit():
            first = ", ".join(self.paths[r] for r in sorted(self.paths)[:3])
            raise DataError(
                f"{self.count} distinct images are unreadable after reading "
                f"{self.examples_read} examples of {self.dataset_size}, more than "
                f"max({self.always_allowed}, max_bad_fraction={self.max_bad_fraction} of them) "
                f"(e.g. {first}; all in {BAD_EXAMPLES_FILE}): fix or remove them"
            )

    def to_json(self) -> dict:
        """{'examples_read', 'bad': [{'record', 'path'}, ...] by record}."""
        bad = [{"record": r, "path": self.paths[r]} for r in sorted(self.paths)]
        return {"examples_read": self.examples_read, "bad": bad}

    def save(self, workdir: str) -> None:
        """Writes `to_json()` to workdir/bad_examples.json on process 0 (after a `sync`) when
        unreadable files were found since the last write (its `examples_read` is as of then)."""
        if jax.process_index() == 0 and len(self.paths) > self._written:
            path = epath.Path(workdir) / BAD_EXAMPLES_FILE
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(self.to_json(), indent=1) + "\n")
            self._written = len(self.paths)

    def restore(self, workdir: str) -> None:
        """Adds the records of workdir/bad_examples.json, if any: files known to be unreadable
        stay counted on resume. `examples_read` is not taken from the file: a resumed run
        passes `start_step * batch_size`, exact for the checkpoint it resumes."""
        path = epath.Path(workdir) / BAD_EXAMPLES_FILE
        if path.exists():
            for entry in json.loads(path.read_text())["bad"]:
                self.paths[int(entry["record"])] = entry["path"]
            self._written = len(self.paths)
