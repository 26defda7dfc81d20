"""Grids of runs: the engine of ``make leaderboard`` and of the pinned experiments (conf/experiment/*.yaml).

A grid spec (YAML) names models x context lengths x tasks x methods x ratios and the settings every cell
shares; every cell is an ordinary run of :func:`harness.run.run_job` (same row, same run_id as
``python -m harness.run``). This module plans the cells, finds the rows already written (resume: ok and skipped
cells are done, failed ones rerun; :func:`run_grid`), runs the rest in one process or in ``--workers`` processes on
one GPU (:func:`execute`, the options every runner shares: :func:`add_run_options`) and packs what a GPU call wrote.
The entry points are ``scripts/leaderboard.py`` (the leaderboard's tables) and ``scripts/experiment.py`` (an
experiment's cells and its analysis).

Spec keys:

- ``settings``: Hydra overrides every cell shares (part of each run's identity; rows are matched on them);
- ``models``: ``{model: {context_lengths: [...], tasks: [...]}}``;
- ``min_full_accuracy`` (optional, null = no gate): ``full`` runs first on every task, and the other methods
  run only on the tasks where its accuracy reaches the threshold; ``full`` always runs (the reference);
- ``methods`` (optional): a list of ``{method: NAME}`` or ``{family: FAMILY, exclude: [...]}`` entries with
  optional ``ratios`` (default: the family's, conf/sweep) and ``knobs`` (``method.<knob>=<value>`` overrides,
  e.g. compose's selector and quantizer); absent = every catalogue method at its family's ratios;
- ``sizes`` (optional): ``{smoke: {...}}`` deep-merged over the spec by :func:`load_grid` (``size="smoke"``):
  dicts merge, anything else replaces.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Cell:
    model: str
    context_length: int
    task: str
    method: str
    family: str
    ratio: float
    knobs: tuple[tuple[str, Any], ...] = ()  # method knobs the cell sets, sorted by name

    def overrides(self, settings: dict[str, Any]) -> list[str]:
        return [f"model={self.model}", f"method={self.method}", f"ratio={self.ratio}", f"task={self.task}",
                f"context_length={self.context_length}", *(f"method.{k}={_hydra_value(v)}" for k, v in self.knobs),
                *(f"{k}={_hydra_value(v)}" for k, v in settings.items())]

    @property
    def variant(self) -> str:
        """The method with its knobs, e.g. ``compose[quantizer=kivi,selector=snapkv]``."""
        return self.method + (f"[{','.join(f'{k}={v}' for k, v in self.knobs)}]" if self.knobs else "")

    def label(self) -> str:
        return f"{self.model} {self.context_length} {self.task} {self.variant}@{self.ratio:g}"


def _hydra_value(v: Any) -> str:
    return "null" if v is None else ("true" if v is True else "false" if v is False else str(v))


def _merge(base: Any, over: Any) -> Any:
    """``over`` merged into ``base``: dicts merge key by key, anything else replaces; a null over a mapping
    removes it (``models: {smollm2_135m: null}`` drops that model from a smaller size)."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = {**base, **{k: _merge(base.get(k), v) for k, v in over.items()}}
        return {k: v for k, v in out.items() if not (v is None and isinstance(base.get(k), dict))}
    return over


def load_grid(path: Path, *, size: str | None = None) -> dict[str, Any]:
    """The spec at ``path``, with ``sizes[size]`` merged over it when ``size`` is given."""
    import yaml

    grid = yaml.safe_load(Path(path).read_text())
    if not isinstance(grid, dict):
        raise ValueError(f"{path}: not a grid spec (a YAML mapping with settings and models)")
    for key in ("settings", "models"):
        if key not in grid:
            raise ValueError(f"{path}: missing key {key!r}")
    grid.setdefault("min_full_accuracy", None)
    sizes = grid.pop("sizes", None) or {}
    if size is not None:
        if size not in sizes:
            raise ValueError(f"{path}: no size {size!r}; sizes: {', '.join(sizes) or 'none'}")
        grid = _merge(grid, sizes[size])
    return grid


