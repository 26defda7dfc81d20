"""Rows -> tables: ``results/summary.csv``, ``results/summary.parquet`` and ``results/summary.md``.

    python scripts/aggregate.py [--results results] [--quiet]

One row per run_id (rows are files named by run_id; history/ is ignored). The markdown has one
table per (model, weights revision, task, context length), methods and ratios sorted, accuracy with its
standard error, achieved ratio (bytes stored) and read ratio (bytes read per decode step) beside the
target; skipped and failed runs are listed with their reasons.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd


def load_rows(results: Path) -> pd.DataFrame:
    rows = []
    for p in sorted((results / "runs").glob("*.json")):
        try:
            rows.append(json.loads(p.read_text()))
        except (OSError, json.JSONDecodeError) as e:
            print(f"warning: skipping unreadable row {p}: {e}", file=sys.stderr)
    if not rows:
        return pd.DataFrame()
    df = pd.DataFrame(rows).drop_duplicates("run_id", keep="last")
    return df.sort_values(["model", "task", "context_length", "method", "ratio"], na_position="last").reset_index(drop=True)


def _mb(x) -> str:
    return "" if pd.isna(x) else f"{x / 2**20:.2f}"


def _num(x, fmt: str) -> str:
    return "" if x is None or pd.isna(x) else format(x, fmt)


def markdown(df: pd.DataFrame) -> str:
    if df.empty:
        return "_no rows yet: run `make run` or `python -m harness.run`_\n"
    out = []
    ok = df[df["status"] == "ok"].copy()
    # rows of different weights under one model name (a retrained checkpoint) never share a table
    ok["_rev"] = ok["model_revision"].fillna("") if "model_revision" in ok else ""
    for (model, rev, task, ctx), g in ok.groupby(["model", "_rev", "task", "context_length"], sort=True):
        weights = ", ".join(sorted(set(map(str, g["weights"].dropna()))))
        out.append(f"### {model}{' @ ' + rev if rev else ''} · {task} · {ctx} tokens  (weights: {weights})\n")
        out.append("| method | ratio | achieved | read achieved | accuracy ± se | n | KV MB | peak decode MB | prefill tok/s "
                   "| decode tok/s | decode ms p50 | kernel |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for _, r in g.sort_values(["method", "ratio"]).iterrows():
            acc = _num(r.get("accuracy"), ".3f")
            se = _num(r.get("accuracy_stderr"), ".3f")
            out.append(
                f"| {r['method']} | {r['ratio']:.4g} | {_num(r.get('ratio_achieved'), '.3f')} | "
                f"{_num(r.get('read_ratio_achieved'), '.3f')} | "
                f"{acc}{' ± ' + se if se else ''} | {_num(r.get('n_samples'), '.0f')} | {_mb(r.get('kv_bytes_stored'))} | "
                f"{_mb(r.get('peak_mem_decode_bytes'))} | {_num(r.get('prefill_tok_s'), '.0f')} | "
                f"{_num(r.get('decode_tok_s'), '.1f')} | {_num(r.get('decode_ms_p50'), '.2f')} | {r.get('kernel') or ''} |"
            )
        out.append("")
    bad = df[df["status"] != "ok"]
    if not bad.empty:
        out.append("### skipped and failed runs\n")
        out.append("| status | model | task | method | ratio | reason |")
        out.append("|---|---|---|---|---:|---|")
        for _, r in bad.iterrows():
            reason = str(r.get("reason") or "").replace("|", "/").replace("\n", " ")[:200]
            out.append(f"| {r['status']} | {r['model']} | {r['task']} | {r['method']} | {r['ratio']:.4g} | {reason} |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default="results")
    ap.add_argument("--quiet", action="store_true", help="write the files, print nothing")
    args = ap.parse_args(argv)
    results = Path(args.results)
    df = load_rows(results)
    results.mkdir(parents=True, exist_ok=True)
    md = markdown(df)
    if not df.empty:
        flat = df.drop(columns=[c for c in ("config",) if c in df.columns])
        flat.to_csv(results / "summary.csv", index=False)
        try:
            flat.astype({c: "string" for c in flat.columns if flat[c].dtype == object}).to_parquet(
                results / "summary.parquet", index=False)
        except ImportError as e:
            print(f"warning: no parquet writer ({e}); wrote CSV and markdown only", file=sys.stderr)
    (results / "summary.md").write_text(md)
    if not args.quiet:
        print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
