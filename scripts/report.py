"""``make report``: one self-contained offline page, ``results/report/index.html``, from the committed rows.

    python -m scripts.report                       # results/leaderboard/ + results/bench/ -> results/report/index.html
    python -m scripts.report --check               # + headless Chromium screenshots in results/report/screenshots/

Inputs: the leaderboard's rows (``results/leaderboard/runs/*.json``, one ``harness.run`` row per cell), its
grid (``conf/experiment/leaderboard.yaml``: which cells exist, the gate), per-sample predictions where the
runner kept them (``<results>/samples/<run_id>.jsonl.gz``: the table links a cell to its file), and the
decode-engine benchmark rows (``results/bench/rows/*.jsonl``).

The page: how every number was measured (protocol, settings, commits, machines), a coverage table (every
method of conf/method x every model of the grid: cells ok / skipped / failed / to run), and per model and
context length: Pareto plots of accuracy (mean over the tasks the model can do, or one task: a menu) against
achieved compression (KV bytes stored), against bytes read per decode step and against decode tokens/s, the
frontier drawn and the full-cache reference on each; a per-family view (accuracy against target ratio, one
line per method); the best method per family at each ratio; and one table per task (accuracy with its 95 %
interval, achieved and read bytes, peak memory, decode speed, the kernel that ran). Plotly's JavaScript is
inlined once (~4.8 MB), so the page needs no network.

Choices: the 95 % interval is Wilson's score interval for a proportion with n = the samples behind the number
(exact for 0/1 scores; for tasks with partial credit, such as niah_multivalue, an approximation); a mean over
tasks pools their samples. A cell that ran its decode steps through a plain-torch reference store (every
method except ``full`` on a GPU, and everything on a CPU) has its speed marked "reference": it measures our
reference code, not what the method would reach with a kernel of its own (DESIGN §7).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import html
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from harness.stats import wilson

REPO = Path(__file__).resolve().parent.parent

FAMILY_ORDER = ["none", "quantization", "eviction", "sparse", "composed"]
FAMILY_COLOR = {"none": "#111111", "quantization": "#1f77b4", "eviction": "#d62728", "sparse": "#2ca02c",
                "composed": "#9467bd"}
SYMBOLS = ["circle", "square", "diamond", "triangle-up", "triangle-down", "x", "cross", "star-triangle-up",
           "pentagon", "hexagon", "triangle-left", "triangle-right", "hourglass", "bowtie"]
MAX_BYTES = 10 * 2**20
TICKS = [0.25, 0.5, 1, 2, 3, 4, 6, 8, 12, 16, 32]


# ------------------------------------------------------------------------------------------- statistics


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (higher is better on both), by x."""
    idx = [i for i, (x, y) in enumerate(points) if not (math.isnan(x) or math.isnan(y))]
    front = []
    for i in idx:
        xi, yi = points[i]
        if not any((points[j][0] >= xi and points[j][1] >= yi) and (points[j][0] > xi or points[j][1] > yi) for j in idx):
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


# ------------------------------------------------------------------------------------------------ data


def load_rows(results: Path) -> list[dict]:
    from harness.grid import read_rows

    return list(read_rows(results).values())


def compression(ratio_achieved: Any) -> float:
    """Achieved compression factor full / stored (1 - ratio_achieved = stored / full)."""
    try:
        r = float(ratio_achieved)
    except (TypeError, ValueError):
        return float("nan")
    return float("nan") if math.isnan(r) or r >= 1 else 1.0 / (1.0 - r)


def _f(x: Any) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return float("nan")
    return v


def speed_path(row: dict) -> str:
    """How the decode speed of a row was produced: the fused path or our reference stores."""
    k = str(row.get("kernel") or "")
    dev = str(row.get("device") or "")
    if k == "fused":
        return "fused"
    return "reference (CPU)" if dev.startswith("cpu") else "reference"


class Cell:
    """One (model, length, method, ratio) point: per task rows, and the mean over a set of tasks."""

    def __init__(self, method: str, family: str, ratio: float):
        self.method, self.family, self.ratio = method, family, ratio
        self.rows: dict[str, dict] = {}

    def agg(self, tasks: list[str]) -> dict[str, Any] | None:
        rows = [self.rows[t] for t in tasks if t in self.rows and self.rows[t].get("status") == "ok"]
        if not rows or len(rows) < len(tasks):
            return None
        n = sum(int(r.get("n_samples") or 0) for r in rows)
        acc = sum(_f(r.get("accuracy")) * int(r.get("n_samples") or 0) for r in rows) / max(n, 1)
        lo, hi = wilson(acc, n)

        def mean(col: str) -> float:
            vals = [_f(r.get(col)) for r in rows]
            vals = [v for v in vals if not math.isnan(v)]
            return sum(vals) / len(vals) if vals else float("nan")

        full_b = mean("kv_bytes_full")
        read_b = mean("kv_bytes_read_per_step")
        return {"accuracy": acc, "lo": lo, "hi": hi, "n": n, "compression": compression(mean("ratio_achieved")),
                "ratio_achieved": mean("ratio_achieved"), "read_ratio_achieved": mean("read_ratio_achieved"),
                "read_compression": compression(mean("read_ratio_achieved")) if not math.isnan(mean("read_ratio_achieved"))
                else (full_b / read_b if read_b and not math.isnan(read_b) else float("nan")),
                "decode_tok_s": mean("decode_tok_s"), "speed_path": speed_path(rows[0]),
                "device": str(rows[0].get("device") or ""), "devices": {str(r.get("device") or "") for r in rows}}