def method_entries(grid: dict[str, Any]) -> list[tuple[str, str, list[float], tuple[tuple[str, Any], ...]]]:
    """(method, family, ratios, knobs) of the spec's ``methods`` (every catalogue method but ``full`` at its
    family's ratios when absent), in the spec's order; unknown names are an error that lists the catalogue."""
    fams = methods()
    ratios = family_ratios()
    spec = grid.get("methods")
    if spec is None:
        return [(m, f, ratios[f], ()) for m, f in fams.items() if m != "full"]
    out = []
    for e in spec:
        if "family" in e:
            if e["family"] not in ratios:
                raise ValueError(f"unknown family {e['family']!r}; families: {', '.join(ratios)}")
            names = [m for m, f in fams.items() if f == e["family"] and m != "full" and m not in e.get("exclude", [])]
        else:
            names = [e["method"]]
        for m in names:
            if m not in fams:
                raise ValueError(f"unknown method {m!r} in the grid; available: {', '.join(fams)}")
            knobs = tuple(sorted((str(k), v) for k, v in (e.get("knobs") or {}).items()))
            out.append((m, fams[m], [float(r) for r in e.get("ratios", ratios[fams[m]])], knobs))
    return out


def family_ratios() -> dict[str, list[float]]:
    """Family -> ratios, from conf/sweep/<family sweep>.yaml (the one place they are pinned)."""
    import yaml

    from harness.run import CONF, FAMILY_SWEEP

    out = {}
    for family, sweep in FAMILY_SWEEP.items():
        params = yaml.safe_load((CONF / "sweep" / f"{sweep}.yaml").read_text())["hydra"]["sweeper"]["params"]
        out[family] = [float(r) for r in str(params["ratio"]).split(",")]
    return out


def methods() -> dict[str, str]:
    """Every method of conf/method/ -> its family (read from the class, nothing instantiated)."""
    from harness.run import options
    from harness.sweep import method_family

    return {m: method_family(m) for m in options("method")}


# The ratio a partial grid reaches first for every method: 4x (a 4-bit code, a quarter of the tokens kept), the
# operating point the article asks about; then the family's other ratios by distance from it.
LEAD_RATIO = 0.75


def lead_first(ratios: list[float]) -> list[float]:
    """``ratios`` reordered: LEAD_RATIO's nearest first, then by distance from it (ties: the higher ratio)."""
    return sorted(ratios, key=lambda r: (abs(r - LEAD_RATIO), -r))


def plan(grid: dict[str, Any], *, models: list[str] | None = None, lengths: list[int] | None = None,
         tasks: list[str] | None = None, only_methods: list[str] | None = None) -> dict[tuple[str, int], dict]:
    """(model, length) -> {"gate": [full cells], "cells": {task: [cells of the other methods]}} in run order: per
    task, every method at its ratio nearest LEAD_RATIO first, then every method at its next ratio, and so on (a
    partial run covers every method before any method's second ratio)."""
    fams = methods()
    ratios = family_ratios()
    unknown = [m for m in (only_methods or []) if m not in fams]
    if unknown:
        raise SystemExit(f"error: unknown method(s) {unknown}; available: {', '.join(fams)}")
    entries = method_entries(grid)
    out: dict[tuple[str, int], dict] = {}
    for model, spec in grid["models"].items():
        if models and model not in models:
            continue
        for length in spec["context_lengths"]:
            if lengths and int(length) not in lengths:
                continue
            cand = [t for t in spec["tasks"] if not tasks or t in tasks]
            gate = [Cell(model, int(length), t, "full", "none", r) for t in cand for r in ratios["none"]]
            cells: dict[str, list[Cell]] = {t: [] for t in cand}
            chosen = [(m, fam, lead_first(rs), knobs) for m, fam, rs, knobs in entries
                      if m != "full" and not (only_methods and m not in only_methods)]
            for k in range(max((len(rs) for _, _, rs, _ in chosen), default=0)):  # round k: every method's k-th ratio
                for m, fam, rs, knobs in chosen:
                    if k < len(rs):
                        for t in cand:
                            cells[t].append(Cell(model, int(length), t, m, fam, rs[k], knobs))
            out[(model, int(length))] = {"gate": gate, "cells": cells}
    return out


def read_rows(results: Path) -> dict[str, dict]:
    rows = {}
    for p in sorted((results / "runs").glob("*.json")):
        try:
            row = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        rows[row["run_id"]] = row
    return rows


def cell_key(row: dict) -> tuple:
    return (row.get("model"), int(row.get("context_length") or 0), row.get("task"), row.get("method"),
            round(float(row.get("ratio") or 0.0), 6))


