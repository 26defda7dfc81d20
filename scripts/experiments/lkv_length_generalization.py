"""LKV length generalization (paper 4's open question; docs/PAPERS.md §4): a scorer and budgets trained at
2048 tokens, evaluated at 2048, 4096 and 8192 on the tasks it was trained on and on a task it never
saw, against SnapKV and AdaKV at the same ratio, with the ablations.

    python -m scripts.experiments.lkv_length_generalization                 # tiny model, ratio 0.85, n=100 (GPU: minutes)
    python -m scripts.experiments.lkv_length_generalization --smoke         # seconds on a CPU (tests)
    python -m scripts.experiments.lkv_length_generalization --lengths 2048,4096,8192,32768 --rope-beyond-window linear
                                                        # 16x the training length: RoPE scaling beyond the window

Methods (all at ``--ratio``, protocol query-agnostic: the context is compressed before the question):
``lkv`` (learned budgets + learned scorer), ``lkv allocation=uniform`` (uniform budgets + the scorer
trained with them), ``lkv scorer=uniform`` (learned budgets, no token preference: sinks + most
recent), ``snapkv``, ``adakv``, and ``full`` for reference. Weights come from
methods/data/lkv/<model dir>.safetensors (``scripts/train/lkv.py``). Per cell (task x length x
method): accuracy with a 95% interval over the same ``--n`` samples; per length and task split
(seen / held-out): the mean, and LKV's paired difference to SnapKV and AdaKV with its standard error.

Writes ``<out>/<tag>.md`` (printed too), ``<out>/<tag>.csv`` and ``<out>/<tag>.json``; the JSON
summary is the last stdout line. Per-sample scores are cached under ``<out>/cache`` (resumable).
Imports neither lm-eval, wandb nor Hydra.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

from harness.evaluate import Evaluator, ci95, mean_se  # noqa: E402

SEEN = ("niah_single", "niah_multivalue", "variable_tracking")
HELD_OUT = ("niah_multikey",)


def methods(ratio: float, *, n_sink: int, window: int) -> dict:
    from methods.eviction import AdaKV, SnapKV
    from methods.full import Full
    from methods.lkv import LKV

    return {
        "full": Full(),
        "lkv": LKV(ratio=ratio, n_sink=n_sink, window=window),
        "lkv allocation=uniform": LKV(ratio=ratio, n_sink=n_sink, window=window, allocation="uniform"),
        "lkv scorer=uniform": LKV(ratio=ratio, n_sink=n_sink, window=window, scorer="uniform"),
        "snapkv": SnapKV(ratio=ratio),
        "adakv": AdaKV(ratio=ratio),
    }


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    return mean_se([x - y for x, y in zip(a, b)])


def run(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ev = Evaluator(args, out, tag="lkv_length")
    ms = methods(args.ratio, n_sink=args.n_sink, window=args.window)
    splits = {"seen": args.seen, "held_out": args.held_out}
    scores: dict[tuple, list[float]] = {}
    rows = []
    for split, tasks in splits.items():
        for task in tasks:
            for length in args.lengths:
                for name, m in ms.items():
                    s, kv = ev.scores(args.model, task, m, name, context_length=length)
                    scores[(task, length, name)] = s
                    acc, _ = mean_se(s)
                    lo, hi = ci95(s)
                    rows.append({"split": split, "task": task, "context_length": length, "method": name,
                                 "n": len(s), "accuracy": round(acc, 4), "ci_low": round(lo, 4), "ci_high": round(hi, 4),
                                 "ratio_achieved": None if kv.get("ratio_achieved") is None
                                 else round(kv["ratio_achieved"], 4)})
    summary: dict = {"model": args.model, "ratio": args.ratio, "lengths": args.lengths, "n": args.n,
                     "trained_at": args.trained_at, "splits": {k: list(v) for k, v in splits.items()}, "mean": {},
                     "lkv_minus": {}}
    for split, tasks in splits.items():
        for length in args.lengths:
            key = f"{split}@{length}"
            summary["mean"][key] = {name: round(sum(mean_se(scores[(t, length, name)])[0] for t in tasks) / len(tasks), 4)
                                    for name in ms}
            cat = {name: [x for t in tasks for x in scores[(t, length, name)]] for name in ms}
            summary["lkv_minus"][key] = {other: dict(zip(("diff", "se"), (round(v, 4) for v in paired(cat["lkv"], cat[other]))))
                                         for other in ("snapkv", "adakv", "lkv allocation=uniform", "lkv scorer=uniform")}
    with open(out / f"{args.tag}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    md = markdown(rows, summary, ms, args)
    (out / f"{args.tag}.md").write_text(md)
    (out / f"{args.tag}.json").write_text(json.dumps(summary, indent=1))
    print(md)
    return summary


def markdown(rows: list[dict], summary: dict, ms: dict, args: argparse.Namespace) -> str:
    names = list(ms)
    lines = [f"## LKV length generalization ({args.tag})", "",
             "`" + " ".join(["python -m scripts.experiments.lkv_length_generalization", *args.argv]) + "`", "",
             f"Model {args.model}, ratio {args.ratio} (retention {1 - args.ratio:.2f}), LKV trained at "
             f"{args.trained_at} tokens; {args.n} samples per cell; protocol {args.protocol}"
             + (f"; lengths beyond the window with {args.rope_beyond_window} RoPE scaling (model.rope)"
                if getattr(args, "rope_beyond_window", None) else "") + ". "
             "Accuracy [95% CI]; `achieved` = KV bytes removed at the end of the context (LKV).", "",
             "| split | task | length | " + " | ".join(names) + " | lkv achieved |",
             "|---|---|---|" + "---|" * len(names) + "---|"]
    by = {(r["task"], r["context_length"], r["method"]): r for r in rows}
    for split, tasks in summary["splits"].items():
        for task in tasks:
            for length in args.lengths:
                cells = [f"{by[(task, length, n)]['accuracy']:.2f} [{by[(task, length, n)]['ci_low']:.2f}, "
                         f"{by[(task, length, n)]['ci_high']:.2f}]" for n in names]
                ach = by[(task, length, "lkv")]["ratio_achieved"]
                lines.append(f"| {split} | {task} | {length} | " + " | ".join(cells) +
                             f" | {'-' if ach is None else f'{ach:.3f}'} |")
    lines += ["", "Mean over the split's tasks, and LKV's paired difference (± SE) to each other method:", "",
              "| split@length | " + " | ".join(names) + " | lkv - snapkv | lkv - adakv | lkv - (allocation=uniform) | "
              "lkv - (scorer=uniform) |", "|---|" + "---|" * (len(names) + 4)]
    for key, means in summary["mean"].items():
        d = summary["lkv_minus"][key]
        lines.append(f"| {key} | " + " | ".join(f"{means[n]:.3f}" for n in names) + " | " +
                     " | ".join(f"{d[o]['diff']:+.3f} ± {d[o]['se']:.3f}"
                                for o in ("snapkv", "adakv", "lkv allocation=uniform", "lkv scorer=uniform")) + " |")
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--ratio", type=float, default=0.85)
    ap.add_argument("--lengths", default="2048,4096,8192")
    ap.add_argument("--trained-at", type=int, default=2048, help="the training context length (reported)")
    ap.add_argument("--seen", default=",".join(SEEN), help="tasks LKV was trained on")
    ap.add_argument("--held-out", default=",".join(HELD_OUT), help="tasks LKV never saw")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--n-sink", type=int, default=4)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--protocol", default="query_agnostic", choices=("query_agnostic", "query_aware"))
    ap.add_argument("--prefill-chunk", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--rope-beyond-window", default=None, metavar="ROPE_TYPE",
                    help="lengths beyond the model's window run with RoPE scaling of this type (e.g. linear), the "
                         "factor the smallest power of two that fits (model.rope; the full-cache column says whether "
                         "the model still retrieves there)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=str(REPO / "results" / "lkv"))
    ap.add_argument("--tag", default=None)
    ap.add_argument("--smoke", action="store_true", help="1 seen + 1 held-out task, 2 lengths of 256/512, n=2")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.smoke:
        args.lengths, args.n, args.seen, args.held_out = "256,512", 2, "niah_single", "niah_multikey"
        args.max_new_tokens, args.prefill_chunk = 12, 128
        args.tag = args.tag or "smoke"
    args.lengths = [int(x) for x in str(args.lengths).split(",") if x]
    args.seen = [t for t in args.seen.split(",") if t]
    args.held_out = [t for t in args.held_out.split(",") if t]
    args.context_length = args.lengths[0]
    if args.tag is None:
        args.tag = f"{args.model}_r{args.ratio:g}_n{args.n}"
    return args


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse(argv)
    summary = run(args)
    print(json.dumps(summary, default=str), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
