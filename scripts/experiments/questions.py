"""Analyses of the article's open questions (issue 23): each turns an experiment's rows into a table and a
one-sentence answer with its evidence. Run by ``python -m scripts.experiment <name>`` after the cells;
the functions take rows (dicts) and return an :class:`Answer`, so tests can feed them hand-made rows.

- ``monotone`` (question 4): per model, length, task and method, accuracy over the ratio grid; a curve is
  non-monotone where a higher ratio beats a lower one beyond noise (harness.stats.monotone_violations:
  paired McNemar tests on the same prompts, Holm-adjusted over the curve's pairs).
- ``equal_bytes`` (question 3): pairs of quantizers whose achieved ratios (overheads counted) are within
  ``tolerance`` (0.01) on the same cell; accuracy retention (over full's) and the paired difference with
  its interval and p-value.
- ``composition`` (question 5): each ``compose`` row against its selector alone and its quantizer alone at
  the nearest achieved bytes (within ``tolerance``), paired differences; does the composition beat both?
- ``lkv_generalization`` (question 1) and ``overhead`` (question 2) read what their experiments' scripts wrote
  (the LKV study's summary JSON; the bench's rows) instead of run rows.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.stats import monotone_violations, paired_test, two_proportion_test, wilson


@dataclass
class Answer:
    question: str
    answer: str  # one sentence
    table: str  # markdown
    evidence: dict[str, Any] = field(default_factory=dict)

    def markdown(self) -> str:
        return f"## {self.question}\n\n**Answer.** {self.answer}\n\n{self.table}\n"


def _ok(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("status") == "ok" and r.get("accuracy") is not None]


def variant(row: dict) -> str:
    """The method with the knobs that tell compose rows apart."""
    if row.get("method") != "compose":
        return str(row.get("method"))
    p = json.loads(row.get("method_params") or "{}")
    return f"compose[{p.get('selector')}+{p.get('quantizer')}]"


def scores(row: dict, results: Path | None) -> list[float] | None:
    """Per-sample scores of a row in prompt order (None when the samples file is not there)."""
    if results is None:
        return row.get("_scores")
    p = Path(results) / "samples" / f"{row['run_id']}.jsonl.gz"
    if not p.is_file():
        return None
    from harness.results import read_samples

    recs = sorted(read_samples(p), key=lambda s: str(s.get("prompt_id")))
    try:
        return [float(s["score"]) for s in recs]
    except (KeyError, TypeError, ValueError):
        return None


def compare(a: dict, b: dict, results: Path | None):
    """a's accuracy minus b's: paired when both have per-sample scores over the same prompts."""
    sa, sb = scores(a, results), scores(b, results)
    if sa is not None and sb is not None and len(sa) == len(sb):
        return paired_test(sa, sb)
    return two_proportion_test(float(a["accuracy"]), int(a.get("n_samples") or 0), float(b["accuracy"]),
                               int(b.get("n_samples") or 0))


def _fmt_acc(r: dict) -> str:
    lo, hi = wilson(float(r["accuracy"]), int(r.get("n_samples") or 0))
    return f"{float(r['accuracy']):.2f} [{lo:.2f}, {hi:.2f}]"


def _cells(rows: list[dict]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = defaultdict(list)
    for r in _ok(rows):
        out[(r["model"], int(r["context_length"]), r["task"])].append(r)
    return out


# ------------------------------------------------------------------------------------------- question 4


def monotone(rows: list[dict], *, results: Path | None = None, alpha: float = 0.05, **_: Any) -> Answer:
    curves: dict[tuple, list[dict]] = defaultdict(list)
    for r in _ok(rows):
        if r.get("family") == "eviction":
            curves[(r["model"], int(r["context_length"]), r["task"], variant(r))].append(r)
    lines = ["| model | context | task | method | ratios | accuracy from lowest to highest ratio | rises beyond noise |",
             "|---|---:|---|---|---:|---|---|"]
    bad: list[tuple] = []
    tasks_bad: dict[tuple, set] = defaultdict(set)
    tasks_all: set = set()
    for (model, L, task, meth), rs in sorted(curves.items()):
        rs = sorted(rs, key=lambda r: float(r["ratio"]))
        tasks_all.add((model, L, task))
        paired = {float(r["ratio"]): s for r in rs if (s := scores(r, results)) is not None}
        v = monotone_violations([(float(r["ratio"]), float(r["accuracy"]), int(r.get("n_samples") or 0)) for r in rs],
                                alpha=alpha, paired=paired or None)
        if v:
            bad.append((model, L, task, meth, v))
            tasks_bad[(model, L, task)].add(meth)
        accs = " ".join(f"{float(r['accuracy']):.2f}" for r in rs)
        rises = "; ".join(f"{x.lo:g}->{x.hi:g} +{x.diff:.2f} (p={x.p:.3g})" for x in v) or "-"
        lines.append(f"| {model} | {L} | {task} | {meth} | {len(rs)} | {accs} | {rises} |")
    n = len(curves)
    at = sorted({x.hi for *_, v in bad for x in v})
    answer = (f"{len(bad)} of {n} task x eviction-method accuracy curves rise with compression beyond noise "
              f"(paired tests, Holm-adjusted p < {alpha})"
              + (f", at ratios {', '.join(f'{r:g}' for r in at)}" if at else "")
              + f"; {len(tasks_bad)} of {len(tasks_all)} tasks would need per-task budgets." if n else
              "No eviction rows yet: run the experiment's cells first.")
    return Answer("Is accuracy monotone in the compression ratio?", answer, "\n".join(lines),
                  {"curves": n, "non_monotone": len(bad), "tasks": len(tasks_all), "tasks_non_monotone": len(tasks_bad)})


# ------------------------------------------------------------------------------------------- question 3


def _full_acc(rs: list[dict]) -> float | None:
    f = [r for r in rs if r.get("method") == "full"]
    return float(f[-1]["accuracy"]) if f else None


def equal_bytes(rows: list[dict], *, results: Path | None = None, tolerance: float = 0.01,
                papers: tuple[str, ...] = ("ratequant", "turboquant_kv", "turboquant_kqv", "turboquant_qkqv"),
                **_: Any) -> Answer:
    lines = ["| model | context | task | paper method | achieved | baseline | achieved | retention (paper / baseline) "
             "| difference [95% CI] | p |", "|---|---:|---|---|---:|---|---:|---|---|---:|"]
    wins = ties = losses = 0
    for (model, L, task), rs in sorted(_cells(rows).items()):
        full = _full_acc(rs)
        quant = [r for r in rs if r.get("family") == "quantization" and r.get("ratio_achieved") is not None]
        for a in (r for r in quant if r["method"] in papers):
            for b in (r for r in quant if r["method"] not in papers):
                if abs(float(a["ratio_achieved"]) - float(b["ratio_achieved"])) > tolerance:
                    continue
                c = compare(a, b, results)
                sig = c.p < 0.05
                wins += sig and c.diff > 0
                losses += sig and c.diff < 0
                ties += not sig
                ret = (f"{float(a['accuracy']) / full:.2f} / {float(b['accuracy']) / full:.2f}" if full else "-")
                lines.append(f"| {model} | {L} | {task} | {variant(a)}@{float(a['ratio']):g} | "
                             f"{float(a['ratio_achieved']):.3f} | {variant(b)}@{float(b['ratio']):g} | "
                             f"{float(b['ratio_achieved']):.3f} | {ret} | {c.diff:+.3f} [{c.lo:+.3f}, {c.hi:+.3f}] | "
                             f"{c.p:.3g} |")
    n = wins + ties + losses
    answer = (f"At equal achieved bytes (within {tolerance}), the papers' quantizers beat a production baseline "
              f"significantly in {wins} of {n} paired comparisons, lose in {losses} and tie in {ties}." if n else
              f"No pair of quantizer rows within {tolerance} of each other's achieved ratio yet.")
    return Answer("Against what production ships: do the papers' quantizers beat INT8/INT4/FP8/KIVI at equal bytes?",
                  answer, "\n".join(lines), {"comparisons": n, "wins": wins, "losses": losses, "ties": ties})


# ------------------------------------------------------------------------------------------- question 5


def composition(rows: list[dict], *, results: Path | None = None, tolerance: float = 0.02, **_: Any) -> Answer:
    lines = ["| model | context | task | composition | achieved | accuracy | vs selector alone | vs quantizer alone |",
             "|---|---:|---|---|---:|---|---|---|"]
    beats_both = n = 0
    tasks_win: set = set()
    for (model, L, task), rs in sorted(_cells(rows).items()):
        for c in (r for r in rs if r.get("method") == "compose" and r.get("ratio_achieved") is not None):
            p = json.loads(c.get("method_params") or "{}")
            out = []
            won = 0
            for part in (p.get("selector"), p.get("quantizer")):
                alone = [r for r in rs if r.get("method") == part and r.get("ratio_achieved") is not None]
                alone = [r for r in alone if abs(float(r["ratio_achieved"]) - float(c["ratio_achieved"])) <= tolerance]
                if not alone:
                    out.append("no row at these bytes")
                    continue
                best = max(alone, key=lambda r: float(r["accuracy"]))
                d = compare(c, best, results)
                won += d.p < 0.05 and d.diff > 0
                out.append(f"{variant(best)}@{float(best['ratio']):g} {float(best['accuracy']):.2f}: "
                           f"{d.diff:+.3f} [{d.lo:+.3f}, {d.hi:+.3f}] p={d.p:.3g}")
            n += 1
            if won == 2:
                beats_both += 1
                tasks_win.add(task)
            lines.append(f"| {model} | {L} | {task} | {variant(c)}@{float(c['ratio']):g} | "
                         f"{float(c['ratio_achieved']):.3f} | {_fmt_acc(c)} | {out[0]} | {out[1]} |")
    answer = (f"At equal achieved bytes, eviction x quantization beats both of its parts alone (p < 0.05) in "
              f"{beats_both} of {n} cells" + (f", on {', '.join(sorted(tasks_win))}" if tasks_win else "") + "."
              if n else "No compose rows yet: run the experiment's cells first.")
    return Answer("Composition: does eviction x quantization beat either alone at equal bytes?", answer,
                  "\n".join(lines), {"cells": n, "beats_both": beats_both})


# ------------------------------------------------------------------------------------------- question 1


def lkv_generalization(rows: list[dict], *, results: Path | None = None, **_: Any) -> Answer:
    """From scripts/experiments/lkv_length_generalization.py's summary (``<results>/*.json``): accuracy per task split
    (seen / held-out) and length, and LKV's paired difference to SnapKV and AdaKV with its standard error."""
    files = sorted(Path(results).glob("*.json")) if results else []
    if not files:
        return Answer("Generalization of learned eviction", "No results yet: run the experiment first.", "", {})
    data = json.loads(files[-1].read_text())
    mean, minus = data.get("mean", {}), data.get("lkv_minus", {})
    methods = sorted({m for v in mean.values() for m in v}, key=lambda m: (m != "full", m != "lkv", m))
    lines = ["| split @ length | x training length | " + " | ".join(methods) + " | LKV - SnapKV | LKV - AdaKV |",
             "|---|---:|" + "---:|" * len(methods) + "---|---|"]
    worst: dict[str, float] = {}
    for key in mean:
        split, length = key.split("@")
        rel = int(length) / float(data.get("trained_at") or 1)
        d = minus.get(key, {})
        cells = " | ".join(f"{mean[key].get(m, float('nan')):.3f}" for m in methods)
        diffs = [f"{d[b]['diff']:+.3f} ± {d[b]['se']:.3f}" if b in d else "-" for b in ("snapkv", "adakv")]
        lines.append(f"| {key} | {rel:g} | {cells} | {diffs[0]} | {diffs[1]} |")
        for b in ("snapkv", "adakv"):
            if b in d:
                worst[split] = min(worst.get(split, float("inf")), d[b]["diff"] - 1.96 * d[b]["se"])
    lengths = sorted({int(k.split("@")[1]) for k in mean})
    holds = {split: lo >= 0 for split, lo in worst.items()}
    answer = (f"{data.get('model')} at ratio {data.get('ratio')}, LKV trained at {data.get('trained_at')} tokens and "
              f"evaluated at {', '.join(map(str, lengths))} (n={data.get('n')}): "
              + "; ".join(f"on {split} tasks it {'never falls' if ok else 'falls'} below SnapKV and AdaKV beyond noise"
                          for split, ok in sorted(holds.items())) + ".")
    return Answer("Generalization of learned eviction: does LKV hold at longer contexts and on held-out tasks?",
                  answer, "\n".join(lines), {"holds": holds, "lengths": lengths})