def key_of(cell: Cell) -> tuple:
    return (cell.model, cell.context_length, cell.task, cell.method, round(cell.ratio, 6))


class CellRows(dict):
    """(model, length, task, method, ratio) -> the latest row (a dict, as tables iterate it), plus every row of
    that key, so :meth:`find` can tell apart cells that differ only in their knobs."""

    def __init__(self) -> None:
        super().__init__()
        self.all: dict[tuple, list[dict]] = {}

    def add(self, row: dict) -> None:
        k = cell_key(row)
        self[k] = row
        self.all.setdefault(k, []).append(row)

    def find(self, cell: Cell) -> dict | None:
        """The latest row of ``cell``: same key and, for every knob the cell sets, the same value."""
        if not cell.knobs:
            return self.get(key_of(cell))
        for row in reversed(self.all.get(key_of(cell), [])):
            params = json.loads(row.get("method_params") or "{}")
            if all(_hydra_value(params.get(k)) == _hydra_value(v) for k, v in cell.knobs):
                return row
        return None


def rows_by_cell(rows: dict[str, dict], settings: dict[str, Any]) -> CellRows:
    """The rows run with the grid's settings, by cell (latest last)."""
    out = CellRows()
    for row in sorted(rows.values(), key=lambda r: str(r.get("finished_at") or "")):
        cfg = json.loads(row.get("config") or "{}")
        if any(_hydra_value(_lookup(cfg, k)) != _hydra_value(v) for k, v in settings.items()):
            continue
        out.add(row)
    return out


def _lookup(cfg: dict, key: str) -> Any:
    """A setting's value in a row's resolved config: ``bench.enabled`` -> cfg["bench"]["enabled"];
    ``device`` -> the device group's name."""
    if key == "device":
        return (cfg.get("device") or {}).get("name")
    for part in key.split("."):
        if not isinstance(cfg, dict) or part not in cfg:
            return None
        cfg = cfg[part]
    return cfg


def settled(row: dict | None, cell: Cell | None = None) -> bool:
    """Whether a resume leaves the cell of this row alone, as :func:`run_grid` decides: ok, or skipped unless the
    cell's method reads trained weights (:func:`reads_weights`; ``--retry-skipped`` reruns every skipped cell).
    run_grid also checks that a skipped row has the run_id the cell would write. Plans and cost estimates count
    with this, so they agree with what a run does."""
    if row is None:
        return False
    if row.get("status") == "ok":
        return True
    return row.get("status") == "skipped" and not (cell is not None and reads_weights(cell))


def reads_weights(cell: Cell) -> bool:
    """Whether the cell's method reads trained weights (declares ``needs_weights``: LKV, a composition with it). Its
    skipped row is retried on resume (a validate call): training the weights lifts the skip under the same run_id,
    where every other skip reason (ratio, model, length) is fixed by the run_id."""
    from methods import catalog

    try:
        method = catalog.build(cell.method, ratio=cell.ratio, **dict(cell.knobs))
    except Exception:  # noqa: BLE001 - a config the runner refuses is its own (failed) row, not this rule's
        return False
    return bool(getattr(method, "needs_weights", False))


def gate_passes(row: dict | None, threshold: float | None) -> bool | None:
    """True / False once the full-cache row is ok; None while it is missing or not ok. No threshold: True."""
    if threshold is None:
        return True
    if not row or row.get("status") != "ok" or row.get("accuracy") is None:
        return None
    return float(row["accuracy"]) >= threshold


# --------------------------------------------------------------------------------------------- running


