"""Sweeps: ``make sweep METHOD=x`` and the default quick-start set of ``make run``.

    python -m harness.sweep method=snapkv [task=niah_single ...]   # Hydra multirun over x's family sweep
    python -m harness.sweep --default [limit=10 ...]                # make run: full + one method per family

``--default`` runs in one process (the model is loaded once) through Hydra's compose API; the
method sweep is a real Hydra multirun (``python -m harness.run -m method=x sweep=<family>
task=<DEFAULT_TASKS>``), so launchers (joblib, submitit) apply to it. Both exit 1 when any run failed
(after every run has run), and on Ctrl-C or SIGTERM stop the runs, print one line (how many runs are
done) and exit non-zero; rerunning the same command resumes (finished runs are skipped).
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from typing import Any

from .run import (
    CONF,
    FAMILY_SWEEP,
    JOB_LOG_ENV,
    SUPERVISED_ENV,
    UsageError,
    _new_job_log,
    check_overrides,
    read_job_log,
    summary_line,
    tally,
    usage_message,
)

# The default tasks, defined here once: `make run` reports them and `make sweep` sweeps them (the
# conf/sweep/<family>.yaml files hold ratios only). The tiny model solves them at full cache
# (models/kvbench-tiny/README.md); niah_multikey needs the right needle among four and variable_tracking
# a chain of assignments, so they show what a method keeps.
DEFAULT_TASKS = ("niah_single", "niah_multikey", "variable_tracking")
# One representative per family for the quick start, at a ratio it honours. Add a family's
# representative here when its first method lands; keep `make run` under 10 minutes on 2 CPU cores.
REPRESENTATIVES: dict[str, tuple[str, float]] = {
    "none": ("full", 0.0),
    "quantization": ("uniform_int", 0.75),
    "eviction": ("streaming_llm", 0.5),
    "sparse": ("louver", 0.9),
}
DEFAULT_SETTINGS = ("limit=10", "context_length=1024")


def method_family(name: str) -> str:
    """The ``family`` of a catalogue method (imports its class, builds nothing)."""
    from methods import catalog

    try:
        return catalog.family(name)
    except catalog.CatalogError as e:
        raise UsageError(str(e)) from None


def compose(overrides: list[str]) -> Any:
    from hydra import compose as _compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return _compose(config_name="config", overrides=overrides)


def _interrupted(done: int, total: int | None) -> str:
    of = f" of {total}" if total else ""
    return (f"{fresh_line()}interrupted: {done}{of} runs done, their rows are kept; rerun the same command to "
            "resume (finished runs are skipped)")


def fresh_line() -> str:
    """What starts a message on its own line after a progress bar that an interruption left half drawn:
    on a terminal, return to the line's start and clear it; elsewhere nothing (bars are not drawn there
    unless forced, and a blank line would be a second line)."""
    return "\r\033[K" if sys.stderr.isatty() else ""


def run_default(extra: list[str]) -> int:
    """full + one representative per family x DEFAULT_TASKS, in this process: one summary line per run
    (the rows are in results/runs/; ``make run`` prints the table after)."""
    from . import results as R
    from .run import interruptible, run_job

    jobs = []
    for method, ratio in REPRESENTATIVES.values():
        if (CONF / "method" / f"{method}.yaml").exists():
            for task in DEFAULT_TASKS:
                jobs.append([f"method={method}", f"ratio={ratio}", f"task={task}", *DEFAULT_SETTINGS, *extra])
    rows: list[dict] = []
    interruptible()
    try:
        for i, ov in enumerate(jobs, 1):
            print(f"[kvbench] run {i}/{len(jobs)}: {' '.join(ov)}", file=sys.stderr, flush=True)
            cfg = compose(ov)
            row = run_job(cfg, method_name=ov[0].split("=", 1)[1], strict=True)
            rows.append(row)
            path = R.row_path(str(cfg.results_dir), row["run_id"])
            print(f"[kvbench] {summary_line(row, path, metric=cfg.task.get('metric'))}", file=sys.stderr, flush=True)
    except UsageError as e:  # the same settings go to every run: the first says it
        print(usage_message(e), file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt as e:
        print(_interrupted(len(rows), len(jobs)), file=sys.stderr, flush=True)
        return 128 + (e.args[0] if e.args and isinstance(e.args[0], int) else signal.SIGINT)
    print(f"[kvbench] {tally(rows)}", file=sys.stderr, flush=True)
    return 1 if any(r.get("status") == "failed" for r in rows) else 0


def sweep_params(family_sweep: str) -> dict[str, str]:
    """``hydra.sweeper.params`` of conf/sweep/<family_sweep>.yaml."""
    import yaml

    path = CONF / "sweep" / f"{family_sweep}.yaml"
    spec = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    params = ((spec.get("hydra") or {}).get("sweeper") or {}).get("params") or {}
    return {str(k): str(v) for k, v in params.items()}


def count_jobs(params: dict[str, str], args: list[str]) -> int | None:
    """Jobs of a basic-sweeper multirun: the product of the comma-separated choices of the sweep file's
    params and the command line's overrides (a later value of a key replaces it); None when a value
    uses a sweep function (range(), choice() ...)."""
    merged = dict(params)
    for a in args:
        if "=" in a and not a.startswith("-"):
            k, v = a.split("=", 1)
            merged[k.lstrip("+~")] = v
    if any(c in v for v in merged.values() for c in "()[]"):
        return None
    return math.prod(len(v.split(",")) for v in merged.values())


def supervise(cmd: list[str], *, total: int | None = None, env: dict[str, str] | None = None) -> int:
    """Run ``cmd`` (a multirun) as a child and pass SIGINT, SIGTERM and SIGHUP on to it, so stopping this
    process (Ctrl-C, ``kill``, make forwarding SIGTERM) stops the runs instead of orphaning them. On a
    signal: wait for the child, print one line with the count of runs done, return 128 + signal."""
    env = dict(os.environ if env is None else env)
    own = not env.get(JOB_LOG_ENV)
    if own:
        env[JOB_LOG_ENV] = _new_job_log()
    env[SUPERVISED_ENV] = "1"
    got: list[int] = []
    child = subprocess.Popen(cmd, env=env)

    def forward(signum: int, frame: Any) -> None:
        if not got:  # the child ignores a second signal while it stops; send each kind once
            got.append(signum)
        if child.poll() is None:
            try:
                child.send_signal(signum)
            except ProcessLookupError:
                pass

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        while True:
            try:
                rc = child.wait()
                break
            except KeyboardInterrupt:  # pragma: no cover - the handler above replaces the default one
                continue
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        done = read_job_log(env[JOB_LOG_ENV])
        if own:
            try:
                os.unlink(env[JOB_LOG_ENV])
            except OSError:
                pass
    if got:
        print(_interrupted(len(done), total), file=sys.stderr, flush=True)
        return 128 + got[0]
    return rc


def run_method_sweep(method: str, extra: list[str]) -> int:
    family = method_family(method)
    sweep = FAMILY_SWEEP.get(family)
    if sweep is None:
        raise UsageError(f"no sweep file for family {family!r} of method {method!r}; add conf/sweep/<family>.yaml")
    tasks = [] if any(a.split("=", 1)[0].lstrip("+~") == "task" for a in extra) else [f"task={','.join(DEFAULT_TASKS)}"]
    args = [f"method={method}", f"sweep={sweep}", *tasks, *extra]
    total = count_jobs(sweep_params(sweep), args[2:])
    cmd = [sys.executable, "-m", "harness.run", "-m", *args]
    print(f"[kvbench] {total or 'several'} runs: " + " ".join(cmd[1:]), file=sys.stderr, flush=True)
    return supervise(cmd, total=total)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        check_overrides(args)
        if "--default" in args:
            args.remove("--default")
            return run_default(args)
        methods = [a.split("=", 1)[1] for a in args if a.startswith("method=")]
        if len(methods) != 1 or "," in methods[0]:
            raise UsageError("name one method: python -m harness.sweep method=<name> (or make sweep METHOD=<name>)")
        rest = [a for a in args if not a.startswith("method=")]
        return run_method_sweep(methods[0], rest)
    except UsageError as e:
        print(usage_message(e), file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