def organise(rows: list[dict], grid: dict) -> dict[tuple[str, int], dict]:
    """(model, length) -> {"cells": {(method, ratio): Cell}, "tasks": [gated tasks], "gate": {task: acc},
    "skipped": [rows], "failed": [rows]} for rows run with the grid's settings."""
    from harness.grid import rows_by_cell

    threshold = float(grid["min_full_accuracy"])
    by_cell = rows_by_cell({r["run_id"]: r for r in rows}, dict(grid["settings"]))
    out: dict[tuple[str, int], dict] = {}
    for model, spec in grid["models"].items():
        for length in spec["context_lengths"]:
            out[(model, int(length))] = {"cells": {}, "tasks": [], "gate": {}, "skipped": [], "failed": [],
                                         "candidates": list(spec["tasks"])}
    for (model, length, task, method, ratio), r in by_cell.items():
        part = out.get((model, length))
        if part is None:
            continue
        if r.get("status") == "skipped":
            part["skipped"].append(r)
        elif r.get("status") == "failed":
            part["failed"].append(r)
        if method == "full" and r.get("status") == "ok":
            part["gate"][task] = _f(r.get("accuracy"))
        cell = part["cells"].setdefault((method, ratio), Cell(method, str(r.get("family") or "?"), ratio))
        if r.get("family"):
            cell.family = str(r["family"])
        cell.rows[task] = r
    for part in out.values():
        part["tasks"] = [t for t in part["candidates"] if part["gate"].get(t, -1) >= threshold]
        devices = defaultdict(int)  # the machine most cells ran on: the speed plot shows its cells only
        for c in part["cells"].values():
            for r in c.rows.values():
                if r.get("status") == "ok":
                    devices[str(r.get("device") or "")] += 1
        part["speed_device"] = max(devices, key=devices.get) if devices else ""
        part["other_devices"] = sum(v for k, v in devices.items() if k != part["speed_device"])
    return out


# ----------------------------------------------------------------------------------------------- plots


def _fmt(x: float, spec: str = ".3f") -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def pareto_figure(part: dict, *, x: str, title: str, xlabel: str, log_x: bool, views: list[str]) -> Any:
    """Accuracy against ``x`` for each view (mean over tasks, then each task), a menu to switch views."""
    import plotly.graph_objects as go

    fig = go.Figure()
    vis_by_view: list[list[int]] = []
    method_symbol: dict[str, str] = {}
    for view_i, view in enumerate(views):
        tasks = part["tasks"] if view == "mean over tasks" else [view]
        pts = []
        for (_method, _ratio), cell in sorted(part["cells"].items(), key=lambda kv: (FAMILY_ORDER.index(kv[1].family)
                                                                                 if kv[1].family in FAMILY_ORDER else 9, kv[0])):
            a = cell.agg(tasks)
            if a is None or math.isnan(a[x]) or a[x] <= 0:
                continue
            if x == "decode_tok_s" and a["devices"] != {part["speed_device"]}:
                continue  # speeds compare only within one machine
            pts.append((cell, a))
        idx0 = len(fig.data)
        for family in FAMILY_ORDER:
            fp = [(c, a) for c, a in pts if c.family == family]
            if not fp:
                continue
            for c, _ in fp:
                method_symbol.setdefault(c.method, SYMBOLS[len(method_symbol) % len(SYMBOLS)])
            fig.add_trace(go.Scatter(
                x=[a[x] for _, a in fp], y=[a["accuracy"] for _, a in fp], mode="markers",
                name=family if family != "none" else "full cache", legendgroup=family, showlegend=view_i == 0,
                visible=view_i == 0,
                marker=dict(color=FAMILY_COLOR.get(family, "#777"), size=14 if family == "none" else 9,
                            symbol=["star" if family == "none" else method_symbol[c.method] for c, _ in fp],
                            line=dict(width=0.5, color="white")),
                error_y=dict(type="data", symmetric=False, array=[a["hi"] - a["accuracy"] for _, a in fp],
                             arrayminus=[a["accuracy"] - a["lo"] for _, a in fp], thickness=1, width=0,
                             color=FAMILY_COLOR.get(family, "#777")),
                customdata=[[c.method, c.ratio, a["lo"], a["hi"], a["n"], a["ratio_achieved"], a["read_ratio_achieved"],
                             a["decode_tok_s"], a["speed_path"]] for c, a in fp],
                hovertemplate=("<b>%{customdata[0]}</b> ratio %{customdata[1]}<br>accuracy %{y:.3f} "
                               "[95%% CI %{customdata[2]:.3f}, %{customdata[3]:.3f}], n=%{customdata[4]}<br>"
                               "bytes stored: %{customdata[5]:.3f} removed; read per step: %{customdata[6]:.3f} removed<br>"
                               "decode %{customdata[7]:.1f} tok/s (%{customdata[8]})<extra>" + family + "</extra>"),
            ))
        front = pareto_front([(a[x], a["accuracy"]) for _, a in pts])
        if front:
            fig.add_trace(go.Scatter(
                x=[pts[i][1][x] for i in front], y=[pts[i][1]["accuracy"] for i in front], mode="lines",
                line=dict(shape="hv", dash="dash", color="#555", width=1.5), name="Pareto frontier",
                legendgroup="frontier", showlegend=view_i == 0, visible=view_i == 0,
                hovertemplate="frontier: %{text}<extra></extra>",
                text=[f"{pts[i][0].method} @ {pts[i][0].ratio:g}" for i in front]))
        full = part["cells"].get(("full", 0.0))
        fa = full.agg(tasks) if full else None
        if fa is not None:
            fig.add_trace(go.Scatter(
                x=[min(a[x] for _, a in pts) if pts else 1, max(a[x] for _, a in pts) if pts else 1],
                y=[fa["accuracy"], fa["accuracy"]], mode="lines", line=dict(dash="dot", color="#111", width=1),
                name="full-cache accuracy", legendgroup="fullref", showlegend=view_i == 0, visible=view_i == 0,
                hovertemplate=f"full cache: {fa['accuracy']:.3f} [{fa['lo']:.3f}, {fa['hi']:.3f}]<extra></extra>"))
            if x == "decode_tok_s" and not math.isnan(fa[x]):
                fig.add_trace(go.Scatter(
                    x=[fa[x], fa[x]], y=[0, 1.02], mode="lines", line=dict(dash="dot", color="#888", width=1),
                    name="full-cache decode speed", legendgroup="fullspeed", showlegend=view_i == 0, visible=view_i == 0,
                    hovertemplate=f"full cache: {fa[x]:.1f} tok/s<extra></extra>"))
        vis_by_view.append(list(range(idx0, len(fig.data))))
    n = len(fig.data)
    buttons = []
    for view, idxs in zip(views, vis_by_view):
        vis = [i in idxs for i in range(n)]
        buttons.append(dict(label=view, method="restyle", args=[{"visible": vis}]))
    fig.update_layout(
        title=dict(text=title), height=420, margin=dict(l=60, r=20, t=40, b=50),
        template="plotly_white", legend=dict(orientation="v", x=1.01, y=1),
        xaxis=dict(title=xlabel, type="log" if log_x else "linear",
                   **(dict(tickvals=TICKS, ticktext=[f"{t:g}×" for t in TICKS]) if x != "decode_tok_s" else {})),
        yaxis=dict(title="accuracy (95% CI)", range=[-0.02, 1.04]),
        updatemenus=[dict(buttons=buttons, direction="down", x=0.0, xanchor="left", y=1.02, yanchor="bottom",
                          showactive=True, pad=dict(t=0, b=0))] if len(views) > 1 else [],
    )
    return fig