def run_grid(grid: dict, parts: dict, *, results: Path, max_minutes: float | None, extra: list[str],
             retry_skipped: bool = False) -> list[str]:
    """Run every cell of ``parts`` not done yet; returns the run_ids written by this invocation.

    Resume: a cell whose ok row exists is done (found by cell and settings, as the tables find it); so is one whose
    *skipped* row exists under the run_id the cell would write now (same config, same weights): its reason (the
    method refuses this model, ratio or length) would be written again, so the row is kept as it is, unless
    ``retry_skipped`` (e.g. after a method learned a model) or the method reads trained weights
    (:func:`reads_weights`: LKV's skip for missing weights is lifted by training them). Failed cells rerun."""
    from harness.run import run_id_for, run_job
    from harness.sweep import compose

    settings = dict(grid["settings"])
    threshold = threshold_of(grid)
    t_start = time.monotonic()
    written: list[str] = []
    kept: list[str] = []  # skipped cells not rerun
    probe_cache: dict = {}
    by_id = read_rows(results)
    done = rows_by_cell(by_id, settings)

    def out_of_time() -> bool:
        return max_minutes is not None and time.monotonic() - t_start > 60 * max_minutes

    def run(cell: Cell) -> dict | None:
        row = done.find(cell)
        if row is not None and row.get("status") == "ok":
            return row
        if out_of_time():
            return None
        t0, c0 = time.monotonic(), time.process_time()
        cfg = compose(cell.overrides(settings) + [f"results_dir={results}", "progress=false", *extra])
        prior = None if retry_skipped or not by_id else by_id.get(run_id_for(cfg) or "")
        if prior is not None and prior.get("status") == "skipped" and not reads_weights(cell):
            kept.append(prior["run_id"])
            return prior
        row = run_job(cfg, method_name=cell.method, probe_cache=probe_cache)
        done.add(row)
        written.append(row["run_id"])
        with (results / "costs.jsonl").open("a") as f:  # wall and CPU seconds of each cell this process ran
            f.write(json.dumps({"run_id": row["run_id"], "cell": cell.label(), "status": row.get("status"),
                                "wall_s": round(time.monotonic() - t0, 2), "cpu_s": round(time.process_time() - c0, 2),
                                "machine": row.get("device"), "threads": _threads()}) + "\n")
        acc = row.get("accuracy")
        print(f"[grid] {cell.label()}: {row.get('status')}"
              f"{'' if acc is None else f' acc={acc:.3f}'} ({time.monotonic() - t0:.0f}s)"
              f"{'' if row.get('status') == 'ok' else ' - ' + str(row.get('reason'))[:160]}", file=sys.stderr, flush=True)
        return row

    unavailable: dict[str, str] = {}
    for (model, length), part in parts.items():
        if model not in unavailable:
            unavailable[model] = model_unavailable(model) or ""
        if unavailable[model]:
            print(f"[grid] {model} @ {length}: not run, the model is not available: {unavailable[model]}",
                  file=sys.stderr, flush=True)
            continue
        for gate_cell in part["gate"]:  # task by task in the grid's order: the gate, then every method on that task
            ok = gate_passes(run(gate_cell), threshold)
            if ok is False:
                print(f"[grid] {model} {length}: {gate_cell.task} is out (full accuracy "
                      f"{done.find(gate_cell)['accuracy']:.2f} < {threshold})", file=sys.stderr, flush=True)
            if ok:
                for cell in part["cells"][gate_cell.task]:  # the probe cache spans tasks: one probe per method x ratio
                    run(cell)
        if out_of_time():
            print(f"[grid] stopped after {max_minutes} minutes; run again to resume", file=sys.stderr, flush=True)
            break
    if kept:
        print(f"[grid] {len(kept)} skipped cell{'s' if len(kept) != 1 else ''} kept as they are (their rows say "
              f"why); --retry-skipped reruns them", file=sys.stderr, flush=True)
    return written


def add_run_options(ap: argparse.ArgumentParser) -> None:
    """The options of running a grid that every runner shares (scripts/leaderboard.py, scripts/experiment.py);
    :func:`execute` reads them. A runner also takes ``--tasks`` (a comma-separated subset: a worker's share)."""
    ap.add_argument("--max-minutes", type=float, help="start no new cell after this long (resume later)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (e.g. 1 on a shared machine)")
    ap.add_argument("--workers", type=int, default=1,
                    help="processes sharing this machine's GPU, each on its own tasks: accuracy passes side by side, "
                         "each throughput probe alone (harness/gpu_share.py); cells are host-bound on small models")
    ap.add_argument("--retry-skipped", action="store_true",
                    help="rerun cells whose skipped row exists (default: kept, since the method's reason holds for "
                         "the same config; failed cells always rerun)")
    ap.add_argument("--pack", type=Path, help="write the rows this invocation produced to this .tar.gz")
    ap.add_argument("--written-to", type=Path, help=argparse.SUPPRESS)  # a worker's run_ids, for its parent
    ap.add_argument("--no-tables", action="store_true", help=argparse.SUPPRESS)  # a worker: the parent writes them


