"""Several grid workers on one GPU: accuracy passes share it, throughput probes run alone.

A grid cell on the tiny model is host-bound (its GPU work is a few hundred ms of a ~3 s cell on an H100: Python,
lm-eval and the engine's launches), so ``scripts/leaderboard.py --workers N`` runs N processes on one GPU, each on
its own tasks. Accuracy does not depend on what else runs; decode speed does. So when ``KVBENCH_GPU_LOCK`` names
a directory (the parent sets it for its workers):

- a run's model load, calibration, engine and accuracy pass hold a *shared* lock (:func:`shared`);
- its throughput probe holds the *exclusive* lock (:func:`exclusive`): it starts only when no other worker is
  inside a shared section, and none starts one until it ends. A gate lock taken first keeps workers from
  starving a waiting probe (a worker asks for the gate before each shared section, and a probe holds it while it
  waits for the running sections to end);
- the probes are shared through a file in that directory (:class:`ProbeFile`): a (model, method, ratio, probe
  shape) measured by one worker is copied by the others, as one process's ``probe_cache`` does.

Unset (one process): no locks, no file. POSIX ``flock``; on a system without ``fcntl`` the locks are no-ops.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ENV = "KVBENCH_GPU_LOCK"


def lock_dir() -> Path | None:
    d = os.environ.get(ENV)
    return Path(d) if d else None


@contextlib.contextmanager
def _flock(path: Path, exclusive: bool) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: one process at a time is the caller's business
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def shared() -> Iterator[None]:
    """Around GPU work whose timing nobody reads (model load, calibration, the accuracy pass)."""
    d = lock_dir()
    if d is None:
        yield
        return
    with _flock(d / "gate", exclusive=False):  # waits while a probe holds the gate
        pass
    with _flock(d / "gpu", exclusive=False):
        yield


@contextlib.contextmanager
def exclusive() -> Iterator[None]:
    """Around a measurement: alone on the GPU among the workers."""
    d = lock_dir()
    if d is None:
        yield
        return
    with _flock(d / "gate", exclusive=True), _flock(d / "gpu", exclusive=True):
        yield


class ProbeFile:
    """Probe results of every worker, keyed by the probe key (``harness.run._probe_key``): ``probes.jsonl`` in the
    lock directory, one JSON object per line. Read and written inside :func:`exclusive`."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "probes.jsonl"

    def _all(self) -> dict[str, dict]:
        out: dict[str, dict] = {}
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    d = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a killed worker
                    continue
                out[d["key"]] = d["probe"]
        return out

    def get(self, key: str) -> dict | None:
        return self._all().get(key)

    def put(self, key: str, probe: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"key": key, "probe": probe}) + "\n")


def probe_file() -> ProbeFile | None:
    d = lock_dir()
    return None if d is None else ProbeFile(d)
