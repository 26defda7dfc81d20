"""``make leaderboard``: run the pinned grid of ``conf/experiment/leaderboard.yaml``, resumable.

    python -m scripts.leaderboard --plan                         # cells, what is done, estimated cost
    python -m scripts.leaderboard --models tiny --lengths 4096   # run part of the grid (here: CPU)
    python -m scripts.leaderboard --max-minutes 9 --pack $OUT/rows.tar.gz   # a GPU call; bring the rows back
    python -m scripts.leaderboard --tables                       # only rebuild results/leaderboard/*.md

Every cell is an ordinary run of ``harness.run.run_job`` (the same evaluation loop, row schema and run_id
as ``python -m harness.run``), written to ``results/leaderboard/runs/<run_id>.json``. The grid avoids the
per-run overheads that ``python -m harness.run -m ...`` would pay:

- one process per invocation: each model is loaded once (``harness.loading`` caches it), the Hydra config
  is composed in-process;
- the throughput probe (random tokens, task-independent by design) runs once per (model, length, method,
  ratio) and the rows of the other tasks copy its columns (``run_job(probe_cache=...)``);
- resume (``harness.grid.run_grid``): a cell whose ok row exists is not rerun, nor one whose skipped row exists
  under the same run_id (the method's reason holds for the same config; its row is kept as written;
  ``--retry-skipped`` reruns them; LKV's, whose skip training its weights lifts, are always retried); failed cells
  are retried.

Order: for each model and length, task by task in the grid's order: ``full`` first (the gate: the task
stays when full-cache accuracy >= ``min_full_accuracy``), then every other method at its ratio nearest 4x
(``harness.grid.LEAD_RATIO``), then every method at its next ratio, and so on, on that task. So a partial run (a
GPU call's worth) covers every method on the first tasks before any method's second ratio. ``--max-minutes`` stops starting new cells
after that long, so a GPU call ends inside its limit and the next call resumes.

Tables: ``results/leaderboard/summary.{md,csv}`` (scripts/aggregate.py over the leaderboard's rows) and
``results/leaderboard/README.md`` (the gate per model, length and task; cells done, skipped, failed and
still to run; how long cells took per model and machine; the commands and machines that produced the
rows). ``make report`` renders the page from the same rows.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from harness import grid as G
from harness.grid import gate_passes, plan, read_rows, rows_by_cell, threshold_of

REPO = Path(__file__).resolve().parent.parent

GRID = REPO / "conf" / "experiment" / "leaderboard.yaml"
RESULTS = REPO / "results" / "leaderboard"


def load_grid(path: Path = GRID, *, size: str | None = None) -> dict[str, Any]:
    return G.load_grid(path, size=size)


# ---------------------------------------------------------------------------------------------- tables


def _machine(row: dict) -> str:
    return str(row.get("device") or "?")


def status_table(grid: dict, parts: dict, rows: dict[str, dict]) -> tuple[str, dict]:
    """Markdown: the gate, what is done and what is left, per (model, length); and counts."""
    settings = dict(grid["settings"])
    threshold = threshold_of(grid)
    done = rows_by_cell(rows, settings)
    lines = []
    counts = defaultdict(int)
    for (model, length), part in parts.items():
        gate_cells = []
        passed = []
        for cell in part["gate"]:
            row = done.find(cell)
            ok = gate_passes(row, threshold)
            acc = "" if not row or row.get("accuracy") is None else f"{row['accuracy']:.2f}"
            gate_cells.append(f"{cell.task} {acc or '?'}{' ✓' if ok else (' ✗' if ok is False else '')}")
            st = row.get("status") if row else "todo"
            counts[st if st in ("ok", "skipped", "failed") else "todo"] += 1  # a gate cell that ran counts as what it is
            if ok:
                passed.append(cell.task)
        todo = {"ok": 0, "skipped": 0, "failed": 0, "todo": 0}
        for task in passed:
            for cell in part["cells"][task]:
                row = done.find(cell)
                st = row.get("status") if row else "todo"
                todo[st if st in todo else "todo"] += 1
        pending = sum(1 for c in part["gate"] if gate_passes(done.find(c), threshold) is None)
        for k, v in todo.items():
            counts[k] += v
        lines.append(f"| {model} | {length} | {', '.join(gate_cells)} | {todo['ok']} | {todo['skipped']} | "
                     f"{todo['failed']} | {todo['todo']}{f' (+ the tasks of {pending} gate cells not run)' if pending else ''} |")
    head = [f"Gate: full-cache accuracy >= {threshold} over the same {settings.get('limit')} samples (✓ in, ✗ out, "
            "? not run yet).", "",
            "| model | context | gate (full accuracy per task) | ok | skipped | failed | to run |",
            "|---|---:|---|---:|---:|---:|---:|"]
    return "\n".join(head + lines) + "\n", dict(counts)


def cost_table(rows: dict[str, dict]) -> str:
    """Seconds a cell took (row start to finish), per model, length and machine: the basis of the estimates."""
    acc: dict[tuple, list[float]] = defaultdict(list)
    for r in rows.values():
        if r.get("status") != "ok" or not r.get("started_at") or not r.get("finished_at"):
            continue
        t = (_dt.datetime.fromisoformat(r["finished_at"]) - _dt.datetime.fromisoformat(r["started_at"])).total_seconds()
        acc[(r["model"], int(r["context_length"]), _machine(r))].append(t)
    if not acc:
        return "_no finished cells yet_\n"
    out = ["| model | context | machine | cells | median s/cell | total h |", "|---|---:|---|---:|---:|---:|"]
    for (m, L, dev), ts in sorted(acc.items()):
        ts = sorted(ts)
        out.append(f"| {m} | {L} | {dev} | {len(ts)} | {ts[len(ts) // 2]:.0f} | {sum(ts) / 3600:.2f} |")
    return "\n".join(out) + "\n"


def provenance(rows: dict[str, dict]) -> str:
    """Which commit and machine produced how many rows."""
    acc: dict[tuple, int] = defaultdict(int)
    span: dict[tuple, list[str]] = defaultdict(list)
    for r in rows.values():
        k = (str(r.get("git_sha") or "?")[:10] + ("-dirty" if r.get("git_dirty") else ""), _machine(r),
             str(r.get("hostname") or "?"))
        acc[k] += 1
        span[k] += [str(r.get("started_at") or ""), str(r.get("finished_at") or "")]
    out = ["| commit | machine | host | rows | from | to |", "|---|---|---|---:|---|---|"]
    for k, n in sorted(acc.items()):
        s = sorted(x for x in span[k] if x)
        out.append(f"| {k[0]} | {k[1]} | {k[2]} | {n} | {s[0] if s else ''} | {s[-1] if s else ''} |")
    return "\n".join(out) + "\n"


def write_tables(grid: dict, results: Path, commands: list[str]) -> dict:
    rows = read_rows(results)
    parts = plan(grid)
    status, counts = status_table(grid, parts, rows)
    import subprocess

    subprocess.run([sys.executable, str(REPO / "scripts" / "aggregate.py"), "--results", str(results), "--quiet"],
                   check=True)
    log = results / "commands.log"
    prior = log.read_text().splitlines() if log.exists() else []
    lines = prior + [c for c in commands if c not in prior]
    if lines:
        log.write_text("\n".join(lines) + "\n")
    text = f"""# kvbench leaderboard: rows

