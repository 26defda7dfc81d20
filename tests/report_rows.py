"""Synthetic leaderboard rows for the report's tests: every method of conf/method at its family's ratios on
two tasks of both grid models, shaped like harness.run rows (no model runs; numbers are made up)."""

from __future__ import annotations

import json
import random
from pathlib import Path


def write_rows(results: Path, grid: dict, *, tasks: tuple[str, ...] = ("niah_multikey", "niah_single"),
               lengths: dict[str, int] | None = None, seed: int = 0) -> list[dict]:
    from harness.grid import family_ratios, methods

    rng = random.Random(seed)
    fams = methods()
    ratios = family_ratios()
    rows = []
    (results / "runs").mkdir(parents=True, exist_ok=True)
    settings = dict(grid["settings"])
    for model, spec in grid["models"].items():
        length = (lengths or {}).get(model, spec["context_lengths"][0])
        for task in tasks:
            for method, fam in fams.items():
                for r in ratios[fam]:
                    rid = f"{abs(hash((model, length, task, method, r, seed))):016x}"[:16]
                    skipped = method == "lkv" and model != "tiny"
                    acc = None if skipped else max(0.0, min(1.0, 1 - r * rng.random() * (0.2 if fam == "quantization" else 1)))
                    full_b = 1_000_000
                    ach = r if fam in ("quantization", "eviction", "none") else -0.2
                    cfg = {**settings, "device": {"name": settings.get("device", "auto")}, "model": {"name": model},
                           "method": {}, "task": {"name": task}, "context_length": length, "ratio": r}
                    row = {"run_id": rid, "model": model, "model_revision": "x", "weights": "trained", "method": method,
                           "family": fam, "memory": "physical", "kernel": "fused" if method == "full" else "reference",
                           "ratio": r, "task": task, "protocol": "query_agnostic", "context_length": length,
                           "n_samples": None if skipped else 100, "status": "skipped" if skipped else "ok",
                           "reason": "no LKV weights for this model: python -m scripts.train.lkv" if skipped else None,
                           "accuracy": acc, "accuracy_stderr": None if skipped else 0.02,
                           "kv_bytes_full": full_b, "kv_bytes_stored": full_b * (1 - ach), "ratio_achieved": ach,
                           "kv_bytes_read_per_step": full_b * (1 - r), "read_ratio_achieved": r,
                           "peak_mem_decode_bytes": 2e8, "decode_tok_s": 100 * (1 + rng.random()),
                           "git_sha": "abcdef1234", "git_dirty": False, "device": "cpu: Test CPU x2",
                           "started_at": "2026-12-07T08:00:00+00:00", "finished_at": "2026-12-07T08:01:00+00:00",
                           "config": json.dumps(cfg)}
                    rows.append(row)
                    (results / "runs" / f"{rid}.json").write_text(json.dumps(row))
    return rows
