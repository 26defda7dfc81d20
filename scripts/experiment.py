"""Pinned experiments (``conf/experiment/<name>.yaml``): the article's open questions, each run by one
command, resumable, with its answer written beside its rows.

    python -m scripts.experiment --list                           # every experiment and its question
    python -m scripts.experiment q4_monotone --size smoke         # minutes on a CPU (the test suite runs this)
    python -m scripts.experiment q4_monotone --plan               # cells, done and left
    python -m scripts.experiment q4_monotone --max-minutes 8 --pack $OUT/rows.tar.gz   # a GPU call; resume later
    python -m scripts.experiment q4_monotone --analyze            # only rebuild the answer from the rows
    python -m scripts.experiment q4_monotone --workers 4 --max-minutes 8 --pack $OUT/rows.tar.gz   # 4 processes, 1 GPU

Two kinds. A *grid* experiment (the spec has ``models``) is a grid of ordinary runs (harness.grid: the
leaderboard's engine, same rows and run ids as ``python -m harness.run``) written to
``results/experiments/<name>/`` (``<name>-<size>/`` for a size), then its ``analysis``
(scripts/experiments/questions.py) writes ``answer.md`` and ``answer.json`` there: the question, a one-sentence
answer and the table it rests on. A *command* experiment (the spec has ``command``) runs a script of its own
(e.g. LKV's length generalization, the bench's overhead profile) with the arguments of the chosen size.

A grid experiment runs as the leaderboard does (``harness.grid.add_run_options``): ``--max-minutes``, ``--pack``,
``--workers N`` (N processes on one GPU, each on its own tasks, each throughput probe alone; the parent packs every
row they wrote and writes the answer once they are done), and resume keeps ok and skipped cells
(``--retry-skipped`` reruns the skipped ones). ``name`` may also be the path of a spec of one's own.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from harness import grid as G

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf" / "experiment"
RESULTS = REPO / "results" / "experiments"


def specs() -> dict[str, dict]:
    """Every experiment of conf/experiment/ (raw YAML; the leaderboard is one too) by name."""
    import yaml

    return {p.stem: yaml.safe_load(p.read_text()) for p in sorted(CONF.glob("*.yaml"))}


def spec_path(name: str) -> Path:
    """conf/experiment/<name>.yaml, or ``name`` itself when it is the path of a YAML file (a spec of one's own;
    its results go to results/experiments/<its stem>)."""
    own = Path(name)
    if own.suffix in (".yaml", ".yml") and own.is_file():
        return own.resolve()
    path = CONF / f"{name}.yaml"
    if not path.is_file():
        import difflib

        near = difflib.get_close_matches(name, list(specs()), n=1)
        raise SystemExit(f"error: no experiment {name!r}{f'; did you mean {near[0]}?' if near else ''} "
                         f"(available: {', '.join(specs())}; `python -m scripts.experiment --list`)")
    return path


def results_dir(name: str, size: str | None, root: Path = RESULTS) -> Path:
    return root / (name if size in (None, "full") else f"{name}-{size}")


def run_command(spec: dict, size: str | None, out: Path) -> int:
    """A command experiment: ``command[size]`` (a list of argv words; ``{out}`` becomes the results dir)."""
    cmds = spec["command"]
    key = size or "full"
    if key not in cmds:
        raise SystemExit(f"error: this experiment has no size {key!r}; sizes: {', '.join(cmds)}")
    argv = [str(a).format(out=out) for a in cmds[key]]
    out.mkdir(parents=True, exist_ok=True)
    print(f"[experiment] {shlex.join(argv)}", file=sys.stderr, flush=True)
    return subprocess.run([sys.executable, *argv], cwd=REPO).returncode


def analyze(spec: dict, grid: dict | None, out: Path) -> dict | None:
    """Run the spec's analysis over the rows in ``out`` (run with the grid's settings; a command experiment's
    analysis reads its script's own outputs there); write answer.{md,json}."""
    from scripts.experiments.questions import ANALYSES

    name = spec.get("analysis")
    if not name:
        return None
    if name not in ANALYSES:
        raise SystemExit(f"error: unknown analysis {name!r}; available: {', '.join(ANALYSES)}")
    rows = (list(G.rows_by_cell(G.read_rows(out), dict(grid["settings"])).values())
            if grid is not None and (out / "runs").is_dir() else [])
    args = (grid if grid is not None else spec).get("analysis_args") or {}  # a size may set its own
    ans = ANALYSES[name](rows, results=out, **args)
    out.mkdir(parents=True, exist_ok=True)
    (out / "answer.md").write_text(ans.markdown())
    data = {"question": ans.question, "answer": ans.answer, "evidence": ans.evidence, "rows": len(rows)}
    (out / "answer.json").write_text(json.dumps(data, indent=1) + "\n")
    print(ans.markdown())
    return data


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", nargs="?", help="experiment (conf/experiment/<name>.yaml), or the path of a spec of your own")
    ap.add_argument("--list", action="store_true", help="list the experiments and their questions")
    ap.add_argument("--size", default=None, help="a size of the spec (e.g. smoke); default: the full experiment")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--plan", action="store_true", help="print the cells, done and left; run nothing")
    ap.add_argument("--analyze", action="store_true", help="only (re)write the answer from the rows")
    G.add_run_options(ap)  # --max-minutes --threads --workers --retry-skipped --pack (and a worker's hidden options)
    ap.add_argument("--tasks", help=argparse.SUPPRESS)  # a worker's share of the grid's tasks (comma-separated)
    args = ap.parse_args(argv)
    if args.list or not args.name:
        for name, spec in specs().items():
            print(f"{name:24s} {spec.get('question', '(the leaderboard grid: python -m scripts.leaderboard)')}")
        return 0
    for k, v in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(k, v)
    path = spec_path(args.name)
    import yaml

    spec = yaml.safe_load(path.read_text())
    if "question" not in spec:
        raise SystemExit(f"error: {path.name} is not an experiment with a question; run it with its own entry point "
                         f"(the leaderboard: python -m scripts.leaderboard)")
    out = results_dir(path.stem, args.size, args.results)
    if "command" in spec:
        if args.workers > 1:
            raise SystemExit(f"error: {args.name} runs a script of its own; --workers applies to grid experiments "
                             f"(run it without --workers)")
        if args.plan:
            print(f"{args.name} runs a script of its own (no grid to plan): "
                  f"{' '.join(map(str, spec['command'].get(args.size or 'full', [])))} -> {out}")
            return 0
        code = 0 if args.analyze else run_command(spec, args.size, out)
        if code == 0:
            analyze(spec, None, out)
        return code
    grid = G.load_grid(path, size=args.size)
    parts = G.plan(grid, tasks=[t for t in args.tasks.split(",") if t] if args.tasks else None)
    if args.plan:
        done = G.rows_by_cell(G.read_rows(out), dict(grid["settings"]))
        cells = [c for p in parts.values() for c in p["gate"] + [c for cs in p["cells"].values() for c in cs]]
        skipped = [c for c in cells if (done.find(c) or {}).get("status") == "skipped"]
        left = [c for c in cells if not G.settled(done.find(c), c) or (args.retry_skipped and c in skipped)]
        print(f"{args.name}: {len(cells)} cells, {len(cells) - len(left)} done, {len(left)} to run -> {out}"
              f"{f' ({len(skipped)} of the done are skipped: --retry-skipped reruns them)' if skipped and not args.retry_skipped else ''}")
        return 0
    if not args.analyze:
        worker = [sys.executable, "-m", "scripts.experiment", path.stem if path.parent == CONF else str(path),
                  "--results", str(args.results.resolve()), *(["--size", args.size] if args.size else [])]
        G.execute(grid, parts, args, results=out, worker_argv=worker)
        if args.no_tables:  # a worker: the parent answers once every worker is done
            return 0
    analyze(spec, grid, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