The grid is pinned in `conf/experiment/leaderboard.yaml`; every cell is an ordinary `harness.run` row in
`runs/` (same schema and run_id as `python -m harness.run ...`), run by `scripts/leaderboard.py`
(`make leaderboard`). `summary.md` / `summary.csv` are `scripts/aggregate.py --results results/leaderboard`;
`make report` renders `results/report/index.html` from these rows.

## Progress and gate

{status}
Cells: {counts.get('ok', 0)} ok, {counts.get('skipped', 0)} skipped (with the reason in the row; kept on resume, `--retry-skipped` reruns them),
{counts.get('failed', 0)} failed, {counts.get('todo', 0)} still to run (not counting the tasks of gate cells not run yet).

## Cost per cell (row start to finish, {grid['settings'].get('limit')} samples)

{cost_table(rows)}
## What is left (`make leaderboard-plan`)

```
{estimate(grid, parts, rows)}
```

On the GPU machine (the tree of a commit that has this runner; `.whl` from `scripts/fetch_gpu_wheels.sh`):
`run carry=[".whl"] command="export KVBENCH_GIT_SHA=<sha of HEAD here> KVBENCH_GIT_DIRTY=0; . scripts/gpu_env.sh ||
exit 1; python -m scripts.leaderboard --models tiny --max-minutes 8 --pack $OUT/rows.tar.gz"` (the machine's `.git`
is not the commit you sent: DEVELOPERS.md; `--workers 4` runs four processes on its GPU, each probe alone: the tiny
model's cells are host-bound; not yet timed on the GPU, compare the cost table), then here `tar -xzf <files_at>/rows.tar.gz -C results/leaderboard &&
python -m scripts.leaderboard --tables`. smollm2 first needs its weights there: `scripts/smollm2_gpu.py`.

## Commits and machines

{provenance(rows)}
Commands that wrote these rows: `commands.log`.
"""
    (results / "README.md").write_text(text)
    return counts


def sync_wandb(grid: dict, results: Path, *, project: str, group: str | None) -> int:
    """Mirror every grid row (and its per-sample predictions, where kept) to W&B as one project, offline
    (``wandb sync <dir>`` uploads later). Each W&B run's config carries the flat grouping keys
    (harness.wandb_logger.GROUPING_KEYS), so a workspace can draw the report's Pareto plots."""
    import gzip

    from harness.wandb_logger import log_run

    rows = rows_by_cell(read_rows(results), dict(grid["settings"]))
    directory = results / "wandb"
    cfg = {"project": project, "group": group, "tags": ["leaderboard"], "mode": os.environ.get("WANDB_MODE", "offline"),
           "dir": str(directory)}
    n = 0
    for row in rows.values():
        samples = []
        for p in sorted((results / "samples").glob(f"{row['run_id']}.*")):
            opener = gzip.open if p.suffix == ".gz" else open
            with opener(p, "rt") as f:
                samples = [json.loads(line) for line in f if line.strip()]
        log_run(cfg, json.loads(row.get("config") or "{}"), row, samples)
        n += 1
    print(f"[leaderboard] {n} rows logged to W&B project {project!r} under {directory}; upload with "
          f"`wandb sync {directory}/wandb/offline-run-*`", file=sys.stderr)
    return n


# ------------------------------------------------------------------------------------------------ main


def estimate(grid: dict, parts: dict, rows: dict[str, dict]) -> str:
    """Cells to run per (model, length) and their cost at the median measured s/cell on each machine."""
    settings = dict(grid["settings"])
    threshold = threshold_of(grid)
    done = rows_by_cell(rows, settings)
    med: dict[tuple, dict[str, float]] = defaultdict(dict)
    per: dict[tuple, list[float]] = defaultdict(list)
    for r in rows.values():
        if r.get("status") == "ok" and r.get("started_at") and r.get("finished_at"):
            t = (_dt.datetime.fromisoformat(r["finished_at"]) - _dt.datetime.fromisoformat(r["started_at"])).total_seconds()
            per[(r["model"], int(r["context_length"]), _machine(r))].append(t)
    for (m, L, dev), ts in per.items():
        med[(m, L)][dev] = sorted(ts)[len(ts) // 2]
    out = []
    for (model, length), part in parts.items():
        n_gate_todo = sum(1 for c in part["gate"] if not G.settled(done.find(c), c))
        tasks_in = [c.task for c in part["gate"] if gate_passes(done.find(c), threshold) is not False]
        n = sum(1 for t in tasks_in for c in part["cells"][t] if not G.settled(done.find(c), c))
        cost = ", ".join(f"{dev}: {(n + n_gate_todo) * s / 3600:.1f} h at {s:.0f} s/cell" for dev, s in med[(model, length)].items())
        out.append(f"{model} @ {length}: {n_gate_todo} gate cells + up to {n} cells to run "
                   f"({len(tasks_in)} tasks in or undecided){'; ' + cost if cost else ''}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", type=Path, default=GRID)
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--models", help="comma-separated subset of the grid's models")
    ap.add_argument("--lengths", help="comma-separated subset of context lengths")
    ap.add_argument("--tasks", help="comma-separated subset of tasks")
    ap.add_argument("--methods", help="comma-separated subset of methods (full always runs: it is the gate)")
    G.add_run_options(ap)  # --max-minutes --threads --workers --retry-skipped --pack (and a worker's hidden options)
    ap.add_argument("--plan", action="store_true", help="print the plan and the estimated cost, run nothing")
    ap.add_argument("--tables", action="store_true", help="only rebuild the tables from the rows")
    ap.add_argument("--wandb", metavar="PROJECT", help="log every grid row to this W&B project (offline) and exit")
    ap.add_argument("--wandb-group", default="leaderboard")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every cell (part of run identity!)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    split = (lambda s: [x for x in s.split(",") if x] if s else None)  # noqa: E731
    grid = load_grid(args.grid)
    parts = plan(grid, models=split(args.models), lengths=[int(x) for x in split(args.lengths) or []] or None,
                 tasks=split(args.tasks), only_methods=split(args.methods))
    if args.plan:
        print(estimate(grid, parts, read_rows(args.results)))
        return 0
    if args.wandb:
        sync_wandb(grid, args.results, project=args.wandb, group=args.wandb_group)
        return 0
    if args.tables:
        print(json.dumps(write_tables(grid, args.results, [])))
        return 0
    cmd = " ".join(["python -m scripts.leaderboard", *(argv if argv is not None else sys.argv[1:])])
    worker = [sys.executable, "-m", "scripts.leaderboard", "--grid", str(args.grid.resolve()),
              "--results", str(args.results.resolve()), *(["--models", args.models] if args.models else []),
              *(["--lengths", args.lengths] if args.lengths else []),
              *(["--methods", args.methods] if args.methods else []), *args.overrides]
    written = G.execute(grid, parts, args, results=args.results, worker_argv=worker, extra=list(args.overrides))
    if args.no_tables:
        return 0
    try:
        counts = write_tables(grid, args.results, [cmd] if written else [])
    except Exception as e:  # noqa: BLE001 - the rows are written; tables can be rebuilt with --tables
        print(f"[leaderboard] tables not rebuilt ({type(e).__name__}: {e}); run --tables", file=sys.stderr)
        counts = {}
    print(json.dumps({"written": len(written), **counts}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
