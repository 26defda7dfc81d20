"""Micro-benchmark of the decode-attention kernels at a real model's shape (GPU machine).

    python -m scripts.bench_attention                      # Llama-3.1-8B heads: 32 query, 8 kv, dim 128, bf16
    python -m scripts.bench_attention --cells 1x32768,8x32768 --iters 50

For each cell (batch x context) one layer's K/V cache is filled with random values and one decode
step's attention is timed (CUDA events, median of ``--iters`` after warm-up) for:
- ``fused``: :func:`methods.kernels.attention.decode_attention` (flash-decoding, what ``full`` runs);
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` over exactly the valid slots with
  ``enable_gqa`` and no mask (torch's own decode kernel; a bound no masked path reaches);
- ``reference``: :func:`methods.stores.attend` over the preallocated capacity with the slot mask, the
  plain path of :class:`methods.stores.DenseStore`.
Bandwidth = K and V bytes of the valid slots (each kv head once) / time, and its fraction of the
device-to-device copy bandwidth measured in the same process. Prints a markdown table; with
``--out FILE`` also writes it there. Imports neither lm-eval, wandb nor Hydra.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent

from harness.measure import copy_bandwidth, graph_ms_per_call  # noqa: E402
from methods.kernels.attention import decode_attention, decode_attention_reference  # noqa: E402
from methods.stores import attend  # noqa: E402


def timed(fn, iters: int) -> float:
    """Device milliseconds of one ``fn()``: 10 calls captured in a CUDA graph (as the engine's decode step
    runs them), the graph replayed ``iters`` times, median per call."""
    return graph_ms_per_call([fn] * 10, iters)


def tune(cells: list[tuple[int, int]], H_q: int, H_kv: int, D: int, bw: float, iters: int) -> list[str]:
    """Time every decode-kernel configuration of a small grid on each cell; rows sorted by the geometric
    mean of the bandwidth fraction over the cells."""
    import functools
    import itertools
    import math

    dev = torch.device("cuda")
    data = []
    for B, S in cells:
        g = torch.Generator(device=dev).manual_seed(0)
        k = torch.randn(B, H_kv, S + 64, D, device=dev, dtype=torch.bfloat16, generator=g)
        v = torch.randn_like(k)
        q = torch.randn(B, H_q, D, device=dev, dtype=torch.bfloat16, generator=g)
        data.append((B, S, q, k, v, torch.full((B,), S, dtype=torch.long, device=dev)))
    results = []
    for block_n, warps, stages, per_sm in itertools.product((64, 128), (4, 8), (2, 3, 4), (2, 4, 8)):
        fracs = []
        for B, S, q, k, v, lengths in data:
            try:
                t = timed(functools.partial(decode_attention, q, k, v, lengths, scaling=D**-0.5, block_n=block_n,
                                            per_sm=per_sm, num_warps=warps, num_stages=stages), iters)
            except Exception as e:  # noqa: BLE001 - out of shared memory etc.: this configuration cannot run
                print(f"block_n={block_n} warps={warps} stages={stages}: {type(e).__name__}", flush=True)
                fracs = []
                break
            fracs.append(2 * B * H_kv * S * D * 2 / (t * 1e-3) / bw)
        if fracs:
            gm = math.exp(sum(math.log(f) for f in fracs) / len(fracs))
            results.append((gm, f"| {block_n} | {warps} | {stages} | {per_sm} | {gm:.3f} | "
                                + " | ".join(f"{f:.2f}" for f in fracs) + " |"))
    results.sort(reverse=True)
    head = ["| block_n | warps | stages | programs/SM | geo-mean frac | " + " | ".join(f"{B}x{S}" for B, S in cells) + " |",
            "|---:|---:|---:|---:|---:|" + "---:|" * len(cells)]
    return head + [r for _, r in results]


def bench_cell(B: int, S: int, H_q: int, H_kv: int, D: int, bw: float, iters: int, *, reference: bool) -> str:
    """One table row: batch B, S valid slots of a capacity S + 64 store."""
    dev = torch.device("cuda")
    cap = S + 64  # a store's capacity: context + decode slots
    g = torch.Generator(device=dev).manual_seed(0)
    k = torch.randn(B, H_kv, cap, D, device=dev, dtype=torch.bfloat16, generator=g)
    v = torch.randn(B, H_kv, cap, D, device=dev, dtype=torch.bfloat16, generator=g)
    q = torch.randn(B, H_q, D, device=dev, dtype=torch.bfloat16, generator=g)
    lengths = torch.full((B,), S, dtype=torch.long, device=dev)
    scale = D**-0.5
    kv_bytes = 2 * B * H_kv * S * D * 2
    t_fused = timed(lambda: decode_attention(q, k, v, lengths, scaling=scale), iters)
    ks, vs = k[:, :, :S], v[:, :, :S]
    t_sdpa = timed(lambda: torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None], ks, vs, scale=scale, enable_gqa=True), iters)
    t_ref = float("nan")
    if reference:
        mask = (torch.arange(cap, device=dev)[None, :] < lengths[:, None])[:, None, None, :]  # (B, 1, 1, S)
        t_ref = timed(lambda: attend(q[:, :, None], k, v, mask, scaling=scale), max(3, iters // 3))
    err = (decode_attention(q, k, v, lengths, scaling=scale).float()
           - decode_attention_reference(q, k, v, lengths, scaling=scale).float()).abs().max().item()

    def frac(t_ms: float) -> float:
        return kv_bytes / (t_ms * 1e-3) / bw

    return (f"| {B} | {S} | {1000 * t_fused:.1f} | {kv_bytes / (t_fused * 1e-3) / 1e12:.2f} | {frac(t_fused):.2f} "
            f"| {1000 * t_sdpa:.1f} | {frac(t_sdpa):.2f} | {1000 * t_ref:.1f} | {err:.1e} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cells", default="1x8192,1x32768,1x131072,8x8192,8x32768,32x8192",
                    help="batch x context, comma-separated")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--skip-reference", action="store_true", help="skip the masked reference path (slow at 128K)")
    ap.add_argument("--tune", action="store_true", help="sweep the decode kernel's tile/warps/stages/splits instead")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_attention.py needs a CUDA device (run it on the GPU machine)")
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev, nbytes=4 << 30)
    H_q, H_kv, D = args.heads, args.kv_heads, args.head_dim
    cells = [tuple(int(x) for x in c.lower().split("x")) for c in args.cells.split(",")]
    if args.tune:
        lines = tune(cells, H_q, H_kv, D, bw, args.iters)
        print("\n".join(lines[:25]), flush=True)
        if args.out:
            Path(args.out).write_text("\n".join(lines) + "\n")
        return 0
    lines = [
        f"decode attention, one layer, {H_q} query / {H_kv} kv heads of dim {D}, bf16, "
        f"{torch.cuda.get_device_name(dev)}, copy bandwidth {bw / 1e12:.2f} TB/s",
        "",
        "| batch | context | fused us | fused TB/s | fused frac | sdpa us | sdpa frac | reference us | max abs err |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    print("\n".join(lines), flush=True)
    for B, S in cells:
        row = bench_cell(B, S, H_q, H_kv, D, bw, args.iters, reference=not args.skip_reference)
        lines.append(row)
        print(row, flush=True)
        torch.cuda.empty_cache()
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
