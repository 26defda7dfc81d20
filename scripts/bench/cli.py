"""The decode benchmark's command line: the flags, the model of the call, the rows file (appended after every
measurement, so a call cut short keeps what it measured) and the report merged from every call at the commit."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from scripts.bench.common import (
    CELLS,
    ENGINES,
    EXTRA_ENGINES,
    REPO,
    TOO_BIG,
    git_commit,
    kv_bytes_per_token,
    meta_model,
    parse_cells,
    weight_bytes_read,
)
from scripts.bench.engines import capacity_probe, run_hf, run_kvbench
from scripts.bench.method_spec import MethodSpec
from scripts.bench.profiling import profile_kvbench
from scripts.bench.report import write_report

# Environment switches of methods/kernels that change which kernel runs or how it is launched
KERNEL_ENV = ("KVBENCH_FAST16", "KVBENCH_UNPACK", "KVBENCH_QUANT_DECODE")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    import scripts.bench

    ap = argparse.ArgumentParser(description=scripts.bench.__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama3_8b_shape", help="a conf/model name")
    ap.add_argument("--cells", default=CELLS, help="batch x context, comma-separated")
    ap.add_argument("--engines", default=None, help=f"comma-separated, from {', '.join(ENGINES + EXTRA_ENGINES)} "
                    "(default: all of ENGINES; only kvbench with --methods)")
    ap.add_argument("--methods", default=None,
                    help="kvbench rows for these methods instead of full alone: name[:ratio[:key=value...]], "
                         "comma-separated, any conf/method name (e.g. full,fp8:0.5,uniform_int:0.75)")
    ap.add_argument("--steps", type=int, default=64, help="timed decode steps")
    ap.add_argument("--warmup", type=int, default=4, help="untimed decode steps first (compilation)")
    ap.add_argument("--prefill-tokens", type=int, default=8192,
                    help="tokens per prefill forward pass over the whole batch (chunk = this / batch, >= 256): "
                         "bounds prefill activations, so peak memory stays near weights + KV")
    ap.add_argument("--capacity", action="store_true", help="also find the largest batch at 32K in 80 GB")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="also profile N kvbench decode steps per cell (torch.profiler): time by kernel category")
    ap.add_argument("--calibrate", default=None,
                    help="method specs whose calibration (RateQuant's fit) is timed first, on random token ids, "
                         "uncached (same syntax as --methods)")
    ap.add_argument("--profile-methods", default=None,
                    help="with --methods: profile only these method specs (comma-separated labels)")
    ap.add_argument("--no-compile", action="store_true", help="hf_static_compile without torch.compile")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default=str(REPO / "results" / "bench"))
    ap.add_argument("--report", action="store_true", help="only rebuild the report from this commit's rows (any machine: the model is built on the meta device)")
    ap.add_argument("--commit", default=None,
                    help="label the rows and the report with this commit instead of `git rev-parse` (the GPU "
                         "machine's copy of the tree can report the session's first commit + dirty)")
    ap.add_argument("--split", default=None, metavar="all|K",
                    help="split the model's layers over all (or the first K) GPUs (accelerate device_map, "
                         "harness/devices.py): a model larger than one GPU; roofline over the GPUs in turn")
    ap.add_argument("--smoke", action="store_true", help="CPU, a tiny random Llama, 1x64 and 2x48: seconds")
    return ap.parse_args(argv)


def load_model(args: argparse.Namespace, cells: list[tuple[int, int]]) -> tuple[Any, str, list, float | None, dict | None]:
    """(model, device name, cells, copy bandwidth or None, per-GPU bandwidths of a --split model or None): the
    tiny random Llama of --smoke (which also shortens the run), the meta-device model of --report without a GPU,
    else the conf/model on CUDA."""
    from harness.loading import load
    from harness.measure import copy_bandwidth

    bws = None
    if args.smoke:
        from harness.models import build_random_model, tiny_config

        model = build_random_model(tiny_config("llama", n_layers=2), seed=0)
        device_name, cells = "cpu-smoke", [(1, 64), (2, 48)]
        args.steps, args.warmup, args.prefill_tokens, args.no_compile = 4, 1, 64, True
        bw = None
    elif args.report and not torch.cuda.is_available():  # merge rows anywhere: the model's shapes suffice
        model = meta_model(args.model)
        commit = args.commit or git_commit()
        found = sorted((Path(args.out_dir) / "rows").glob(f"*-{commit}.jsonl"))
        if len(found) != 1:
            raise SystemExit(f"--report without a GPU needs exactly one rows file for commit {commit} in "
                             f"{args.out_dir}/rows, found {[f.name for f in found]}; pass --commit")
        device_name, bw = found[0].name[: -len(f"-{commit}.jsonl")], None
    else:
        if not torch.cuda.is_available():
            raise SystemExit("scripts.bench measures GPU decode: run it on the GPU machine (or --smoke on CPU)")
        import yaml

        cfg = yaml.safe_load((REPO / "conf" / "model" / f"{args.model}.yaml").read_text())
        split = int(args.split) if str(args.split).isdigit() else args.split
        model = load(cfg, device="cuda", split_over=split).model
        device_name = torch.cuda.get_device_name(0).replace(" ", "-").lower()
        bw = copy_bandwidth(torch.device("cuda"), nbytes=4 << 30)
        if args.split:  # per-GPU bandwidths; the report's figure is their sum
            from harness.devices import device_bandwidths

            bws = device_bandwidths(model, nbytes=4 << 30)
            device_name, bw = f"{device_name}-x{len(bws)}", sum(bws.values())
    return model, device_name, cells, bw, bws


def append_row(rows_path: Path, row: dict) -> None:
    """One JSON line; written at once, so a call cut short keeps what it measured."""
    with rows_path.open("a") as f:
        f.write(json.dumps(row, default=str) + "\n")


def error_text(e: Exception, limit: int = 200) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:limit]}"


def calibration_row(spec: MethodSpec, model: Any, commit: str) -> dict:
    """--calibrate: the method's fit timed twice; the first call also pays one-off costs (the engine's kernels
    compile), the second not."""
    row = {"kind": "calibration", "label": spec.label, "method": spec.name, "commit": commit}
    try:
        method, cold = spec.build(model)
        method, ms = spec.build(model)
        row.update(calibrate_ms=ms, calibrate_cold_ms=cold, timing_ms=getattr(method, "fit", {}).get("timing_ms"))
    except Exception as e:  # noqa: BLE001
        row.update(error=error_text(e))
    return row


def measure_cell(model: Any, engine: str, spec: MethodSpec | None, B: int, S: int, args: argparse.Namespace, *,
                 commit: str, call_id: str, kv: int, w_read: int, bw: float | None, bws: dict | None) -> dict:
    """One row of kind ``cell``: ``engine`` (with the method of ``spec`` for kvbench) at B x S, its roofline
    (weights read + KV read over the copy bandwidth); a cell that cannot run still gives its row, with the reason."""
    row: dict[str, Any] = {"kind": "cell", "engine": engine, "batch": B, "context": S, "commit": commit,
                           "call": call_id, "method": spec.name if spec else "full",
                           "ratio": (spec.ratio if spec and spec.ratio is not None else 0.0),
                           "label": spec.label if spec else "full"}
    t0 = time.perf_counter()
    try:
        if engine in ("kvbench", "kvbench_modules"):
            method, calib_ms = spec.build(model) if spec else (None, None)
            if method is not None:
                row.update(family=method.family, ratio=float(method.ratio), calibrate_ms=calib_ms)
            row.update(run_kvbench(model, B, S, args, "off" if engine == "kvbench_modules" else "auto",
                                   method=method))
        else:
            row.update(run_hf(model, B, S, args, static=engine == "hf_static_compile"))
        row["status"] = "ok"
        row["tokens_s"] = B / (row["decode_ms_p50"] / 1000)
        read = row.get("kv_bytes_read_per_step") if spec else None
        kv_read = kv if read is None else read
        if args.split and bw:  # GPUs in turn; tp_roofline_ms: all at once (harness/devices.py)
            from harness.devices import roofline_ms

            row.update(roofline_ms(model, kv_bytes=kv_read, skip_input_embedding=True, bandwidths=bws))
            row["note"] = (f"layers over {row['n_devices']} GPUs; tensor-parallel bound "
                           f"{row['tp_roofline_ms']:.2f} ms; {row.get('graph_error') or ''}").rstrip("; ")
        elif bw:
            row["roofline_ms"] = 1000 * (w_read + kv_read) / bw
        else:  # CPU smoke: no bandwidth, no roofline
            row["roofline_ms"] = float("nan")
        row["roofline_frac"] = row["roofline_ms"] / row["decode_ms_p50"]
    except torch.OutOfMemoryError as e:
        row.update(status="skipped", reason=f"out of memory: {str(e).splitlines()[0][:160]}")
    except ValueError as e:  # a method that cannot run here (validate's reasons) still writes its row
        row.update(status="skipped", reason=str(e).splitlines()[0][:300])
    except Exception as e:  # noqa: BLE001 - a failed engine still writes its row
        row.update(status="failed", reason=error_text(e))
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    return row


def profiled_specs(args: argparse.Namespace, specs: list[MethodSpec], engines: list[str]) -> list[MethodSpec | None]:
    """What --profile profiles per cell: the --profile-methods specs, else every --methods spec, else ``full``."""
    if not (args.profile and "kvbench" in engines):
        return []
    if args.profile_methods:
        return [s for s in specs if s.label in args.profile_methods.split(",")]
    return specs or [None]


def profile_row(model: Any, B: int, S: int, args: argparse.Namespace, spec: MethodSpec | None) -> dict:
    try:
        return profile_kvbench(model, B, S, args, spec)
    except Exception as e:  # noqa: BLE001 - a failed profile still writes its row
        return {"kind": "profile", "batch": B, "context": S, "label": spec.label if spec else "full",
                "error": error_text(e)}


def measure(args: argparse.Namespace, model: Any, cells: list[tuple[int, int]], engines: list[str],
            specs: list[MethodSpec], rows_path: Path, *, commit: str, command: str, bw: float | None,
            bws: dict | None) -> None:
    """Append this call's rows: its command, --calibrate's fits, every cell x engine (x method), the profiles and
    the capacity probe; cells whose KV alone exceeds the device become ``skipped_cell`` rows."""
    import transformers

    dev = next(model.parameters()).device
    w_read = weight_bytes_read(model)
    kv_tok = kv_bytes_per_token(model.config)
    call_id = dt.datetime.now().isoformat(timespec="seconds")  # rows of one call compare with each other
    rows_path.parent.mkdir(parents=True, exist_ok=True)
    append_row(rows_path, {"kind": "command", "command": command, "bandwidth": bw, "date": dt.date.today().isoformat(),
                           "torch": torch.__version__, "transformers": transformers.__version__})
    free = sum(torch.cuda.get_device_properties(d).total_memory for d in {p.device for p in model.parameters()}
               ) if dev.type == "cuda" else None
    for spec in [MethodSpec(m) for m in (args.calibrate or "").split(",") if m]:
        row = calibration_row(spec, model, commit)
        print(json.dumps(row, default=str), flush=True)
        append_row(rows_path, row)
    for B, S in cells + ([] if args.smoke else parse_cells(TOO_BIG)):
        kv = B * S * kv_tok
        if free is not None and kv + w_read > free:
            append_row(rows_path, {"kind": "skipped_cell", "batch": B, "context": S,
                                   "reason": f"KV alone {kv / 2**30:.0f} GiB + weights exceed the device's "
                                             f"{free / 2**30:.0f} GiB"})
            continue
        if (B, S) not in cells:
            continue
        for engine, spec in [(e, sp) for e in engines for sp in (specs if e == "kvbench" and specs else [None])]:
            row = measure_cell(model, engine, spec, B, S, args, commit=commit, call_id=call_id, kv=kv, w_read=w_read,
                               bw=bw, bws=bws)
            print(json.dumps({k: v for k, v in row.items() if k != "kind"}, default=str), flush=True)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            append_row(rows_path, row)
        for spec in profiled_specs(args, specs, engines):
            prof = profile_row(model, B, S, args, spec)
            print(json.dumps(prof, default=str), flush=True)
            append_row(rows_path, prof)
    if args.capacity and dev.type == "cuda" and not args.split:
        cap = {"kind": "capacity", **capacity_probe(model, 32768, args)}
        print(json.dumps(cap), flush=True)
        append_row(rows_path, cap)


def latest_rows(rows: list[dict]) -> list[dict]:
    """The rows the report shows: the latest per (engine, method spec, cell), skipped cell, capacity context,
    calibrated spec and profiled (spec, cell)."""
    latest: dict[tuple, dict] = {}
    for r in rows:
        if r.get("kind") == "cell":
            latest[(r["engine"], r.get("label", "full"), r["batch"], r["context"])] = r
        elif r.get("kind") == "skipped_cell":
            latest[("skipped", r["batch"], r["context"])] = r
        elif r.get("kind") == "capacity":
            latest[("capacity", r["context"])] = r
        elif r.get("kind") == "calibration":
            latest[("calibration", r["label"])] = r
        elif r.get("kind") == "profile":
            latest[("profile", r.get("label", "full"), r["batch"], r["context"])] = r
    return list(latest.values())


def report_meta(args: argparse.Namespace, model: Any, rows: list[dict], *, device_name: str, commit: str,
                command: str) -> dict:
    """The report's header: versions and bandwidth as the GPU calls recorded them (--report may run elsewhere)."""
    import transformers

    from harness.measure import weights_bytes

    cmds = [r for r in rows if r.get("kind") == "command"]
    bandwidths = [c["bandwidth"] for c in cmds if c.get("bandwidth")]

    def versions(key: str, here: str) -> str:
        return ", ".join(sorted({c[key] for c in cmds if c.get(key)})) or here

    return {"model": "tiny random Llama (smoke)" if args.smoke else args.model, "device": device_name, "commit": commit,
            "date": dt.date.today().isoformat(), "torch": versions("torch", torch.__version__),
            "transformers": versions("transformers", transformers.__version__),
            "bandwidth": statistics.median(bandwidths) if bandwidths else math.nan,
            "weight_bytes_read": weight_bytes_read(model), "kv_bytes_per_token": kv_bytes_per_token(model.config),
            "weight_bytes": weights_bytes(model), "commands": [c["command"] for c in cmds] or [command]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    specs = [MethodSpec(m) for m in (args.methods or "").split(",") if m]
    engines = [e for e in (args.engines or ("kvbench" if specs else ",".join(ENGINES))).split(",") if e]
    bad = [e for e in engines if e not in ENGINES + EXTRA_ENGINES]
    if bad:
        raise SystemExit(f"unknown engine(s) {bad}; choose from {', '.join(ENGINES + EXTRA_ENGINES)}")
    model, device_name, cells, bw, bws = load_model(args, parse_cells(args.cells))
    commit = args.commit or git_commit()
    out_dir = Path(args.out_dir)
    rows_path = out_dir / "rows" / f"{device_name}-{commit}.jsonl"
    # the kernel switches read from the environment (methods/kernels) are part of what ran: the command says them
    env = [f"{k}={shlex.quote(os.environ[k])}" for k in KERNEL_ENV if os.environ.get(k)]
    command = " ".join([*env, "python -m scripts.bench"]) + " " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    if not args.report:
        measure(args, model, cells, engines, specs, rows_path, commit=commit, command=command, bw=bw, bws=bws)
    rows = [json.loads(line) for line in rows_path.read_text().splitlines() if line.strip()] if rows_path.exists() else []
    meta = report_meta(args, model, rows, device_name=device_name, commit=commit, command=command)
    report = out_dir / f"{device_name}-{meta['date']}-{commit}.md"
    print(write_report(latest_rows(rows), report, meta))
    print(f"report: {report}")
    return 0