# ------------------------------------------------------------------------------------------- question 2

CATEGORIES = ("attention", "kv write / copy", "gemm", "norm", "elementwise / reduce", "other")


def overhead(rows: list[dict], *, results: Path | None = None, **_: Any) -> Answer:
    """From scripts/bench's rows (``<results>/rows/*.jsonl``): per cell and method, decode ms and x full; the
    profiled step's time by kernel category and each category's difference to full's (what the method's machinery
    adds: quantize/append shows under kv write / copy, reading a layout under attention); calibration as a share
    of the prefill."""
    bench = []
    for p in sorted(Path(results).glob("rows/*.jsonl")) if results else []:
        bench += [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    cells = {(r["batch"], r["context"], r.get("label", "full")): r for r in bench
             if r.get("kind") == "cell" and r.get("status") == "ok" and r.get("engine") == "kvbench"}
    profs = {(r["batch"], r["context"], r.get("label", "full")): r for r in bench if r.get("kind") == "profile"}
    if not cells:
        return Answer("Overhead by component", "No bench rows yet: run the experiment first.", "", {})
    head = ["cell", "method", "kernel", "decode ms", "x full"] + [f"{c} ms (vs full)" for c in CATEGORIES] + [
        "calibrate ms (% of prefill)"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---|" + "---:|" * (len(head) - 3)]
    slowest = (0.0, "")
    for (B, S, label), c in sorted(cells.items()):
        full = cells.get((B, S, "full"))
        x = c["decode_ms_p50"] / full["decode_ms_p50"] if full else float("nan")
        prof, fprof = profs.get((B, S, label)), profs.get((B, S, "full"))
        cats = []
        for cat in CATEGORIES:
            if prof is None:
                cats.append("-")
                continue
            ms = prof["categories"].get(cat, 0.0)
            ref = (fprof or {}).get("categories", {}).get(cat)
            cats.append(f"{ms:.2f}" + (f" ({ms - ref:+.2f})" if ref is not None and label != "full" else ""))
        cal = c.get("calibrate_ms")
        prefill_ms = B * S / c["prefill_tok_s"] * 1e3 if c.get("prefill_tok_s") else None
        cal_txt = "-" if cal is None else f"{cal:.0f}" + (f" ({100 * cal / prefill_ms:.0f} %)" if prefill_ms else "")
        lines.append(f"| {B} x {S} | {label} | {c.get('kernel')} | {c['decode_ms_p50']:.2f} | {x:.2f} | "
                     + " | ".join(cats) + f" | {cal_txt} |")
        if label != "full" and x == x and x > slowest[0]:
            slowest = (x, f"{label} at {B} x {S}")
    device = next((r.get("device") or r.get("gpu") for r in bench if r.get("kind") == "command"), None)
    answer = (f"Over {len(cells)} cells{f' on {device}' if device else ''}, the costliest machinery is "
              f"{slowest[1]} at {slowest[0]:.2f}x full's decode step; the table splits each step by kernel category."
              if slowest[1] else "Only full was measured: no method overhead to report.")
    return Answer("Overhead by component: what each method's machinery costs per decode step and per prefill",
                  answer, "\n".join(lines), {"cells": len(cells)})


ANALYSES = {"monotone": monotone, "equal_bytes": equal_bytes, "composition": composition,
            "lkv_generalization": lkv_generalization, "overhead": overhead}


def main(argv: list[str] | None = None) -> int:
    """Any analysis over any rows directory, e.g. question 4 over the leaderboard's rows:
    ``python -m scripts.experiments.questions monotone --results results/leaderboard``."""
    import argparse

    from harness.grid import read_rows

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("analysis", choices=sorted(ANALYSES))
    ap.add_argument("--results", type=Path, required=True, help="a directory with runs/ (and samples/)")
    ap.add_argument("--tolerance", type=float, default=None, help="achieved-ratio tolerance of the pairings")
    args = ap.parse_args(argv)
    kw = {} if args.tolerance is None else {"tolerance": args.tolerance}
    print(ANALYSES[args.analysis](list(read_rows(args.results).values()), results=args.results, **kw).markdown())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