def family_figure(part: dict, *, title: str) -> Any:
    """Per family: mean accuracy over the model's tasks against the target ratio, one line per method."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    families = [f for f in FAMILY_ORDER if f != "none" and any(c.family == f for c in part["cells"].values())]
    if not families:
        return None
    fig = make_subplots(rows=1, cols=len(families), shared_yaxes=True, subplot_titles=families,
                        horizontal_spacing=0.04)
    full = part["cells"].get(("full", 0.0))
    fa = full.agg(part["tasks"]) if full else None
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
               "#17becf"]
    for col, family in enumerate(families, 1):
        methods = sorted({c.method for c in part["cells"].values() if c.family == family})
        for i, m in enumerate(methods):
            pts = sorted(((c.ratio, c.agg(part["tasks"])) for c in part["cells"].values() if c.method == m),
                         key=lambda t: t[0])
            pts = [(r, a) for r, a in pts if a is not None]
            if not pts:
                continue
            fig.add_trace(go.Scatter(
                x=[r for r, _ in pts], y=[a["accuracy"] for _, a in pts], mode="lines+markers", name=m,
                legendgroup=family, legendgrouptitle_text=family if i == 0 else None,
                line=dict(color=palette[i % len(palette)], width=1.5), marker=dict(size=6),
                error_y=dict(type="data", symmetric=False, array=[a["hi"] - a["accuracy"] for _, a in pts],
                             arrayminus=[a["accuracy"] - a["lo"] for _, a in pts], thickness=0.8, width=2),
                customdata=[[a["lo"], a["hi"], a["n"], a["ratio_achieved"]] for _, a in pts],
                hovertemplate=(f"<b>{m}</b> ratio %{{x}}<br>accuracy %{{y:.3f}} [95%% CI %{{customdata[0]:.3f}}, "
                               "%{customdata[1]:.3f}], n=%{customdata[2]}<br>achieved %{customdata[3]:.3f}<extra></extra>")),
                row=1, col=col)
        if fa is not None:
            label = dict(annotation_text="full cache", annotation_position="bottom left") if col == 1 else {}
            fig.add_hline(y=fa["accuracy"], line=dict(dash="dot", color="#111", width=1), row=1, col=col, **label)
        fig.update_xaxes(title_text="target ratio (fraction of KV bytes removed)", row=1, col=col)
    fig.update_yaxes(title_text="accuracy (mean over tasks)", range=[-0.02, 1.04], row=1, col=1)
    fig.update_layout(title=dict(text=title), height=460, template="plotly_white",
                      margin=dict(l=60, r=20, t=70, b=50), legend=dict(groupclick="toggleitem"))
    return fig


# ----------------------------------------------------------------------------------------------- html


def esc(x: Any) -> str:
    return html.escape("" if x is None else str(x))


def _mb(x: Any) -> str:
    v = _f(x)
    return "" if math.isnan(v) else f"{v / 2**20:.2f}"


def task_table(part: dict, task: str, samples_dir: Path | None, page_dir: Path) -> str:
    full = part["cells"].get(("full", 0.0))
    full_acc = _f(full.rows[task].get("accuracy")) if full and task in full.rows else float("nan")
    out = ['<table class="sortable"><thead><tr>',
           *(f"<th>{h}</th>" for h in ("method", "family", "ratio", "achieved<br>(stored)", "×<br>smaller",
                                       "read achieved<br>(per step)", "accuracy", "95% CI", "Δ vs full", "n",
                                       "KV stored MB", "KV read MB/step", "peak decode MB", "decode tok/s",
                                       "kernel (speed path)", "commit", "machine", "samples")),
           "</tr></thead><tbody>"]
    cells = sorted(part["cells"].values(), key=lambda c: (FAMILY_ORDER.index(c.family) if c.family in FAMILY_ORDER
                                                          else 9, c.method, c.ratio))
    for c in cells:
        r = c.rows.get(task)
        if r is None or r.get("status") != "ok":
            continue
        acc = _f(r.get("accuracy"))
        n = int(r.get("n_samples") or 0)
        lo, hi = wilson(acc, n)
        path = speed_path(r)
        samp = ""
        if samples_dir is not None:
            hits = sorted(samples_dir.glob(f"{r['run_id']}.*"))
            if hits:
                samp = f'<a href="{esc(os.path.relpath(hits[0], page_dir))}">{esc(r["run_id"][:8])}</a>'
        title = esc(f"run_id {r['run_id']}; started {r.get('started_at')}; {r.get('device')}; torch {r.get('torch')}")
        out.append(
            f'<tr title="{title}"><td>{esc(c.method)}</td><td>{esc(c.family)}</td><td>{c.ratio:g}</td>'
            f"<td>{_fmt(_f(r.get('ratio_achieved')))}</td><td>{_fmt(compression(r.get('ratio_achieved')), '.2f')}</td>"
            f"<td>{_fmt(_f(r.get('read_ratio_achieved')))}</td><td><b>{_fmt(acc)}</b></td>"
            f"<td>[{_fmt(lo)}, {_fmt(hi)}]</td><td>{_fmt(acc - full_acc, '+.3f')}</td><td>{n}</td>"
            f"<td>{_mb(r.get('kv_bytes_stored'))}</td><td>{_mb(r.get('kv_bytes_read_per_step'))}</td>"
            f"<td>{_mb(r.get('peak_mem_decode_bytes'))}</td><td>{_fmt(_f(r.get('decode_tok_s')), '.1f')}</td>"
            f"<td>{esc(r.get('kernel'))}{'' if path == 'fused' else ' <span class=ref>(' + esc(path) + ' speed)</span>'}</td>"
            f"<td>{esc(str(r.get('git_sha') or '')[:8])}{'*' if r.get('git_dirty') else ''}</td>"
            f"<td>{esc(_short_device(r.get('device')))}</td><td>{samp}</td></tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def _short_device(d: Any) -> str:
    s = str(d or "")
    return s.split(":", 1)[1].strip().split(" @")[0] if s.startswith("cpu:") else s


def best_table(part: dict, grid_ratios: dict[str, list[float]]) -> str:
    """Best method of each family at each target ratio (mean over the model's tasks)."""
    fams = [f for f in FAMILY_ORDER if f != "none" and any(c.family == f for c in part["cells"].values())]
    ratios = sorted({c.ratio for c in part["cells"].values() if c.family in fams})
    if not fams or not part["tasks"]:
        return "<p><i>no compressed cells yet</i></p>"
    out = ["<table><thead><tr><th>target ratio</th><th>≈ compression</th>",
           *(f"<th>best {f}</th>" for f in fams), "</tr></thead><tbody>"]
    for r in ratios:
        cols = []
        for f in fams:
            best = None
            for c in part["cells"].values():
                if c.family != f or abs(c.ratio - r) > 1e-9:
                    continue
                a = c.agg(part["tasks"])
                if a is not None and (best is None or a["accuracy"] > best[1]["accuracy"]):
                    best = (c, a)
            cols.append("<td>–</td>" if best is None else
                        f"<td>{esc(best[0].method)} <b>{best[1]['accuracy']:.3f}</b> "
                        f"<span class=ci>[{best[1]['lo']:.2f}, {best[1]['hi']:.2f}]</span></td>")
        out.append(f"<tr><td>{r:g}</td><td>{1 / (1 - r):.2f}×</td>{''.join(cols)}</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def coverage_table(parts: dict, method_families: dict[str, str], planned: dict) -> str:
    keys = list(parts)
    out = ["<table class=coverage><thead><tr><th>method</th><th>family</th>",
           *(f"<th>{esc(m)} @ {L}</th>" for m, L in keys), "</tr></thead><tbody>"]
    for method, fam in sorted(method_families.items(), key=lambda kv: (FAMILY_ORDER.index(kv[1])
                                                                        if kv[1] in FAMILY_ORDER else 9, kv[0])):
        cols = []
        for k in keys:
            part = parts[k]
            rows = [r for c in part["cells"].values() if c.method == method for r in c.rows.values()]
            ok = sum(r.get("status") == "ok" for r in rows)
            sk = [r for r in rows if r.get("status") == "skipped"]
            fa = sum(r.get("status") == "failed" for r in rows)
            todo = planned.get((k, method), 0)
            reason = esc("; ".join(sorted({str(r.get("reason"))[:200] for r in sk}))[:600])
            bits = [f"{ok} ok"] + ([f'<span title="{reason}">{len(sk)} skipped</span>'] if sk else []) + \
                   ([f"<span class=bad>{fa} failed</span>"] if fa else []) + ([f"<span class=todo>{todo} to run</span>"] if todo else [])
            cols.append(f"<td>{', '.join(bits)}</td>")
        out.append(f"<tr><td>{esc(method)}</td><td>{esc(fam)}</td>{''.join(cols)}</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def _commit_age(commit: str) -> int:
    """Commits between ``commit`` and HEAD (0 = HEAD; unknown commits sort last)."""
    try:
        res = subprocess.run(["git", "rev-list", "--count", f"{commit}..HEAD"], capture_output=True, text=True,
                             cwd=REPO, timeout=10)
        return int(res.stdout.strip()) if res.returncode == 0 else 10**9
    except (OSError, ValueError, subprocess.SubprocessError):
        return 10**9


def bench_section(bench_dir: Path) -> str:
    """The decode-engine benchmark (kvbench full vs Hugging Face): the rows file of the newest clean commit
    (``results/bench/rows/<device>-<commit>[-dirty].jsonl``; several GPU calls at one commit merge there)."""
    files = list(bench_dir.glob("rows/*.jsonl"))
    if not files:
        return "<p><i>no benchmark rows in results/bench/rows/</i></p>"

    def rank(p: Path) -> tuple:
        dirty = p.stem.endswith("-dirty")
        commit = p.stem.removesuffix("-dirty").rsplit("-", 1)[-1]
        return (dirty, _commit_age(commit), p.name)

    best = sorted(files, key=rank)[0]
    cells, commands = [], []
    for line in best.read_text().splitlines():
        try:
            d = json.loads(line)
        except json.JSONDecodeError:
            continue
        if d.get("kind") == "command":
            commands.append(d.get("command"))
        elif d.get("kind") == "cell" and d.get("status") == "ok":
            cells.append(d)
    reports = sorted(p.name for p in bench_dir.glob("*.md"))
    out = [f"<p>Decode speed of the engine itself (Llama-3.1-8B shape, random weights, bf16), from "
           f"<code>results/bench/rows/{esc(best.name)}</code> (the newest clean commit's rows; reports: "
           + ", ".join(f"<code>{esc(r)}</code>" for r in reports) + "). Commands:</p><ul>"
           + "".join(f"<li><code>{esc(c)}</code></li>" for c in commands) + "</ul>",
           "<table class=sortable><thead><tr>", *(f"<th>{h}</th>" for h in (
               "engine", "method", "ratio", "batch", "context", "kernel", "CUDA graph", "decode ms p50",
               "x full (same call)", "tokens/s", "KV GB read / step", "roofline frac", "peak decode GB", "commit")),
           "</tr></thead><tbody>"]

    def full_ms(d: dict) -> float | None:  # full's decode in the same call and cell: the only fair divisor
        for f in cells:
            if (f.get("method") == "full" and f.get("engine") == d.get("engine") and f.get("call") == d.get("call")
                    and (f.get("batch"), f.get("context")) == (d.get("batch"), d.get("context"))):
                return _f(f.get("decode_ms_p50"))
        return None

    for d in sorted(cells, key=lambda d: (d.get("batch") or 0, d.get("context") or 0, str(d.get("engine")),
                                          d.get("method") != "full", str(d.get("label") or d.get("method")))):
        ms, ref = _f(d.get("decode_ms_p50")), full_ms(d)
        rel = ms / ref if ms is not None and ref else None
        read = _f(d.get("kv_bytes_read_per_step"))
        out.append(f"<tr><td>{esc(d.get('engine'))}</td><td>{esc(d.get('method') or '')}</td>"
                   f"<td>{_fmt(_f(d.get('ratio')), '.4g')}</td><td>{d.get('batch')}</td><td>{d.get('context')}</td>"
                   f"<td>{esc(d.get('kernel'))}</td><td>{'yes' if d.get('cuda_graph') else 'no'}</td>"
                   f"<td>{_fmt(ms, '.2f')}</td><td>{_fmt(rel, '.2f')}</td><td>{_fmt(_f(d.get('tokens_s')), '.0f')}</td>"
                   f"<td>{_fmt(None if read is None else read / 1e9, '.2f')}</td>"
                   f"<td>{_fmt(_f(d.get('roofline_frac')), '.2f')}</td>"
                   f"<td>{_fmt(_f(d.get('peak_mem_decode_bytes')) / 1e9, '.2f')}</td><td>{esc(d.get('commit'))}</td></tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def md_table(text: str) -> str:
    """The first markdown table of ``text`` as an HTML table (pipes in cells are not supported)."""
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    if len(lines) < 2:
        return ""
    cells = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines]
    head, body = cells[0], cells[2:]
    return ("<div class=scroll><table class=sortable><thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head)
            + "</tr></thead><tbody>" + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in body)
            + "</tbody></table></div>")


def questions_section(experiments: Path, fig_div: Any) -> tuple[list[str], list[str]]:
    """One section per open-question experiment (conf/experiment/q*.yaml, scripts/experiment.py): its question, the
    one-sentence answer and the table of ``results/experiments/<name>/answer.{json,md}``, a plot where the rows
    draw one (accuracy against ratio for the monotonicity question), or how to run it. Returns (nav, body)."""
    import yaml

    nav, body = [], []
    for path in sorted((REPO / "conf" / "experiment").glob("q*.yaml")):
        spec = yaml.safe_load(path.read_text())
        name, out = path.stem, experiments / path.stem
        anchor = f"q-{name}"
        nav.append(f'<a href="#{anchor}">{esc(name.split("_")[0].upper())}</a>')
        body.append(f'<h2 id="{anchor}">{esc(spec.get("question", name))}</h2>')
        ans = out / "answer.json"
        if ans.is_file():
            data = json.loads(ans.read_text())
            body.append(f"<p class=note><b>Answer.</b> {esc(data.get('answer'))} ({data.get('rows')} rows in "
                        f"<code>results/experiments/{esc(name)}/</code>)</p>")
            if spec.get("analysis") == "monotone":
                body.append(monotone_figure(out, fig_div))
            md = out / "answer.md"
            body.append(md_table(md.read_text()) if md.is_file() else "")
        else:
            outputs = sorted(p.name for p in out.glob("*.md")) if out.is_dir() else []
            body.append(f"<p class=todo>Not answered yet: <code>make experiment NAME={esc(name)}</code> "
                        f"(<code>ARGS=\"--size smoke\"</code> for a CPU-sized run)"
                        + (f"; its outputs so far: {', '.join(f'<code>{esc(o)}</code>' for o in outputs)}" if outputs
                           else "") + ".</p>")
    return nav, body


def monotone_figure(out: Path, fig_div: Any) -> str:
    """Accuracy against ratio per eviction method (mean over the tasks of each model and length)."""
    import plotly.graph_objects as go

    from harness.grid import read_rows

    curves: dict = defaultdict(lambda: defaultdict(list))
    for r in read_rows(out).values():
        if r.get("status") == "ok" and r.get("family") == "eviction" and r.get("accuracy") is not None:
            curves[(r["model"], int(r["context_length"]))][r["method"]].append((float(r["ratio"]), float(r["accuracy"])))
    html = []
    for (model, length), by_method in sorted(curves.items()):
        fig = go.Figure()
        for m, pts in sorted(by_method.items()):
            acc: dict = defaultdict(list)
            for x, y in pts:
                acc[x].append(y)
            xs = sorted(acc)
            fig.add_trace(go.Scatter(x=xs, y=[sum(acc[x]) / len(acc[x]) for x in xs], mode="lines+markers", name=m))
        fig.update_layout(title=f"{model} at {length} tokens: accuracy (mean over tasks) against the ratio",
                          xaxis_title="ratio (fraction of KV removed)", yaxis_title="accuracy", height=420)
        html.append(fig_div(fig))
    return "".join(html)


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,Helvetica,Arial,sans-serif;margin:0;color:#1a1a1a;background:#fafafa}
main{max-width:1280px;margin:0 auto;padding:24px 32px 64px}
h1{font-size:26px;margin:8px 0 4px} h2{font-size:20px;margin:36px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:16px;margin:22px 0 6px}
p,li{line-height:1.45;font-size:14px} code{background:#eee;padding:1px 4px;border-radius:3px;font-size:12.5px}
table{border-collapse:collapse;font-size:12px;margin:8px 0;background:white}
th,td{border:1px solid #ddd;padding:3px 6px;text-align:right;white-space:nowrap}
th{background:#f0f0f0;position:sticky;top:0;cursor:pointer} td:first-child,th:first-child{text-align:left}
table.coverage td,table.coverage th{text-align:left}
.ref{color:#a15c00} .bad{color:#b00020} .todo{color:#777} .ci{color:#666;font-size:11px}
.plot{background:white;border:1px solid #e3e3e3;border-radius:6px;margin:10px 0;padding:4px}
.cap{font-size:13px;font-weight:600;padding:6px 8px 0}
.grid2{display:grid;grid-template-columns:1fr 1fr;gap:10px}
details{margin:6px 0} summary{cursor:pointer;font-weight:600;font-size:14px}
nav{background:#fff;border-bottom:1px solid #ddd;padding:8px 32px;font-size:13px;position:sticky;top:0;z-index:10}
nav a{margin-right:14px;color:#0b57d0;text-decoration:none}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:8px 12px;font-size:13px;margin:10px 0}
.scroll{overflow-x:auto}
"""

SORT_JS = """
(function(){  // ?section=<h2 id>: show that section alone (report-check screenshots one section at a time)
  var m = location.search.match(/[?&]section=([^&]+)/); if (!m) return;
  var inside = false;
  Array.from(document.querySelector('main').children).forEach(function(el){
    if (el.tagName === 'H2') inside = (el.id === m[1]);
    if (!inside) el.style.display = 'none';
  });
  window.dispatchEvent(new Event('resize'));
})();
window.addEventListener('load', function(){  // plots change the page's height as they draw: jump to the anchor after
  if (location.hash) { setTimeout(function(){ var e = document.getElementById(location.hash.slice(1));
    if (e) { e.scrollIntoView(); window.scrollBy(0, -40); } }, 300); }
});
document.querySelectorAll('table.sortable th').forEach(function(th, col){
  th.addEventListener('click', function(){
    var table = th.closest('table'), body = table.tBodies[0], rows = Array.from(body.rows);
    var asc = th.dataset.asc !== '1'; th.dataset.asc = asc ? '1' : '0';
    rows.sort(function(a, b){
      var x = a.cells[col].innerText.replace(/[\\[\\],×]/g,''), y = b.cells[col].innerText.replace(/[\\[\\],×]/g,'');
      var nx = parseFloat(x), ny = parseFloat(y);
      var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
      return asc ? c : -c;
    });
    rows.forEach(function(r){ body.appendChild(r); });
  });
});
"""


def build(*, results: Path, bench_dir: Path, out: Path, grid_path: Path,
          experiments: Path = REPO / "results" / "experiments") -> Path:
    import plotly
    import plotly.offline as po

    from harness.grid import family_ratios, gate_passes, load_grid, methods, plan, rows_by_cell

    t0 = time.monotonic()
    grid = load_grid(grid_path)
    rows = load_rows(results)
    method_families = methods()
    parts = organise(rows, grid)
    # cells still to run, per (model, length) and method: tasks the gate passed (or has not decided yet)
    settings = dict(grid["settings"])
    done = rows_by_cell({r["run_id"]: r for r in rows}, settings)
    planned: dict = defaultdict(int)
    gate_todo: dict = defaultdict(int)
    for k, p in plan(grid).items():
        for c in p["gate"]:
            if (done.find(c) or {}).get("status") != "ok":
                planned[(k, "full")] += 1
                gate_todo[k] += 1
        gate = {g.task: gate_passes(done.find(g), float(grid["min_full_accuracy"])) for g in p["gate"]}
        for task, cells in p["cells"].items():
            if gate.get(task) is False:
                continue
            for c in cells:
                if (done.find(c) or {}).get("status") not in ("ok", "skipped"):
                    planned[(k, c.method)] += 1
    plot_cfg = {"displaylogo": False, "responsive": True,
                "toImageButtonOptions": {"format": "png", "scale": 2}}
    figs_html: list[str] = []

    def fig_div(fig: Any) -> str:
        caption = fig.layout.title.text or ""  # the title goes above the plot, clear of plotly's toolbar
        fig.update_layout(title=None, margin=dict(t=40))
        div = po.plot(fig, output_type="div", include_plotlyjs=False, config=plot_cfg, auto_open=False)
        figs_html.append(div)
        return f'<div class="plot"><div class="cap">{esc(caption)}</div>{div}</div>'

    shas = sorted({str(r.get("git_sha") or "")[:8] + ("*" if r.get("git_dirty") else "") for r in rows} - {""})
    machines = defaultdict(int)
    for r in rows:
        machines[_short_device(r.get("device"))] += 1
    n_ok = sum(r.get("status") == "ok" for r in rows)
    body = []
    nav = ['<a href="#measured">How it was measured</a>', '<a href="#coverage">Coverage</a>']
    for model, length in parts:
        anchor = f"{model}-{length}"
        nav.append(f'<a href="#{anchor}">{esc(model)} @ {length}</a>')
    nav.append('<a href="#bench">Engine benchmark</a>')

    ratios = family_ratios()
    s = grid["settings"]
    body.append(f"""
<h2 id="measured">How every number was measured</h2>
<ul>
<li><b>Protocol</b>: {esc(s.get('protocol'))} (kvpress' query-agnostic protocol: the context is prefilled in chunks of
{esc(s.get('prefill_chunk'))} tokens and compressed at <code>end_of_context()</code> before the question is seen; then the
question is appended and the answer decoded greedily). {esc(s.get('limit'))} samples a cell, seed {esc(s.get('seed'))},
batch size {esc(s.get('batch_size'))}; synthetic RULER-style tasks sized in each model's own tokens (<code>tasks/synthetic.py</code>).
Instruct models get their chat template.</li>
<li><b>Grid</b> (<code>conf/experiment/leaderboard.yaml</code>): every method of <code>conf/method/</code> at its family's
ratios ({'; '.join(f"{esc(f)}: {', '.join(f'{r:g}' for r in rs)}" for f, rs in ratios.items() if f != 'composed')}) x the
tasks a model can do at that length (full-cache accuracy >= {grid['min_full_accuracy']}) x the models. Every cell is an
ordinary <code>python -m harness.run</code> row (same run_id), run by <code>make leaderboard</code>.</li>
<li><b>Accuracy</b>: the task's own metric; 95 % intervals are Wilson score intervals over the cell's samples (means over
tasks pool them). <b>Achieved</b> = 1 - KV bytes stored / the same tokens at bf16, right after the context is compressed,
every overhead (scales, indices, positions) counted by walking the store's tensors; <b>read achieved</b> = the same for the
bytes one decode step reads (what sparse reads save; their stored bytes grow by the index).</li>
<li><b>Speed and memory</b> come from a throughput probe after the accuracy pass (random tokens, 1 x the cell's context
length, 32 decode steps), once per model, length, method and ratio. <span class=ref>reference</span> marks speeds measured
through a plain-torch reference store (a layout without a fused kernel yet): they measure our reference code, not the
method (the row's <code>kernel</code> column says which path ran); on a CPU every path is a reference path. CPU peak memory is the process's resident-set high
water mark per phase (weights included).</li>
<li><b>Rows</b>: {len(rows)} ({n_ok} ok) from commits {', '.join(f'<code>{esc(x)}</code>' for x in shas) or '–'}
(* = uncommitted changes) on {', '.join(f'{esc(m)} ({n})' for m, n in sorted(machines.items())) or '–'}.
Per-cell commit and machine are in each table; hover a row for its run_id. Regenerate: <code>make report</code>.</li>
</ul>
<h2 id="coverage">Coverage: every method on every model</h2>
<p>Cells per method and (model, context length). "to run" counts cells of tasks the gate passed or has not decided yet
({sum(gate_todo.values())} gate cells not run). Hover "skipped" for the reason.</p>
<div class=scroll>{coverage_table(parts, method_families, planned)}</div>
""")
    samples_root = results / "samples"
    for (model, length), part in parts.items():
        anchor = f"{model}-{length}"
        gate = ", ".join(f"{esc(t)} {part['gate'][t]:.2f}{' ✓' if t in part['tasks'] else ' ✗'}"
                         for t in part["candidates"] if t in part["gate"])
        undecided = [t for t in part["candidates"] if t not in part["gate"]]
        body.append(f'<h2 id="{anchor}">{esc(model)} at {length} tokens</h2>')
        body.append(f"<p>Gate (full-cache accuracy per task; ✓ = in the leaderboard): {gate or '–'}"
                    f"{'; not run yet: ' + ', '.join(map(esc, undecided)) if undecided else ''}.</p>")
        if not part["tasks"]:
            todo = sum(v for (k, _), v in planned.items() if k == (model, length))
            body.append(f"<p class=note>No cell of {esc(model)} at {length} tokens has run yet ({todo} cells to run: "
                        f"<code>python -m scripts.leaderboard --models {esc(model)} --lengths {length}</code>).</p>")
            continue
        complete = [c for c in part["cells"].values() if c.agg(part["tasks"]) is not None]
        body.append(f"<p>{len(complete)} (method, ratio) points have all {len(part['tasks'])} tasks; points missing a "
                    "task are left out of the means (they stay in the task tables).</p>")
        views = ["mean over tasks", *part["tasks"]]
        body.append('<div class="grid2">')
        body.append(fig_div(pareto_figure(part, x="compression", log_x=True, views=views,
                                          title=f"{model} @ {length}: accuracy vs achieved compression (bytes stored)",
                                          xlabel="achieved compression, full / stored bytes (log)")))
        other = (f"; {part['other_devices']} rows from other machines left out" if part["other_devices"] else "")
        body.append(fig_div(pareto_figure(part, x="decode_tok_s", log_x=True, views=views,
                                          title=f"{model} @ {length}: accuracy vs decode speed on "
                                                f"{_short_device(part['speed_device'])}{other}",
                                          xlabel="decode tokens/s (throughput probe, log)")))
        body.append("</div>")
        body.append(fig_div(pareto_figure(part, x="read_compression", log_x=True, views=views,
                                          title=f"{model} @ {length}: accuracy vs bytes read per decode step",
                                          xlabel="read compression, full / bytes read per step (log)")))
        ff = family_figure(part, title=f"{model} @ {length}: per family, accuracy vs target ratio "
                                       f"(mean over {len(part['tasks'])} tasks)")
        if ff is not None:
            body.append(fig_div(ff))
        body.append("<h3>Best method per family at each target ratio (mean over tasks, 95% CI)</h3>")
        body.append(best_table(part, ratios))
        for task in part["tasks"]:
            n_rows = sum(1 for c in part["cells"].values() if c.rows.get(task, {}).get("status") == "ok")
            body.append(f"<details><summary>{esc(task)}: {n_rows} cells</summary><div class=scroll>"
                        f"{task_table(part, task, samples_root if samples_root.is_dir() else None, out.parent)}</div></details>")
        bad = part["skipped"] + part["failed"]
        if bad:
            body.append(f"<details><summary>skipped and failed cells ({len(part['skipped'])} skipped, "
                        f"{len(part['failed'])} failed)</summary><table><thead><tr><th>status</th><th>task</th><th>method</th>"
                        "<th>ratio</th><th>reason</th></tr></thead><tbody>")
            for r in sorted(bad, key=lambda r: (r.get("method"), r.get("ratio"), r.get("task"))):
                body.append(f"<tr><td>{esc(r.get('status'))}</td><td>{esc(r.get('task'))}</td><td>{esc(r.get('method'))}</td>"
                            f"<td>{_f(r.get('ratio')):g}</td><td style='text-align:left;white-space:normal'>"
                            f"{esc(str(r.get('reason'))[:400])}</td></tr>")
            body.append("</tbody></table></details>")
    q_nav, q_body = questions_section(experiments, fig_div)
    nav[-1:-1] = q_nav
    body += q_body
    body.append('<h2 id="bench">Engine benchmark (GPU)</h2>')
    body.append(bench_section(bench_dir))
    generated = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>kvbench leaderboard</title><style>{CSS}</style>
<script type="text/javascript">{po.get_plotlyjs()}</script></head>
<body><nav>{''.join(nav)}</nav><main>
<h1>kvbench leaderboard: KV-cache compression on one engine</h1>
<p>Which method keeps accuracy at which compression, at what memory and speed: every method through the same engine,
model, tasks and budgets. Built {generated} by <code>scripts/report.py</code> from <code>results/leaderboard/</code> and
<code>results/bench/</code> (plotly {esc(plotly.__version__)}, inlined: the page needs no network).</p>
{''.join(body)}
</main><script>{SORT_JS}</script></body></html>
"""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
    size = out.stat().st_size
    print(f"[report] {out} ({size / 2**20:.1f} MB, {len(figs_html)} plots, {len(rows)} rows) in "
          f"{time.monotonic() - t0:.1f}s", file=sys.stderr)
    if size > MAX_BYTES:
        print(f"[report] warning: the page is over {MAX_BYTES / 2**20:.0f} MB", file=sys.stderr)
    return out


# ----------------------------------------------------------------------------------------- screenshots


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        p = shutil.which(name)
        if p:
            return p
    return None


def check(page: Path, shots: Path, *, width: int = 1400, height: int = 1700) -> list[Path]:
    """Render ``page`` in headless Chromium with every network request refused (a proxy that does not
    exist), and save one screenshot per section (``?section=<h2 id>`` shows that section alone). Returns the PNGs."""
    import re

    exe = chromium()
    if exe is None:
        raise SystemExit("report-check needs Chromium: `apt-get install -y chromium` (Debian's package)")
    shots.mkdir(parents=True, exist_ok=True)
    for old in shots.glob("*.png"):
        old.unlink()
    anchors = [""] + re.findall(r'<h2 id="([A-Za-z0-9_.-]+)"', page.read_text())
    out = []
    for i, anchor in enumerate(anchors):
        png = shots / f"{i:02d}-{anchor or 'top'}.png"
        cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--disable-dev-shm-usage",
               "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>", "--virtual-time-budget=15000",
               f"--window-size={width},{height}", f"--screenshot={png}",
               page.resolve().as_uri() + (f"?section={anchor}" if anchor else "")]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if res.returncode != 0 or not png.is_file():
            raise SystemExit(f"chromium failed ({res.returncode}): {res.stderr[-2000:]}")
        out.append(png)
        print(f"[report] screenshot {png}", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=REPO / "results" / "leaderboard")
    ap.add_argument("--bench", type=Path, default=REPO / "results" / "bench")
    ap.add_argument("--grid", type=Path, default=REPO / "conf" / "experiment" / "leaderboard.yaml")
    ap.add_argument("--experiments", type=Path, default=REPO / "results" / "experiments",
                    help="the open questions' results (scripts/experiment.py)")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "report" / "index.html")
    ap.add_argument("--check", action="store_true", help="also take headless Chromium screenshots")
    ap.add_argument("--shots", type=Path, default=REPO / "results" / "report" / "screenshots")
    args = ap.parse_args(argv)
    page = build(results=args.results, bench_dir=args.bench, out=args.out, grid_path=args.grid,
                 experiments=args.experiments)
    if args.check:
        check(page, args.shots)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
