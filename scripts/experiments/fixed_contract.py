"""Fixed-contract diagnostic for value-aware eviction (paper 3; docs/PAPERS.md §3).

    python -m scripts.experiments.fixed_contract                  # default grid: tiny x 4 tasks x 2 budgets, n=100
    python -m scripts.experiments.fixed_contract --smoke          # a seconds-long CPU run (tests use it)
    python -m scripts.experiments.fixed_contract --models tiny,llama3_1_8b_instruct --ratios 0.8,0.95 --n 200

Over a grid of cells (model x task x budget) the base contract (``value_aware`` with support
``prefill_window``, ranking ``attention``, projection ``block``) is compared with probes that swap
one decision slot at a time (ranking ``value_aware`` | ``vatp``, projection ``topk`` | ``dilate``,
support ``decode_queries``). Per cell: full-cache, base and probe accuracy with 95% intervals,
margin = full - base (positive when > 0.5 points, docs/PAPERS.md §3 (d) 4) and the probe's sign
(probe - base > 0: +, < 0: -, equal: 0). Then, per probe, the share of cells where it helps among
positive-margin and among non-positive-margin cells (the paper: 72.6% and 32.4% on LongBench). A
task is flagged non-monotone for a selector only when its accuracy rises with compression (from one
budget to the next, full cache counted as ratio 0) by more than 2 paired standard errors.

Writes ``<out>/<tag>.csv`` (one row per cell x selector), ``<out>/<tag>.md`` (printed too) and
prints a JSON summary as the last stdout line. Per-sample scores are cached under ``<out>/cache``,
so an interrupted run resumes. Imports neither lm-eval, wandb nor Hydra: it runs on the GPU machine
with torch, transformers and PyYAML only.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

from harness.evaluate import Evaluator, ci95, mean_se, sign  # noqa: E402  (torch-free at import)

DEFAULT_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "variable_tracking")
BASE = {"support": "prefill_window", "ranking": "attention", "projection": "block"}
PROBES = {  # name -> the one slot it swaps
    "ranking=value_aware": {"ranking": "value_aware"},
    "ranking=vatp": {"ranking": "vatp"},
    "projection=topk": {"projection": "topk"},
    "projection=dilate": {"projection": "dilate"},
    "support=decode_queries": {"support": "decode_queries"},
}
MARGIN_POINTS = 0.005  # margin > 0.5 points counts as positive


def run_grid(args: argparse.Namespace) -> dict:
    from methods.full import Full
    from methods.value_aware import ValueAware

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ev = Evaluator(args, out, tag="fixed_contract")
    probes = {p: PROBES[p] for p in args.probes}
    rows, cells = [], []
    series: dict[tuple, dict[float, list[float]]] = {}  # (model, task, selector) -> ratio -> scores
    for model_name in args.models:
        for task in args.tasks:
            full, _ = ev.scores(model_name, task, Full(), "full")
            for ratio in args.ratios:
                contract = dict(ratio=ratio, n_sink=args.n_sink, window=args.window, block_size=args.block_size)
                base, base_kv = ev.scores(model_name, task, ValueAware(**contract, **BASE), f"base r={ratio}")
                margin = mean_se(full)[0] - mean_se(base)[0]
                cell = {"model": model_name, "task": task, "ratio": ratio, "margin": margin,
                        "positive_margin": margin > MARGIN_POINTS, "probes": {}}
                for sel, scores_, kv in (("full", full, {"ratio_achieved": 0.0}), ("base", base, base_kv)):
                    rows.append(_row(model_name, task, ratio, sel, scores_, kv, full, base, margin))
                series.setdefault((model_name, task, "base"), {0.0: full})[ratio] = base
                for name, swap in probes.items():
                    probe, kv = ev.scores(model_name, task, ValueAware(**contract, **{**BASE, **swap}), f"{name} r={ratio}")
                    rows.append(_row(model_name, task, ratio, name, probe, kv, full, base, margin))
                    cell["probes"][name] = sign(mean_se(probe)[0] - mean_se(base)[0])
                    series.setdefault((model_name, task, name), {0.0: full})[ratio] = probe
                cells.append(cell)
    summary = _summarise(cells, probes, series, args)
    _write(out / f"{args.tag}.csv", rows)
    md = _markdown(rows, summary, args)
    (out / f"{args.tag}.md").write_text(md)
    (out / f"{args.tag}.json").write_text(json.dumps(summary, indent=1))
    print(md)
    return summary


def _row(model, task, ratio, selector, scores, kv, full, base, margin) -> dict:
    acc, se = mean_se(scores)
    lo, hi = ci95(scores)
    d = [p - b for p, b in zip(scores, base)]
    dm, dse = mean_se(d)
    return {"model": model, "task": task, "ratio": ratio, "selector": selector, "n": len(scores),
            "accuracy": round(acc, 4), "ci_low": round(lo, 4), "ci_high": round(hi, 4),
            "full": round(mean_se(full)[0], 4), "base": round(mean_se(base)[0], 4), "margin": round(margin, 4),
            "delta_vs_base": round(dm, 4), "delta_se": round(dse, 4),
            "sign": sign(dm) if selector not in ("full", "base") else "",
            "ratio_achieved": None if kv.get("ratio_achieved") is None else round(kv["ratio_achieved"], 4)}


def _summarise(cells: list[dict], probes: dict, series: dict, args: argparse.Namespace) -> dict:
    def share(name: str | None, positive: bool) -> dict:
        signs = [s for c in cells if c["positive_margin"] == positive
                 for p, s in c["probes"].items() if name is None or p == name]
        helps = sum(s > 0 for s in signs)
        return {"cells": len(signs), "helps": helps, "share": helps / len(signs) if signs else None}

    shares = {name: {"positive_margin": share(name, True), "non_positive_margin": share(name, False)}
              for name in [*probes, None]}
    shares["all probes"] = shares.pop(None)
    non_monotone = []
    for (model, task, sel), by_ratio in series.items():
        rs = sorted(by_ratio)
        for r1, r2 in zip(rs, rs[1:]):
            d = [b - a for a, b in zip(by_ratio[r1], by_ratio[r2])]
            m, se = mean_se(d)
            if m > 2 * se and m > 0:
                non_monotone.append({"model": model, "task": task, "selector": sel, "from_ratio": r1, "to_ratio": r2,
                                     "rise": round(m, 4), "paired_se": round(se, 4)})
    return {"grid": {"models": args.models, "tasks": args.tasks, "ratios": args.ratios, "n": args.n,
                     "context_length": args.context_length, "protocol": args.protocol, "probes": list(probes),
                     "base": BASE, "contract": {"n_sink": args.n_sink, "window": args.window,
                                                "block_size": args.block_size}},
            "cells": len(cells), "shares": shares, "non_monotone": non_monotone,
            "paper": {"positive_margin": 0.726, "non_positive_margin": 0.324}}


def _write(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _markdown(rows: list[dict], summary: dict, args: argparse.Namespace) -> str:
    lines = [f"## Fixed-contract diagnostic ({args.tag})", "",
             "`" + " ".join(["python -m scripts.experiments.fixed_contract", *args.argv]) + "`", "",
             "| model | task | ratio | selector | n | accuracy [95% CI] | margin | delta vs base | sign |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['task']} | {r['ratio']} | {r['selector']} | {r['n']} | "
                     f"{r['accuracy']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}] | {r['margin']:+.3f} | "
                     f"{r['delta_vs_base']:+.3f} ± {r['delta_se']:.3f} | {r['sign']} |")
    lines += ["", "| probe | helps, positive-margin cells | helps, non-positive-margin cells |", "|---|---|---|"]
    for name, s in summary["shares"].items():
        p, q = s["positive_margin"], s["non_positive_margin"]
        lines.append(f"| {name} | {_pct(p['share'])} ({p['helps']}/{p['cells']}) | "
                     f"{_pct(q['share'])} ({q['helps']}/{q['cells']}) |")
    lines += ["", "Paper (LongBench, 3 models x 2 budgets): 72.6% and 32.4%.", ""]
    nm = summary["non_monotone"]
    lines.append("Non-monotone (accuracy rises with compression by > 2 paired SE): " +
                 ("none" if not nm else "; ".join(f"{x['task']} / {x['selector']} {x['from_ratio']}->{x['to_ratio']} "
                                                  f"+{x['rise']:.3f} (SE {x['paired_se']:.3f})" for x in nm)))
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny", help="conf/model names or local model directories, comma-separated")
    ap.add_argument("--tasks", default=",".join(DEFAULT_TASKS))
    ap.add_argument("--ratios", default="0.5,0.75", help="budgets as eviction ratios (fraction removed)")
    ap.add_argument("--probes", default=",".join(PROBES))
    ap.add_argument("--n", type=int, default=100, help="samples per cell")
    ap.add_argument("--context-length", type=int, default=2048)
    ap.add_argument("--protocol", default="query_agnostic", choices=("query_agnostic", "query_aware"))
    ap.add_argument("--prefill-chunk", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--n-sink", type=int, default=4)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=32, help="greedy tokens per answer (stops at a newline)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=str(REPO / "results" / "fixed_contract"))
    ap.add_argument("--tag", default=None, help="output file stem (default: derived from the grid)")
    ap.add_argument("--smoke", action="store_true", help="tiny grid for a CPU test: 1 task, n=4, 256 tokens, 12 new tokens")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.smoke:
        args.tasks, args.n, args.context_length, args.batch_size = "niah_single", 4, 256, 4
        args.window, args.block_size, args.prefill_chunk, args.max_new_tokens = 8, 8, 128, 12
        args.tag = args.tag or "smoke"
    args.models = [m for m in args.models.split(",") if m]
    args.tasks = [t for t in args.tasks.split(",") if t]
    args.ratios = [float(r) for r in str(args.ratios).split(",") if r]
    args.probes = [p for p in args.probes.split(",") if p]
    unknown = [p for p in args.probes if p not in PROBES]
    if unknown:
        ap.error(f"unknown probes {unknown}; available: {', '.join(PROBES)}")
    if args.tag is None:
        args.tag = f"{'-'.join(args.models)}_ctx{args.context_length}_n{args.n}_{args.protocol}"
    return args


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse(argv)
    summary = run_grid(args)
    print(json.dumps(summary, default=str), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
