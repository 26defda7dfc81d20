"""Sweeps: ``make sweep METHOD=x`` and the default quick-start set of ``make run``.

    python -m harness.sweep method=snapkv [task=niah_single ...]   # Hydra multirun over x's family sweep
    python -m harness.sweep --default [limit=10 ...]                # make run: full + one method per family

``--default`` runs in one process (the model is loaded once) through Hydra's compose API; the
method sweep is a real Hydra multirun (``python -m harness.run -m method=x sweep=<family>``), so
launchers (joblib, submitit) apply to it.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from typing import Any

from .run import CONF, FAMILY_SWEEP, UsageError, check_overrides, options

# One representative per family for the quick start, at a ratio it honours. Add a family's
# representative here when its first method lands; keep `make run` under 10 minutes on 2 CPU cores.
REPRESENTATIVES: dict[str, tuple[str, float]] = {
    "none": ("full", 0.0),
    "quantization": ("uniform_int", 0.75),
    "eviction": ("streaming_llm", 0.5),
    "sparse": ("louver", 0.9),
}
# Tasks of the quick start: the tiny model solves them at full cache (models/kvbench-tiny/README.md), and
# niah_multikey needs the right needle among four, so it shows what a method keeps.
DEFAULT_TASKS = ("niah_single", "niah_multikey", "niah_multivalue")
DEFAULT_SETTINGS = ("limit=10", "context_length=1024")


def method_family(name: str) -> str:
    """The ``family`` of a method config, read from its class without instantiating it."""
    import yaml

    path = CONF / "method" / f"{name}.yaml"
    if not path.exists():
        raise UsageError(f"unknown method {name!r}; available: {', '.join(options('method'))}")
    target = yaml.safe_load(path.read_text())["_target_"]
    mod, _, cls = target.rpartition(".")
    return str(getattr(importlib.import_module(mod), cls).family)


def compose(overrides: list[str]) -> Any:
    from hydra import compose as _compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return _compose(config_name="config", overrides=overrides)


def run_default(extra: list[str]) -> int:
    """full + one representative per family x DEFAULT_TASKS, in this process; prints each row."""
    from .run import run_job

    jobs = []
    for method, ratio in REPRESENTATIVES.values():
        if (CONF / "method" / f"{method}.yaml").exists():
            for task in DEFAULT_TASKS:
                jobs.append([f"method={method}", f"ratio={ratio}", f"task={task}", *DEFAULT_SETTINGS, *extra])
    failed = 0
    for i, ov in enumerate(jobs, 1):
        print(f"[kvbench] run {i}/{len(jobs)}: {' '.join(ov)}", file=sys.stderr, flush=True)
        cfg = compose(ov)
        row = run_job(cfg, method_name=ov[0].split("=", 1)[1])
        failed += row.get("status") == "failed"
        print(json.dumps({k: row.get(k) for k in ("run_id", "method", "ratio", "task", "status", "accuracy",
                                                  "ratio_achieved", "reason")}), flush=True)
    return 1 if failed else 0


def run_method_sweep(method: str, extra: list[str]) -> int:
    family = method_family(method)
    sweep = FAMILY_SWEEP.get(family)
    if sweep is None:
        raise UsageError(f"no sweep file for family {family!r} of method {method!r}; add conf/sweep/<family>.yaml")
    cmd = [sys.executable, "-m", "harness.run", "-m", f"method={method}", f"sweep={sweep}", *extra]
    print("[kvbench] " + " ".join(cmd[1:]), file=sys.stderr, flush=True)
    return subprocess.call(cmd)


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
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
