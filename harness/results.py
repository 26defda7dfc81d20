"""Result rows: one flat JSON object per run (docs/ARCHITECTURE.md §6).

Every run (ok, skipped or failed) writes exactly one row to ``results/runs/<run_id>.json`` and
prints it as the last stdout line. Rows are never lost: a rerun of a failed or skipped run, or a
``force=true`` rerun, moves the previous row to ``results/runs/history/`` before writing.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import gzip
import hashlib
import json
import math
import os
import platform
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Columns every row carries, in order (add, never rename silently). Tables are built from rows.
KEY_COLUMNS = [
    "run_id", "model", "model_revision", "weights", "method", "method_params", "family", "memory", "kernel",
    "ratio", "task", "task_version", "protocol", "context_length", "prefill_chunk", "batch_size", "seed",
    "n_samples", "status", "reason",
]
ACCURACY_COLUMNS = ["accuracy", "accuracy_stderr"]
MEMORY_COLUMNS = [
    "kv_bytes_full", "kv_bytes_stored", "ratio_achieved", "kv_bytes_stored_final", "kv_bytes_read_per_step",
    "read_ratio_achieved", "peak_mem_prefill_bytes", "peak_mem_decode_bytes", "weights_bytes",
]
SPEED_COLUMNS = [
    "prefill_tok_s", "ttft_ms", "decode_tok_s", "decode_ms_p50", "decode_ms_p90", "compress_ms", "calibrate_ms",
    "roofline_ms", "roofline_frac",
]
ENV_COLUMNS = [
    "git_sha", "git_dirty", "python", "torch", "transformers", "lm_eval", "device", "driver", "hostname",
    "started_at", "finished_at",
]
EXTRA_COLUMNS = ["n_truncated", "probe_batch_size", "probe_batch_from", "probe_context_length", "probe_decode_steps", "config"]
COLUMNS = KEY_COLUMNS + ACCURACY_COLUMNS + MEMORY_COLUMNS + SPEED_COLUMNS + ENV_COLUMNS + EXTRA_COLUMNS
STATUSES = ("ok", "skipped", "failed")

# Config keys that do not change a run's result, left out of its identity.
NON_IDENTITY_KEYS = ("logger", "force", "results_dir", "hydra", "progress")


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def run_id_of(config: dict[str, Any]) -> str:
    """A stable hash of the resolved config minus keys that do not change the result."""
    ident = {k: v for k, v in config.items() if k not in NON_IDENTITY_KEYS}
    return hashlib.sha256(canonical(ident).encode()).hexdigest()[:16]


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def new_row(**fields: Any) -> dict[str, Any]:
    row: dict[str, Any] = {c: None for c in COLUMNS}
    row.update(fields)
    return row


def row_path(results_dir: str | os.PathLike, run_id: str) -> Path:
    return Path(results_dir) / "runs" / f"{run_id}.json"


def samples_path(results_dir: str | os.PathLike, run_id: str) -> Path:
    """Where a run's per-sample predictions are kept, beside its row."""
    return Path(results_dir) / "samples" / f"{run_id}.jsonl.gz"


class BadRow(ValueError):
    """A file under runs/ that is not a kvbench row (not UTF-8, not JSON, not an object, no run_id)."""


