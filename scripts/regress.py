"""CI regression check on results (docs/ARCHITECTURE.md §1).

    python -m scripts.regress --update   # write results/baseline/ci/<method>.csv from the pinned matrix
    python -m scripts.regress            # re-run the matrix and compare; exit 1 on a regression

The matrix is pinned below (tiny model, CPU, limit 20). Tolerances: accuracy within
max(1/limit, the method's stated tolerance), since another CPU can flip a greedy token; the KV
bytes stored at end of context exact; status exact; speed and memory of a CPU run are not
compared (nor the bytes after decode, which follow the number of generated tokens). One baseline file
per method, so work on different methods never collides.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

BASELINE = Path("results/baseline/ci")
LIMIT = 20
# tasks the tiny model solves at full cache (models/kvbench-tiny/README.md); niah_multikey and
# variable_tracking need key matching, so a method that keeps the wrong entries shows there first
TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "variable_tracking")
# method -> ratios (a ratio the method cannot honour is kept on purpose: its skipped row is compared too)
MATRIX: dict[str, tuple[float, ...]] = {
    "full": (0.0, 0.5),
    "uniform_int": (0.5, 0.875),
    "streaming_llm": (0.5, 0.75),
    "louver": (0.5, 0.9),
    "snapkv": (0.5, 0.75),
    "value_aware": (0.5, 0.75),
    "lkv": (0.85, 0.95),  # trained weights at 0.85; none at 0.95: a skipped row naming the training command
    "fp8": (0.5,),
    "kivi": (0.75, 0.84375),  # 4 bits, and 2.5 bits: a skipped row
    "compose": (0.875, 0.5),  # SnapKV keeping half x KIVI 4 bits, and below KIVI's own ratio: a skipped row
}
SETTINGS = ("model=tiny", "device=cpu", "context_length=512", "prefill_chunk=128", "batch_size=4", "seed=0",
            "bench.enabled=false", "progress=false", "force=true")
ACCURACY_TOL: dict[str, float] = {}  # a method's stated tolerance beyond 1/limit, if it needs one
# Bytes measured right after end_of_context do not depend on what the model generates: exact.
# Bytes after decode depend on how many tokens were generated, which a flipped greedy token can
# change on another CPU: recorded for reference, not compared.
EXACT = ("status", "n_samples", "kv_bytes_full", "kv_bytes_stored")
RECORDED = ("kv_bytes_stored_final", "kv_bytes_read_per_step")
FIELDS = ("method", "ratio", "task", "limit", *EXACT, *RECORDED, "accuracy", "reason")


def cells(methods: list[str], tasks: list[str]) -> list[tuple[str, float, str]]:
    return [(m, r, t) for m in methods for r in MATRIX[m] for t in tasks]


def run_matrix(methods: list[str], tasks: list[str], limit: int, overrides: list[str]) -> Iterator[dict]:
    """Run the matrix's cells one after the other, yielding each cell's record as it finishes."""
    from harness.run import run_job
    from harness.sweep import compose

    with tempfile.TemporaryDirectory() as tmp:
        for method, ratio, task in cells(methods, tasks):
            cfg = compose([f"method={method}", f"ratio={ratio}", f"task={task}", f"limit={limit}",
                           f"results_dir={tmp}", *SETTINGS, *overrides])
            row = run_job(cfg, method_name=method)
            rec = {k: row.get(k) for k in FIELDS if k != "limit"}
            rec.update(method=method, ratio=ratio, task=task, limit=limit)
            yield rec


def _norm(v) -> str:
    return "" if v is None else str(v)


def write_baseline(rows: list[dict], baseline: Path) -> None:
    baseline.mkdir(parents=True, exist_ok=True)
    for method in sorted({r["method"] for r in rows}):
        with open(baseline / f"{method}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            w.writeheader()
            for r in rows:
                if r["method"] == method:
                    w.writerow({k: _norm(r.get(k)) for k in FIELDS})


def read_baseline(baseline: Path, methods: list[str]) -> dict[tuple, dict]:
    out = {}
    for method in methods:
        path = baseline / f"{method}.csv"
        if not path.exists():
            raise SystemExit(f"no baseline {path}; run `make regress-update` and commit it")
        with open(path) as f:
            for r in csv.DictReader(f):
                out[(r["method"], float(r["ratio"]), r["task"])] = r
    return out


def compare(rows: list[dict], base: dict[tuple, dict]) -> list[str]:
    problems = []
    for r in rows:
        key = (r["method"], float(r["ratio"]), r["task"])
        b = base.get(key)
        name = f"{key[0]} ratio={key[1]} task={key[2]}"
        if b is None:
            problems.append(f"{name}: not in the baseline (run `make regress-update` if the matrix changed)")
            continue
        for col in EXACT:
            if _norm(r.get(col)) != b.get(col, ""):
                problems.append(f"{name}: {col} {b.get(col)!r} -> {_norm(r.get(col))!r} (must match exactly)")
        if b.get("accuracy") or r.get("accuracy") is not None:
            if not b.get("accuracy") or r.get("accuracy") is None:
                problems.append(f"{name}: accuracy {b.get('accuracy')!r} -> {r.get('accuracy')!r}")
            else:
                limit = int(b.get("limit") or LIMIT)
                tol = max(1.0 / limit, ACCURACY_TOL.get(key[0], 0.0)) + 1e-9
                d = float(r["accuracy"]) - float(b["accuracy"])
                if abs(d) > tol:
                    problems.append(f"{name}: accuracy {float(b['accuracy']):.3f} -> {float(r['accuracy']):.3f} "
                                    f"(|diff| {abs(d):.3f} > tolerance {tol:.3f})")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--update", action="store_true", help="write the baseline instead of comparing")
    ap.add_argument("--baseline", default=str(BASELINE))
    ap.add_argument("--methods", default=",".join(MATRIX), help="subset of the matrix's methods")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--limit", type=int, default=LIMIT)
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides (e.g. to test a change)")
    args = ap.parse_args(argv)
    from methods import catalog

    stale = [m for m in MATRIX if m not in catalog.names()]
    if stale:
        ap.error(f"the CI matrix names methods the catalogue (conf/method/) does not have: {stale}")
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in MATRIX]
    if unknown:
        ap.error(f"methods {unknown} are not in the CI matrix {sorted(MATRIX)}")
    tasks = [t for t in args.tasks.split(",") if t]
    baseline = Path(args.baseline)
    base = None if args.update else read_baseline(baseline, methods)  # a missing baseline fails before any run
    total = len(cells(methods, tasks))
    print(f"[regress] {total} runs: {len(methods)} methods x their ratios x {len(tasks)} tasks, limit {args.limit}; "
          "each is compared as it finishes", file=sys.stderr, flush=True)
    rows: list[dict] = []
    problems: list[str] = []
    try:
        for rec in run_matrix(methods, tasks, args.limit, args.overrides):
            rows.append(rec)
            new = [] if base is None else compare([rec], base)
            problems += new
            verdict = "" if base is None else ("REGRESSION" if new else "ok")
            print(f"[regress] {len(rows)}/{total} {rec['method']:>14} ratio={rec['ratio']:<7} {rec['task']:<18} "
                  f"{rec.get('status'):<8} acc={rec.get('accuracy')} stored={rec.get('kv_bytes_stored')} {verdict}"
                  + (f" ({len(problems)} regression(s) so far)" if problems else ""), file=sys.stderr, flush=True)
            for p in new:
                print(f"           - {p}", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print(f"[regress] interrupted after {len(rows)}/{total} runs: {len(problems)} regression(s) so far"
              + ("" if args.update else f"; {len(rows)} compared"), file=sys.stderr, flush=True)
        return 130
    if args.update:
        write_baseline(rows, baseline)
        print(f"[regress] wrote {baseline}/<method>.csv for {', '.join(methods)}")
        return 0
    if problems:
        print(f"[regress] {len(problems)} regression(s) against {baseline}:")
        for p in problems:
            print(f"  - {p}")
        return 1
    print(f"[regress] ok: {len(rows)} runs within tolerance of {baseline}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
