"""Micro-benchmark of the quantized decode-attention kernels (methods/kernels/quant_attention.py) at a real
model's shape, beside the dense kernel ``full`` runs (GPU machine).

    python -m scripts.bench_quant_attention                          # Llama-3.1-8B heads, 8 x 32768, bf16
    python -m scripts.bench_quant_attention --cells 8x32768 --tune --best best.json

For each cell (batch x context) one layer's cache is filled from random K/V (encoded by the codec) and one
decode step's attention (split + combine with the new token, what a CodecStore decode step runs minus the
append) is timed in a CUDA graph (median of ``--iters``) for every layout, next to the dense
``decode_attention`` over bf16 K/V. Bandwidth = the bytes the kernel must read (codes + metadata of the valid
slots, each kv head once) / time, as a fraction of the copy bandwidth measured in the same process. Before
timing, each layout's output under each configuration is checked against the plain-torch reference at a
smaller length (max abs error printed). ``--tune`` first times the configurations in ``TUNE`` (tile, warps,
pipeline stages, the kernel's own prefetch of the next tile, the planar INT4 kernel) on the --tune-layouts and
times every other layout with the fastest (``--grid quick``: the smaller TUNE_QUICK); ``--best FILE`` writes
that configuration as JSON, for ``KVBENCH_QUANT_DECODE`` (read by methods/kernels/quant_attention.py, so
python -m scripts.bench runs with it). The unpacking mode (``KVBENCH_UNPACK``) is fixed per process.
Imports neither lm-eval, wandb nor Hydra.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent

from harness.measure import copy_bandwidth, graph_ms_per_call  # noqa: E402
from methods.kernels import quant_attention as QA  # noqa: E402
from methods.kernels.attention import decode_attention  # noqa: E402
from methods.kernels.quant_attention import ScalarLayout, scalar_encode_reference  # noqa: E402
from scripts.bench.common import emit_lines  # noqa: E402

LAYOUTS = {
    "uniform_int4 g32": ScalarLayout("int", 4, 32),
    "quarot4 (g128)": ScalarLayout("int", 4, 128, 0.95),
    "fp8": ScalarLayout("fp8", 8, 128),
    "uniform_int2 g32": ScalarLayout("int", 2, 32),
    "int3 g128": ScalarLayout("int", 3, 128),
    "uniform_int8 g32": ScalarLayout("int", 8, 32),
}


# The tuning grid. A decode step is latency-bound per program: each program keeps about (stages - 1) tiles of
# BLOCK_N slots in flight, and a tile of packed codes is 2-4x smaller than the dense kernel's bf16 tile, so the
# quantized kernels need longer tiles, deeper pipelines or more programs per SM to keep the same bytes in
# flight (Little's law). Measured, not assumed: --tune times every entry on every --tune-layouts layout.
TUNE = [
    {"prefetch": prefetch, "num_warps": warps, "num_stages": stages, "block_n": bn, "per_sm": per_sm, "planar": planar}
    for planar in (False, True)  # planar: INT4 without the interleave (decode_split_planar); other layouts ignore it
    for bn, warps, stages, per_sm, prefetch in [
        (64, 4, 2, 4, False), (64, 4, 3, 4, False), (64, 4, 4, 4, False), (64, 4, 1, 4, True),
        (64, 4, 2, 8, False), (64, 4, 3, 8, False), (64, 8, 3, 4, False),
        (128, 4, 2, 4, False), (128, 4, 3, 4, False), (128, 8, 2, 4, False), (128, 8, 3, 4, False),
        (128, 8, 4, 2, False), (128, 4, 3, 2, False), (128, 8, 3, 8, False),
        (256, 8, 2, 2, False), (256, 8, 3, 2, False),
        (64, 4, 2, 4, True), (128, 4, 2, 4, True), (128, 8, 2, 4, True), (128, 8, 3, 4, True),
    ]
]
# ``--grid quick``: the neighbourhood of the configurations that won on the H100 at e9d3ab8 (8 per SM, 3-4 stages,
# 64-slot tiles) for the e9d3ab8 kernel and with the bf16 conversion of 4- and 2-bit codes (``fast16``), in channel
# order and planar: a GPU call's worth, every configuration checked against the reference.
TUNE_QUICK = [
    {"prefetch": False, "num_warps": warps, "num_stages": stages, "block_n": bn, "per_sm": per_sm, "planar": planar,
     "fast16": fast16}
    for fast16, planar in ((False, False), (True, False), (True, True))  # the e9d3ab8 kernel, then the bf16 conversion
    for bn, warps, stages, per_sm in [(64, 4, 3, 8), (64, 4, 4, 8), (64, 4, 3, 4), (128, 4, 3, 8), (128, 8, 3, 8),
                                      (32, 4, 4, 8)]
]
GRIDS = {"full": TUNE, "quick": TUNE_QUICK}


def fields(layout: ScalarLayout, x: torch.Tensor) -> tuple:
    f = scalar_encode_reference(x, layout, meta_dtype=x.dtype)
    return f["codes"], f["scale"], f.get("zero")


def nbytes(fs: tuple, S: int) -> int:
    return sum(t[:, :, :S].numel() * t.element_size() for t in fs if t is not None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cells", default="8x32768")
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--tune", action="store_true", help="time TUNE's configurations on --tune-layouts first")
    ap.add_argument("--tune-layouts", default="uniform_int4 g32,fp8",
                    help="layouts the tuning grid is timed on; the best is the lowest total time over them")
    ap.add_argument("--best", default=None, help="write the fastest configuration here (JSON)")
    ap.add_argument("--grid", choices=sorted(GRIDS), default="full", help="the tuning grid (full: TUNE)")
    ap.add_argument("--heads", default="32,8,128", help="query heads, kv heads, head dim")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    H_q, H_kv, D = (int(x) for x in args.heads.split(","))
    bw = copy_bandwidth(dev, nbytes=2 << 30)
    names = [n for n in args.layouts.split(",") if n]
    lines = [f"# Quantized decode attention, {torch.cuda.get_device_name(0)}, heads {H_q}/{H_kv}/{D}, bf16; "
             f"copy bandwidth {bw / 1e12:.2f} TB/s; unpacking {QA._kernels()._UNPACK}", "",
             "| cell | kernel | config | ms | GB read | GB/s | frac of copy bw | max abs err vs reference |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    tune_names = [n for n in args.tune_layouts.split(",") if n]
    unknown = [n for n in tune_names + names if n not in LAYOUTS]
    if unknown:
        ap.error(f"unknown layouts {unknown}; known: {', '.join(LAYOUTS)}")
    names = tune_names + [n for n in names if n not in tune_names] if args.tune else names
    tune_left, tuned, totals = set(tune_names), False, {}
    for cell in args.cells.split(","):
        B, S = (int(x) for x in cell.split("x"))
        g = torch.Generator(device=dev).manual_seed(0)
        q = torch.randn(B, H_q, D, device=dev, dtype=torch.bfloat16, generator=g)
        kn, vn = torch.randn(2, B, H_kv, D, device=dev, dtype=torch.bfloat16, generator=g)
        lengths = torch.full((B,), S, dtype=torch.long, device=dev)
        k = torch.randn(B, H_kv, S + 64, D, device=dev, dtype=torch.bfloat16, generator=g)
        v = torch.randn_like(k)
        t = graph_ms_per_call([functools.partial(decode_attention, q, k, v, lengths, scaling=D**-0.5)] * 10, args.iters)
        read = 2 * B * H_kv * S * D * 2
        lines.append(f"| {cell} | dense bf16 (full) | default | {t:.3f} | {read / 1e9:.2f} | {read / t / 1e6:,.0f} "
                     f"| {read / t / 1e-3 / bw:.2f} | |")
        print(lines[-1], flush=True)
        for name in names:
            lay = LAYOUTS[name]
            kf, vf = fields(lay, k), fields(lay, v)
            small = torch.full((B,), min(S, 2000), dtype=torch.long, device=dev)
            small[0] = min(S, 1999)
            args_small = (q, *kf, *vf, small, kn, vn)
            want = QA.scalar_decode_attention_reference(*(a[:, :, :2048] if a is not None and a.dim() == 4 else a
                                                          for a in args_small), k_layout=lay, v_layout=lay,
                                                        scaling=D**-0.5)
            read = nbytes(kf, S) + nbytes(vf, S)
            tuning = args.tune and not tuned and name in tune_names
            configs = GRIDS[args.grid] if tuning else [dict(QA.DECODE_CONFIG)]
            for cfg in configs:
                saved = dict(QA.DECODE_CONFIG)
                QA.DECODE_CONFIG.update(cfg)
                fn = functools.partial(QA.scalar_decode_attention, q, *kf, *vf, lengths, kn, vn, k_layout=lay,
                                       v_layout=lay, scaling=D**-0.5)
                label = ",".join(f"{k}={int(v)}" for k, v in cfg.items())
                try:  # each configuration against the reference (the planar kernel is another kernel)
                    got = QA.scalar_decode_attention(*args_small, k_layout=lay, v_layout=lay, scaling=D**-0.5)
                    err = float((got.float() - want.float()).abs().max())
                    t = graph_ms_per_call([fn] * 10, args.iters)
                    if tuning:
                        totals[label] = (totals.get(label, (0.0, None))[0] + t, dict(QA.DECODE_CONFIG))
                    lines.append(f"| {cell} | {name} | {label} | {t:.3f} "
                                 f"| {read / 1e9:.2f} | {read / t / 1e6:,.0f} | {read / t / 1e-3 / bw:.2f} | {err:.2e} |")
                except Exception as e:  # noqa: BLE001 - a configuration that does not launch is listed
                    lines.append(f"| {cell} | {name} | {label} | failed: {type(e).__name__}: {str(e)[:80]} | | | | |")
                QA.DECODE_CONFIG.clear()
                QA.DECODE_CONFIG.update(saved)
                print(lines[-1], flush=True)
            if tuning:
                tune_left.discard(name)
            if args.tune and not tuned and not tune_left and totals:
                tuned = True
                best = min(totals.values(), key=lambda x: x[0])[1]
                QA.DECODE_CONFIG.update(best)  # every later layout and cell runs with it
                if args.best:
                    Path(args.best).write_text(json.dumps(best))
                lines.append(f"\nbest over {', '.join(tune_names)}: {json.dumps(best)}\n")
                print(lines[-1], flush=True)
            del kf, vf
    return emit_lines(lines, args.out)


if __name__ == "__main__":
    sys.exit(main())
