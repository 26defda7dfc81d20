"""Micro-benchmark of the decode step's projections (GPU machine): cuBLAS (``torch.nn.functional.linear``)
against :func:`harness.kernels.layers.gemv` over a grid of its configurations, at a real model's shapes.

    python -m scripts.bench_gemv                       # llama3_8b_shape: qkv, o, gate-up, down, lm_head; 1 and 8 rows

Each shape is timed on ``--copies`` distinct weight tensors in turn (more bytes than the L2 cache holds, as in a
real step where every layer's weights are new), calls captured in a CUDA graph (no launch overhead), median of
``--iters`` replays. Bandwidth = weight bytes / time; fraction = of the device-to-device copy bandwidth measured
in the same process. Imports neither lm-eval, wandb nor Hydra.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent

from harness.kernels.layers import gemv  # noqa: E402
from harness.measure import copy_bandwidth, graph_ms_per_call  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--rows", default="1,8")
    ap.add_argument("--copies", type=int, default=8)
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_gemv.py times GPU kernels: run it on the GPU machine")
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev, nbytes=4 << 30)
    h, d = args.hidden, args.head_dim
    shapes = {"qkv": ((args.heads + 2 * args.kv_heads) * d, h), "o": (h, args.heads * d),
              "gate_up": (2 * args.intermediate, h), "down": (h, args.intermediate), "lm_head": (args.vocab, h)}
    grid = list(itertools.product((16, 32, 64), (128, 256, 512), (4, 8), (3, 4, 5), (True, False)))
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s")
    print("| shape | N x K | rows | cublas us | cublas frac | gemv us | gemv frac | best gemv config |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    out = []
    for name, (N, K) in shapes.items():
        copies = 2 if name == "lm_head" else args.copies
        ws = [torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        nbytes = N * K * 2
        for B in map(int, args.rows.split(",")):
            x = torch.randn(B, K, device=dev, dtype=torch.bfloat16)
            t_cublas = graph_ms_per_call([functools.partial(torch.nn.functional.linear, x, w) for w in ws], args.iters)
            best = (float("inf"), None)
            for bn, bk, warps, stages, dot in grid:
                if not dot and (B != 1 or bn * bk > 16384):  # one row only; the fp32 tile must fit registers
                    continue
                try:
                    got = gemv(x, ws[0], block_n=bn, block_k=bk, num_warps=warps, num_stages=stages, use_dot=dot)
                    err = (got.float() - torch.nn.functional.linear(x, ws[0]).float()).abs().max().item()
                    if err > 0.05:
                        raise RuntimeError(f"wrong result: max abs err {err}")
                    cfg = dict(block_n=bn, block_k=bk, num_warps=warps, num_stages=stages, use_dot=dot)
                    t = graph_ms_per_call([functools.partial(gemv, x, w, **cfg) for w in ws], args.iters)
                except Exception as e:  # noqa: BLE001 - a configuration that cannot run (shared memory)
                    print(f"  {name} {B} {bn},{bk},{warps},{stages},{dot}: {type(e).__name__}: {str(e)[:80]}",
                          file=sys.stderr)
                    continue
                if t < best[0]:
                    best = (t, cfg)
            t_g, cfg = best
            f_c, f_g = nbytes / (t_cublas * 1e-3) / bw, nbytes / (t_g * 1e-3) / bw
            print(f"| {name} | {N} x {K} | {B} | {1000 * t_cublas:.1f} | {f_c:.2f} | {1000 * t_g:.1f} "
                  f"| {f_g:.2f} | {cfg} |", flush=True)
            out.append({"shape": name, "N": N, "K": K, "rows": B, "cublas_ms": t_cublas, "gemv_ms": t_g, "config": cfg})
        del ws
        torch.cuda.empty_cache()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
