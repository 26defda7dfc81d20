"""Micro-benchmark of the KIVI and TurboQuant decode kernels (methods/kernels/kivi_attention.py,
turboquant_attention.py) at a real model's shape, beside the dense kernel ``full`` runs (GPU machine).

    python -m scripts.bench_kivi_turboquant                       # Llama-3.1-8B heads, 1x32768 and 8x32768, bf16
    python -m scripts.bench_kivi_turboquant --cells 8x32768 --configs 2:4:2,4:8:2,8:4:3 --out results/x.md

For each cell (batch x context) one layer's cache holds random codes (timing does not depend on the values),
and one decode step is timed in a CUDA graph (median of ``--iters``), in two parts: ``attn`` (what reads the
cache: for TurboQuant the query rotation, split and combine launches; for KIVI split and combine) and
``append`` (the step's writes: for KIVI at a length where the key window fills, the most expensive step).
Bandwidth = the bytes attention must read (codes, metadata and rings of the valid slots, each kv head once) /
attn time, as a fraction of the copy bandwidth measured in the same process; ``x dense`` = attn time over the
dense bf16 kernel's at the same cell. Before timing, each kernel is checked against its plain-torch reference
at 2048 slots (max abs error). ``--configs per_sm:num_warps:num_stages,...`` times other launch configurations
(a fourth field sets TurboQuant's tile of slots); hand the best to python -m scripts.bench with
``KVBENCH_KIVI_DECODE`` / ``KVBENCH_TURBOQUANT_DECODE`` (JSON, e.g. '{"per_sm": 2, "num_warps": 8}'). Imports
neither lm-eval, wandb nor Hydra.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent

from harness.measure import copy_bandwidth, graph_ms_per_call  # noqa: E402
from methods.kernels import kivi_attention as KA  # noqa: E402
from methods.kernels import turboquant_attention as TA  # noqa: E402
from methods.kernels.attention import decode_attention  # noqa: E402
from methods.quantizers import TurboQuantizer  # noqa: E402
from scripts.bench.common import emit_lines  # noqa: E402

KIVI = {"kivi4": (4, 4), "kivi2": (2, 2), "kivi3": (3, 3)}
TURBO = {"turboquant_kv4": ((4, 0), (4, 0)), "turboquant_kqv4": ((4, 0), (3, 128)),
         "turboquant_qkqv4": ((3, 128), (3, 128)), "turboquant_kqv2": ((2, 0), (1, 128))}


def kivi_fields(bits, B, H, D, G, R, S, dev):
    g = torch.Generator(device=dev).manual_seed(0)
    kb, vb = bits
    bf = dict(device=dev, dtype=torch.bfloat16)
    u8 = dict(device=dev, dtype=torch.uint8, generator=g)
    return {"k_codes": torch.randint(0, 256, (B, H, S // G, D * G * kb // 8), **u8),
            "k_scale": torch.rand(B, H, S // G, D, generator=g, **bf) * 0.2,
            "k_zero": torch.randn(B, H, S // G, D, generator=g, **bf),
            "k_res": torch.randn(B, H, R, D, generator=g, **bf),
            "v_codes": torch.randint(0, 256, (B, H, S, D * vb // 8), **u8),
            "v_scale": torch.rand(B, H, S, D // G, generator=g, **bf) * 0.2,
            "v_zero": torch.randn(B, H, S, D // G, generator=g, **bf),
            "v_res": torch.randn(B, H, R, D, generator=g, **bf)}


def turbo_fields(codec, B, H, S, dev):
    g = torch.Generator(device=dev).manual_seed(0)
    out = {}
    for name, (n, dt) in codec.fields(codec.dim).items():
        if dt == torch.uint8:
            out[name] = torch.randint(0, 256, (B, H, S, n), device=dev, dtype=torch.uint8, generator=g)
        else:
            out[name] = torch.rand(B, H, S, n, device=dev, dtype=torch.bfloat16, generator=g) + 0.5
    return out


def read_bytes(fields: dict, S: int, per_group: tuple[str, ...] = (), G: int = 1) -> int:
    """Bytes of the first S slots of each field (fields counted per group of G slots: S / G entries)."""
    total = 0
    for name, t in fields.items():
        if name.endswith("_res"):
            total += t.numel() * t.element_size()
            continue
        n = S // G if name in per_group else S
        total += t[:, :, :n].numel() * t.element_size()
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cells", default="1x32768,8x32768")
    ap.add_argument("--kernels", default=",".join([*KIVI, *TURBO]))
    ap.add_argument("--configs", default="",
                    help="per_sm:num_warps:num_stages[:block_n] to time besides the default (block_n: TurboQuant's tile)")
    ap.add_argument("--heads", default="32,8,128", help="query heads, kv heads, head dim")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    H_q, H, D = (int(x) for x in args.heads.split(","))
    G, R = 32, 128
    bw = copy_bandwidth(dev, nbytes=2 << 30)
    names = [n for n in args.kernels.split(",") if n]
    configs = [None] + [tuple(int(x) for x in c.split(":")) for c in args.configs.split(",") if c]
    lines = [f"# KIVI / TurboQuant decode attention, {torch.cuda.get_device_name(0)}, heads {H_q}/{H}/{D}, bf16; "
             f"copy bandwidth {bw / 1e12:.2f} TB/s", "",
             "| cell | kernel | config (per_sm:warps:stages) | attn ms | x dense | append ms | GB read | frac of copy bw "
             "| max abs err vs reference |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    defaults = {m: dict(m.DECODE_CONFIG) for m in (KA, TA)}
    for cell in args.cells.split(","):
        B, S = (int(x) for x in cell.split("x"))
        cap = (-(-(S + 64) // R) + 1) * R  # a KIVI store's slots: capacity rounded up to R, one spare block
        g = torch.Generator(device=dev).manual_seed(0)
        q = torch.randn(B, H_q, D, device=dev, dtype=torch.bfloat16, generator=g)
        kn, vn = torch.randn(2, B, H, D, device=dev, dtype=torch.bfloat16, generator=g)
        lengths = torch.full((B,), S, dtype=torch.long, device=dev)
        small = torch.full((B,), min(S, 2048), dtype=torch.long, device=dev)
        small[0] = min(S, 2048) - 37
        k = torch.randn(B, H, S + 64, D, device=dev, dtype=torch.bfloat16, generator=g)
        t_dense = graph_ms_per_call([functools.partial(decode_attention, q, k, k, lengths, scaling=D**-0.5)] * 10,
                                    args.iters)
        dense_read = 2 * B * H * S * D * 2
        lines.append(f"| {cell} | dense bf16 (full) | default | {t_dense:.3f} | 1.00 | | {dense_read / 1e9:.2f} "
                     f"| {dense_read / t_dense / 1e-3 / bw:.2f} | |")
        print(lines[-1], flush=True)
        del k
        for name in names:
            if name in KIVI:
                bits = KIVI[name]
                f = kivi_fields(bits, B, H, D, G, R, cap, dev)
                kw = dict(k_bits=bits[0], v_bits=bits[1], group_size=G, residual_length=R)
                fl = [f[n] for n in KA.FIELDS]
                want = KA.kivi_decode_attention_reference(q, *fl, small, kn, vn, scaling=D**-0.5, **kw)
                got = KA.kivi_decode_attention(q, *fl, small, kn, vn, scaling=D**-0.5, **kw)
                attn = functools.partial(KA.kivi_decode_attention, q, *fl, lengths, kn, vn, scaling=D**-0.5, **kw)
                full_len = torch.full((B,), (S // R) * R + R - 1, dtype=torch.long, device=dev)  # the window fills
                valid = torch.ones(B, dtype=torch.bool, device=dev)
                append = functools.partial(KA.kivi_append, kn, vn, f, full_len, valid, **kw)
                read = read_bytes(f, S, per_group=("k_codes", "k_scale", "k_zero"), G=G)
                mod = KA
            else:
                (kb, km), (vb, vm) = TURBO[name]
                kc = TurboQuantizer(dim=D, mse_bits=kb, qjl_dim=km, seed=1, device=dev, dtype=torch.bfloat16)
                vc = TurboQuantizer(dim=D, mse_bits=vb, qjl_dim=vm, seed=2, device=dev, dtype=torch.bfloat16)
                kf, vf = turbo_fields(kc, B, H, S + 64, dev), turbo_fields(vc, B, H, S + 64, dev)
                kw = dict(k_codec=kc, v_codec=vc)
                want = TA.turboquant_decode_attention_reference(
                    q, {n: t[:, :, :2048] for n, t in kf.items()}, {n: t[:, :, :2048] for n, t in vf.items()},
                    small, kn, vn, scaling=D**-0.5, **kw)
                got = TA.turboquant_decode_attention(q, kf, vf, small, kn, vn, scaling=D**-0.5, **kw)
                attn = functools.partial(TA.turboquant_decode_attention, q, kf, vf, lengths, kn, vn, scaling=D**-0.5,
                                         **kw)
                append = functools.partial(TA.turboquant_append, kn, vn, kf, vf, lengths, **kw)
                read = read_bytes(kf, S) + read_bytes(vf, S)
                mod = TA
            err = float((got.float() - want.float()).abs().max())
            t_append = graph_ms_per_call([append] * 10, args.iters)
            for cfg in configs:
                if cfg is not None:
                    mod.DECODE_CONFIG.update(per_sm=cfg[0], num_warps=cfg[1], num_stages=cfg[2])
                    if len(cfg) > 3 and mod is TA:
                        mod.DECODE_CONFIG.update(block_n=cfg[3])
                label = "default" if cfg is None else ":".join(map(str, cfg))
                try:
                    t = graph_ms_per_call([attn] * 10, args.iters)
                    lines.append(f"| {cell} | {name} | {label} | {t:.3f} | {t / t_dense:.2f} | {t_append:.3f} "
                                 f"| {read / 1e9:.2f} | {read / t / 1e-3 / bw:.2f} | {err:.2e} |")
                except Exception as e:  # noqa: BLE001 - a configuration that does not launch is listed
                    lines.append(f"| {cell} | {name} | {label} | failed: {type(e).__name__}: {str(e)[:80]} | | | | | |")
                finally:
                    mod.DECODE_CONFIG.clear()
                    mod.DECODE_CONFIG.update(defaults[mod])
                print(lines[-1], flush=True)
            del attn, append
            torch.cuda.empty_cache()
    return emit_lines(lines, args.out)


if __name__ == "__main__":
    sys.exit(main())