def execute(grid: dict, parts: dict, args: argparse.Namespace, *, results: Path, worker_argv: list[str],
            extra: list[str] | None = None) -> list[str]:
    """Run ``parts`` as :func:`add_run_options`' ``args`` say: in this process, or in ``args.workers`` processes
    (:func:`run_workers`; ``worker_argv``: the runner's command for the same grid, results and extra overrides, to
    which the worker's share and these options are added). Then write ``--written-to`` and ``--pack`` the rows
    this invocation (its workers included) wrote; returns their run_ids. Tables and analyses are the caller's."""
    tasks = list(dict.fromkeys(c.task for part in parts.values() for c in part["gate"]))  # the grid's order
    if args.workers > 1 and len(tasks) > 1:
        threads = args.threads or max(1, (os.cpu_count() or 1) // min(args.workers, len(tasks)))
        written = run_workers([*worker_argv, "--threads", str(threads),
                               *(["--max-minutes", str(args.max_minutes)] if args.max_minutes is not None else []),
                               *(["--retry-skipped"] if args.retry_skipped else [])], tasks, args.workers)
    else:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        written = run_grid(grid, parts, results=results, max_minutes=args.max_minutes, extra=list(extra or []),
                           retry_skipped=args.retry_skipped)
    if args.written_to:
        args.written_to.write_text(json.dumps(written))
    if args.pack:
        pack(results, written, args.pack)
    return written


def run_workers(base_argv: list[str], tasks: list[str], n: int, *, cwd: Path = REPO) -> list[str]:
    """Run a grid in ``n`` processes on this machine, worker i on ``tasks[i::n]`` (a task's gate and its cells stay
    in one worker), all sharing its GPU (``harness.gpu_share``: accuracy passes side by side, each probe alone and
    shared). ``base_argv``: the worker's command without ``--tasks`` (it must accept ``--tasks``,
    ``--written-to FILE`` and ``--no-tables``). Returns the run_ids the workers wrote; a worker that fails is
    reported and the others go on (its rows written so far are kept)."""
    import subprocess
    import tempfile

    from harness import gpu_share

    n = max(1, min(n, len(tasks)))
    with tempfile.TemporaryDirectory(prefix="kvbench-workers-") as tmp:
        env = {**os.environ, gpu_share.ENV: str(Path(tmp) / "lock")}
        procs = []
        for i in range(n):
            out = Path(tmp) / f"written-{i}.json"
            argv = [*base_argv, "--tasks", ",".join(tasks[i::n]), "--written-to", str(out), "--no-tables"]
            print(f"[grid] worker {i}: {' '.join(tasks[i::n])}", file=sys.stderr, flush=True)
            procs.append((i, out, subprocess.Popen(argv, cwd=cwd, env=env)))
        written: list[str] = []
        for i, out, proc in procs:
            rc = proc.wait()
            if rc != 0:
                print(f"[grid] worker {i} exited with {rc}; the rows it wrote are kept, run again to resume",
                      file=sys.stderr, flush=True)
            if out.is_file():
                written += json.loads(out.read_text())
    return written


def threshold_of(grid: dict) -> float | None:
    t = grid.get("min_full_accuracy")
    return None if t is None else float(t)


def model_unavailable(model: str) -> str | None:
    """Why ``model``'s weights cannot be had here (a GGUF package that is not installed and cannot be), or None.
    Checked once per model, so a machine without the package writes no hundreds of failed rows."""
    import yaml

    from harness.run import CONF

    cfg = yaml.safe_load((CONF / "model" / f"{model}.yaml").read_text())
    if not cfg.get("gguf"):
        return None
    from harness.pretrained import MissingGGUF, ensure_converted

    try:
        ensure_converted(str(cfg["name"]), cfg["gguf"])
    except MissingGGUF as e:
        return str(e)
    return None


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def pack(results: Path, run_ids: list[str], dest: Path) -> None:
    """The rows (and per-sample files) this invocation wrote, as one tar.gz (a GPU call brings it back;
    extract it with ``tar -xzf FILE -C results/leaderboard``)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(dest, "w:gz") as tar:
        for rid in run_ids:
            for p in [results / "runs" / f"{rid}.json", *sorted((results / "samples").glob(f"{rid}.*"))]:
                if p.is_file():
                    tar.add(p, arcname=str(p.relative_to(results)))
        if (results / "costs.jsonl").is_file():
            tar.add(results / "costs.jsonl", arcname=f"costs-{os.getpid()}.jsonl")
    print(f"[grid] packed {len(run_ids)} rows into {dest}", file=sys.stderr)
