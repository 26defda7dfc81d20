"""Rows -> tables: ``results/summary.csv``, ``results/summary.parquet`` and ``results/summary.md``.

    .venv/bin/python -m scripts.aggregate [--results results] [--all] [--quiet]

One row per run_id (rows are files named by run_id; history/ is ignored). A file under runs/ that is not
a row (not UTF-8, not JSON, not an object, no run_id) is skipped with one warning naming it; rerunning its
job replaces it (the bad file moves to runs/history/).

The markdown has one table per (model, weights revision, task, context length), methods and ratios sorted:
accuracy with its standard error, n and seed, achieved ratio (bytes stored) and read ratio (bytes read
per decode step) beside the target, and the kernel the decode step ran. Rows of one cell that differ only
in ``limit`` or ``seed`` are not shown side by side: the row with the most samples (then the latest) is
kept and the others are listed as superseded (``--all`` shows every row; the CSV always holds all).
Footnotes per method family say when a speed figure comes from a reference path and why a sparse read
ratio falls below its target. Skipped and failed runs are listed with their reasons.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from harness.results import BadRow, load_row  # noqa: E402

# What makes two ok rows the same cell of a table: everything in a run's identity but limit and seed.
CELL = ["model", "_rev", "task", "context_length", "method", "ratio", "method_params", "protocol", "prefill_chunk",
        "batch_size", "weights"]

# Why a speed figure of a row with kernel=reference measures our reference code, per family.
REFERENCE_NOTES = {
    "none": "`full` runs fused kernels and a CUDA-graph decode step on CUDA (kernel `fused`); elsewhere "
            "(every CPU row) the plain-torch reference path.",
    "quantization": "this row decoded its codes back to the compute dtype on every step in plain torch: every CPU "
                    "row does; on CUDA the scalar codecs (fp8, uniform_int, quarot, ratequant over them), KIVI and "
                    "TurboQuant read their codes in fused kernels, and a row takes this path only where its layout "
                    "has none (the row's reason says why).",
    "eviction": "attention over the ragged store of kept tokens ran in plain torch (gather per kv head): every CPU "
                "row does; on CUDA the ragged decode kernel serves every eviction method.",
    "sparse": "the index gate and the gathered reads ran in plain torch, step by step (every CPU row, and "
              "Louver's balls index, which has no kernel), so a sparse read is slower here than the dense read it "
              "avoids.",
    "composed": "the composed store decoded through its quantizer's reference path (every CPU row; on CUDA its "
                "quantizer's fused kernel where one exists).",
}
SPARSE_READ_NOTE = (
    "read achieved below the target (1 - read/full, index included): every decode step also reads the index "
    "(Louver: each parent's centre and radius and every key's parent ids; Quest: each page's key min/max), the "
    "dense buffer of question and generated tokens, and each key that any query head of a kv head selects; "
    "Quest also keeps its first `dense_layers` layers dense. Over a short context these fixed reads are a "
    "large share of the cache.")


def load_rows(results: Path) -> pd.DataFrame:
    rows = []
    for p in sorted((results / "runs").glob("*.json")):
        try:
            rows.append(load_row(p))
        except BadRow as e:
            print(f"warning: skipped {p}: not a kvbench row ({e}); if it is a run's row file, rerunning "
                  "that run replaces it (the bad file moves to runs/history/)", file=sys.stderr)
    if not rows:
        return pd.DataFrame()
    df = pd.DataFrame(rows).drop_duplicates("run_id", keep="last")
    for col in ("model", "task", "context_length", "method", "ratio", "status"):
        if col not in df:
            df[col] = None
    return df.sort_values(["model", "task", "context_length", "method", "ratio"], na_position="last").reset_index(drop=True)


def _mb(x) -> str:
    return "" if x is None or pd.isna(x) else f"{x / 2**20:.2f}"


def _num(x, fmt: str) -> str:
    try:
        return "" if x is None or pd.isna(x) else format(x, fmt)
    except (TypeError, ValueError):
        return str(x)


def _text(x) -> str:
    return "" if x is None or (not isinstance(x, str) and pd.isna(x)) else str(x)


def supersede(ok: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(kept, superseded): per cell the row with the most samples, then the latest finished."""
    if ok.empty:
        return ok, ok
    g = ok.copy()
    for c in CELL:
        if c not in g:
            g[c] = None
    key = g[CELL].astype(str).agg("\x1f".join, axis=1)
    order = g.assign(_key=key, _n=pd.to_numeric(g.get("n_samples"), errors="coerce").fillna(-1),
                     _t=g.get("finished_at", pd.Series([""] * len(g), index=g.index)).astype(str))
    order = order.sort_values(["_key", "_n", "_t"], ascending=[True, False, False])
    first = ~order["_key"].duplicated()
    kept = order[first].drop(columns=["_key", "_n", "_t"])
    sup = order[~first].drop(columns=["_key", "_n", "_t"])
    return ok.loc[kept.index], ok.loc[sup.index]