def load_row(path: Path) -> dict[str, Any]:
    """The row in ``path``; BadRow (with the reason) when the file is not one."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BadRow(f"cannot read it ({e.strerror or e})") from None
    try:
        row = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise BadRow("it is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise BadRow(f"it is not JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(row, dict):
        raise BadRow(f"it holds a JSON {type(row).__name__}, not an object")
    if not isinstance(row.get("run_id"), str) or row.get("status") not in STATUSES:
        raise BadRow("it has no run_id or no status (ok, skipped, failed)")
    return row


def read_row(path: Path) -> dict[str, Any] | None:
    """The row in ``path``, or None when there is none or the file is not a row (a rerun replaces it)."""
    try:
        return load_row(path)
    except BadRow:
        return None


def strict(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, inf) replaced by None, so the JSON is strict."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value


def dumps(row: dict[str, Any], **kw: Any) -> str:
    """Strict JSON of a row (NaN and inf written as null; other objects as their str)."""
    return json.dumps(strict(row), allow_nan=False, default=str, **kw)


LOCK_STALE_S = 120.0  # a row write takes milliseconds; a lock older than this was left by a killed process


@contextlib.contextmanager
def run_lock(results_dir: str | os.PathLike, run_id: str, *, timeout: float = 300.0) -> Iterator[None]:
    """Hold the write lock of one run id (an O_EXCL lock file beside the rows) across processes and hosts
    sharing the results directory. A lock whose holder died (same host, pid gone) or that is older than
    LOCK_STALE_S is taken over."""
    runs = Path(results_dir) / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    lock = runs / f".{run_id}.lock"
    deadline = time.monotonic() + timeout
    me = f"{socket.gethostname()} {os.getpid()}"
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            if _stale(lock):
                with contextlib.suppress(FileNotFoundError):
                    lock.unlink()
                continue
            if time.monotonic() > deadline:
                raise TimeoutError(f"the row of run {run_id} is locked by {lock} ({_read(lock)}); if no kvbench "
                                   "process is writing it, delete that file") from None
            time.sleep(0.02)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me + "\n")
        break
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except (OSError, ValueError):
        return "?"


def _stale(lock: Path) -> bool:
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return True
    host, _, pid = _read(lock).partition(" ")
    if host == socket.gethostname() and pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
    return age > LOCK_STALE_S


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename: readers see the old file or the
    new one, never a part. The file gets the umask's mode (0644 under the usual 022), like any file."""
    for i in range(100):
        tmp = path.with_name(f".tmp-{os.getpid()}-{i}-{path.name}")
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            break
        except FileExistsError:
            continue
    else:  # pragma: no cover
        raise OSError(f"cannot create a temporary file beside {path}")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _to_history(path: Path, run_id: str, stamp: str, suffix: str) -> Path | None:
    if not path.exists():
        return None
    hist = path.parent / "history"
    hist.mkdir(exist_ok=True)
    dest = hist / f"{run_id}.{stamp}{suffix}"
    n = 1
    while dest.exists():
        dest = hist / f"{run_id}.{stamp}-{n}{suffix}"
        n += 1
    path.replace(dest)
    return dest


def write_row(results_dir: str | os.PathLike, row: dict[str, Any], *, samples: list[dict] | None = None) -> Path:
    """Write a run's row (and its per-sample predictions) atomically under the run id's lock.

    A previous row of the same run id (and its samples) moves to ``history/`` first, so two identical
    runs finishing together leave one row and one history entry, and nothing is ever lost. The row is
    strict JSON (NaN -> null)."""
    path = row_path(results_dir, row["run_id"])
    text = dumps(row, indent=1) + "\n"
    spath = samples_path(results_dir, row["run_id"])
    with run_lock(results_dir, row["run_id"]):
        stamp = _dt.datetime.now().strftime("%Y%m%dT%H%M%S%f")
        _to_history(path, row["run_id"], stamp, ".json")
        _to_history(spath, row["run_id"], stamp, ".jsonl.gz")
        if samples:
            spath.parent.mkdir(parents=True, exist_ok=True)
            lines = "".join(dumps(s) + "\n" for s in samples).encode("utf-8")
            _write_atomic(spath, gzip.compress(lines, mtime=0))
        _write_atomic(path, text.encode("utf-8"))
    return path


def read_samples(path: Path) -> list[dict[str, Any]]:
    """The per-sample records of a ``samples/<run_id>.jsonl.gz`` file."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent.parent)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


@functools.lru_cache(maxsize=1)
def _code_state() -> tuple[str | None, bool | None]:
    """(HEAD sha, tree dirty) the first time this process stamps a row, then the same for every later row: the
    modules a process runs are those it imported, so a commit made while a long grid runs must not relabel its
    later rows (a CPU grid of session 11 stamped rows with a commit made after its start)."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return _git("rev-parse", "HEAD"), None if status is None else bool(status)


def environment(device: Any = None) -> dict[str, Any]:
    """The fingerprint of what produced a row."""
    import torch
    import transformers

    try:
        import lm_eval

        lm_eval_version = getattr(lm_eval, "__version__", None)
        if lm_eval_version is None:
            from importlib.metadata import version

            lm_eval_version = version("lm_eval")
    except Exception:  # noqa: BLE001 - lm-eval is optional for GPU-side scripts
        lm_eval_version = None
    sha, dirty = _code_state()
    if os.environ.get("KVBENCH_GIT_SHA"):  # a copy of a tree whose .git is not its own (the GPU machine's, DEVELOPERS.md)
        sha = os.environ["KVBENCH_GIT_SHA"]
        dirty = {"0": False, "1": True}.get(os.environ.get("KVBENCH_GIT_DIRTY", ""))
    env = {
        "git_sha": sha,
        "git_dirty": dirty,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "lm_eval": lm_eval_version,
        "hostname": socket.gethostname(),
        "device": platform.processor() or platform.machine(),
        "driver": None,
    }
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name(dev)
        env["driver"] = f"cuda {torch.version.cuda}"
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10)
            if out.returncode == 0:
                env["driver"] = f"{out.stdout.strip().splitlines()[0]} (cuda {torch.version.cuda})"
        except (OSError, subprocess.SubprocessError):
            pass
    else:
        env["device"] = f"cpu: {_cpu_name()} x{os.cpu_count()}"
    return env


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()
