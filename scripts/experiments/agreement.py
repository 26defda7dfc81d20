"""How often a method's greedy answer differs from the full cache's, sample by sample.

    python -m scripts.experiments.agreement --methods "uniform_int ratio=0.5" -- task=niah_multikey context_length=2048 limit=200
    python -m scripts.experiments.agreement --methods "uniform_int ratio=0.5" "fp8 ratio=0.5" -- task=niah_multikey limit=200

Runs the accuracy pass of ``full`` and of each method (no throughput probe) on the same samples and
prints, per method, the number of samples whose prediction differs from full's, then a JSON last
line. Uses the runner's own accuracy pass, so prompts, splitting and decoding are the harness's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def predictions(overrides: list[str]) -> tuple[dict, list[dict]]:
    from harness.run import _run
    from harness.sweep import compose

    cfg = compose([*overrides, "bench.enabled=false", "progress=false"])
    row: dict = {"method": overrides[0].split("=", 1)[1]}
    samples: list[dict] = []
    out = _run(cfg, row, samples)
    return out, samples


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", required=True, help='e.g. "uniform_int ratio=0.5" "fp8 ratio=0.5"')
    ap.add_argument("overrides", nargs="*", help="shared Hydra overrides (task=..., limit=..., context_length=...)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    t0 = time.perf_counter()
    _, ref = predictions(["method=full", "ratio=0.0", *args.overrides])
    ref_by = {s["doc_id"]: s for s in ref}
    result: dict = {"exp": "agreement", "overrides": args.overrides, "n": len(ref), "methods": {}}
    for spec in args.methods:
        name, *rest = spec.split()
        row, samples = predictions([f"method={name}", *rest, *args.overrides])
        differ = [s["doc_id"] for s in samples if s["prediction"] != ref_by[s["doc_id"]]["prediction"]]
        result["methods"][spec] = {"differ": len(differ), "n": len(samples), "doc_ids": differ[:20],
                                   "accuracy": row.get("accuracy"), "memory": row.get("memory")}
        print(f"{spec}: {len(differ)} of {len(samples)} predictions differ from full", file=sys.stderr, flush=True)
    result["full_accuracy"] = sum(float(s["score"] or 0) for s in ref) / max(1, len(ref))
    result["seconds"] = time.perf_counter() - t0
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
