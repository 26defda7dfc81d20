"""Result rows: one flat JSON object per run (DESIGN §6).

Every run (ok, skipped or failed) writes exactly one row to ``results/runs/<run_id>.json`` and
prints it as the last stdout line. Rows are never lost: a rerun of a failed or skipped run, or a
``force=true`` rerun, moves the previous row to ``results/runs/history/`` before writing.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import socket
import subprocess
import tempfile
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
EXTRA_COLUMNS = ["n_truncated", "probe_batch_size", "probe_context_length", "probe_decode_steps", "config"]
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


def read_row(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def write_row(results_dir: str | os.PathLike, row: dict[str, Any]) -> Path:
    """Write atomically; a previous row for the same run_id is kept under runs/history/."""
    path = row_path(results_dir, row["run_id"])
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        hist = path.parent / "history"
        hist.mkdir(exist_ok=True)
        stamp = _dt.datetime.now().strftime("%Y%m%dT%H%M%S%f")
        path.replace(hist / f"{row['run_id']}.{stamp}.json")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(row, f, indent=1, default=str)
        f.write("\n")
    os.replace(tmp, path)
    return path


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent.parent)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


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
    status = _git("status", "--porcelain", "--untracked-files=no")
    env = {
        "git_sha": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
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