def markdown(df: pd.DataFrame, *, show_all: bool = False) -> str:
    if df.empty:
        return "_no rows yet: run `make run` or `.venv/bin/python -m harness.run`_\n"
    out = []
    ok = df[df["status"] == "ok"].copy()
    # rows of different weights under one model name (a retrained checkpoint) never share a table
    ok["_rev"] = ok["model_revision"].fillna("") if "model_revision" in ok else ""
    shown, superseded = (ok, ok.iloc[0:0]) if show_all else supersede(ok)
    notes: dict[str, str] = {}  # footnote mark -> text, listed once after the tables
    for (model, rev, task, ctx), g in shown.groupby(["model", "_rev", "task", "context_length"], sort=True):
        weights = ", ".join(sorted(set(map(str, g["weights"].dropna())))) if "weights" in g else ""
        out.append(f"### {model}{' @ ' + rev if rev else ''} · {task} · {ctx} tokens  (weights: {weights})\n")
        out.append("| method | ratio | achieved | read achieved | accuracy ± se | n | seed | KV MB | peak decode MB "
                   "| prefill tok/s | decode tok/s | decode ms p50 | kernel |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for _, r in g.sort_values(["method", "ratio"]).iterrows():
            acc = _num(r.get("accuracy"), ".3f")
            se = _num(r.get("accuracy_stderr"), ".3f")
            kernel = _text(r.get("kernel"))
            family = _text(r.get("family")) or "none"
            has_speed = not pd.isna(r.get("decode_ms_p50")) if "decode_ms_p50" in r else False
            if kernel == "reference" and has_speed:
                mark = f"ref-{family}"
                tail = "" if family == "none" else " Its speed columns measure that code, not the method."
                notes.setdefault(mark, f"`reference` ({family}): " + REFERENCE_NOTES.get(family, "plain-torch path.")
                                 + tail)
                kernel = f"reference [{mark}]"
            read = _num(r.get("read_ratio_achieved"), ".3f")
            target = r.get("ratio")
            if (family == "sparse" and read and isinstance(target, (int, float))
                    and float(r["read_ratio_achieved"]) < float(target) - 0.02):
                notes.setdefault("read", SPARSE_READ_NOTE)
                read += " [read]"
            out.append(
                f"| {r['method']} | {_num(target, '.4g')} | {_num(r.get('ratio_achieved'), '.3f')} | {read} | "
                f"{acc}{' ± ' + se if se else ''} | {_num(r.get('n_samples'), '.0f')} | {_num(r.get('seed'), '.0f')} | "
                f"{_mb(r.get('kv_bytes_stored'))} | {_mb(r.get('peak_mem_decode_bytes'))} | "
                f"{_num(r.get('prefill_tok_s'), '.0f')} | {_num(r.get('decode_tok_s'), '.1f')} | "
                f"{_num(r.get('decode_ms_p50'), '.2f')} | {kernel} |"
            )
        out.append("")
    if notes:
        out.append("Notes (the marks in the tables; compare speeds only between rows of the same kernel):\n")
        out += [f"- [{mark}] {text}" for mark, text in sorted(notes.items())]
        out.append("")
    if not superseded.empty:
        out.append("### superseded rows\n")
        out.append("Same cell as a row shown above (they differ only in `limit` or `seed`), with fewer samples or "
                   "older; kept in summary.csv, shown with `--all`.\n")
        out.append("| model | task | tokens | method | ratio | accuracy | n | seed | run_id |")
        out.append("|---|---|---:|---|---:|---:|---:|---:|---|")
        for _, r in superseded.sort_values(["model", "task", "context_length", "method", "ratio"]).iterrows():
            out.append(f"| {r['model']} | {r['task']} | {_num(r.get('context_length'), '.0f')} | {r['method']} | "
                       f"{_num(r.get('ratio'), '.4g')} | {_num(r.get('accuracy'), '.3f')} | "
                       f"{_num(r.get('n_samples'), '.0f')} | {_num(r.get('seed'), '.0f')} | {r['run_id']} |")
        out.append("")
    bad = df[df["status"] != "ok"]
    if not bad.empty:
        out.append("### skipped and failed runs\n")
        out.append("| status | model | task | method | ratio | reason |")
        out.append("|---|---|---|---|---:|---|")
        for _, r in bad.iterrows():
            reason = _text(r.get("reason")).replace("|", "/").replace("\n", " ")[:200]
            out.append(f"| {r['status']} | {_text(r['model'])} | {_text(r['task'])} | {_text(r['method'])} | "
                       f"{_num(r['ratio'], '.4g')} | {reason} |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default="results")
    ap.add_argument("--all", action="store_true", help="show every row, also those superseded by a larger-n run")
    ap.add_argument("--quiet", action="store_true", help="write the files, print nothing")
    args = ap.parse_args(argv)
    results = Path(args.results)
    df = load_rows(results)
    results.mkdir(parents=True, exist_ok=True)
    md = markdown(df, show_all=args.all)
    written = [results / "summary.md"]
    if not df.empty:
        flat = df.drop(columns=[c for c in ("config",) if c in df.columns])
        flat.to_csv(results / "summary.csv", index=False)
        written.append(results / "summary.csv")
        try:
            flat.astype({c: "string" for c in flat.columns if flat[c].dtype == object}).to_parquet(
                results / "summary.parquet", index=False)
            written.append(results / "summary.parquet")
        except ImportError as e:
            print(f"warning: no parquet writer ({e}); wrote CSV and markdown only", file=sys.stderr)
    (results / "summary.md").write_text(md, encoding="utf-8")
    if not args.quiet:
        print(md)
        print(f"[table] {len(df)} row{'' if len(df) == 1 else 's'} from {results / 'runs'}/<run_id>.json (per-sample predictions in "
              f"{results / 'samples'}/) -> {', '.join(str(p) for p in written)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
