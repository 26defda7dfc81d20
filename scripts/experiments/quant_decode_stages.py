"""Where a quantized decode kernel's time goes: the split kernel cut after each stage (GPU machine).

    python -m scripts.experiments.quant_decode_stages                       # 8 x 32768, Llama-3.1-8B heads
    KVBENCH_UNPACK=direct python -m scripts.experiments.quant_decode_stages --out $OUT/stages-direct.md

Issue 20's INT kernels take about the same time whatever their width (H100, e9d3ab8: INT4 g32 0.335 ms, QuaRot
INT4 0.313, INT2 0.345 for one layer at 8 x 32768, against 0.36 for the dense bf16 kernel reading 3-5x the bytes),
so they are bound by the work per element, not by the bytes. This times, in CUDA graphs on one layer's cache, the
split kernel of methods/kernels/_quant_attention_triton.py cut after each of its stages, built from the same
@triton.jit parts (so a stage costs here what it costs there):

- ``load``: the tiles' packed words, scales and zero points (summed as floats, so nothing is dropped: that sink
  costs about two instructions an element itself);
- ``unpack``: the codes in channel order (``_unpack``: the join tree, or direct with ``KVBENCH_UNPACK=direct``),
  summed likewise;
- ``operand``: the 16-bit dot operands (``_operand_tile`` with one group a vector, ``_values_dt`` with several:
  what ``_qk`` and ``_pv`` feed ``tl.dot``; with ``DECODE_CONFIG["fast16"]`` they come from the bytes four at a time,
  not through ``unpack``) and both dots, without the softmax (the weights are the raw scores);
- ``scores``: + the online softmax: the split kernel but for its scale, zero-point and store epilogue;
- ``split``: the production split kernel (``decode_split``, or ``decode_split_planar`` with ``--planar``).

Each line gives ms and the fraction of the copy bandwidth the bytes of the full kernel would need; ``split`` minus
``operand`` is the softmax's share, ``operand`` minus ``load`` the conversion's. The kernels issue more
instructions than their bytes need (``python -m tests.compile_check --quick --sass`` counts them per tile without a
GPU); this says which of those instructions cost time. The dense kernel ``full`` runs is timed beside.
"""

from __future__ import annotations

import argparse
import functools
import sys

import torch
import triton
import triton.language as tl

from methods.kernels import quant_attention as QA
from methods.kernels.attention import LOG2E, decode_attention, decode_splits
from methods.kernels.quant_attention import ScalarLayout

K = QA._kernels()
STAGES = ("load", "unpack", "operand", "scores")


@triton.jit
def stage_split(Q, KC, KS, KZ, VC, VS, VZ, Lens, Heads, Out, scale_log2, H_loc, split,
                sqb, sqh, sqd,
                kcb, kch, kcs: tl.constexpr, ksb, ksh, kss: tl.constexpr, kzb, kzh, kzs: tl.constexpr,
                vcb, vch, vcs: tl.constexpr, vsb, vsh, vss: tl.constexpr, vzb, vzh, vzs: tl.constexpr,
                G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
                K_NG: tl.constexpr, K_GS: tl.constexpr, K_FMT: tl.constexpr, K_BITS: tl.constexpr,
                K_CPW: tl.constexpr, K_WB: tl.constexpr, K_ZERO: tl.constexpr, K_MAGIC: tl.constexpr,
                K_MAGIC_BITS: tl.constexpr, KDT: tl.constexpr,
                V_NG: tl.constexpr, V_GS: tl.constexpr, V_FMT: tl.constexpr, V_BITS: tl.constexpr,
                V_CPW: tl.constexpr, V_WB: tl.constexpr, V_ZERO: tl.constexpr, V_MAGIC: tl.constexpr,
                V_MAGIC_BITS: tl.constexpr, VDT: tl.constexpr, IEEE: tl.constexpr, STAGE: tl.constexpr,
                FAST16: tl.constexpr):
    """decode_split's program (same grid and arguments) stopped after STAGE (0 load, 1 unpack, 2 operand,
    3 scores); writes one float per program so the compiler keeps every stage's work."""
    pid_s, b, j, h, lo, hi = K._split_range(Heads, Lens, H_loc, split, BLOCK_N)
    heads, g_ok, q, qsum = K._group_query(Q, b, h, sqb, sqh, sqd, G, BLOCK_G, D, KDT)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_N, D], tl.float32)  # the sink of the load and unpack stages
    out = tl.zeros([BLOCK_G, D], tl.float32)  # the value dot's accumulator (operand and scores stages)
    meta = tl.zeros([BLOCK_N], tl.float32)
    kc0, ks0, kz0 = KC + b * kcb + j * kch, KS + b * ksb + j * ksh, KZ + b * kzb + j * kzh
    vc0, vs0, vz0 = VC + b * vcb + j * vch, VS + b * vsb + j * vsh, VZ + b * vzb + j * vzh
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        wk, sk, zk = K._load_tile(kc0, ks0, kz0, offs_n, n_ok, kcs, kss, kzs, D, K_NG, K_CPW, K_WB, K_ZERO)
        wv, sv, zv = K._load_tile(vc0, vs0, vz0, offs_n, n_ok, vcs, vss, vzs, D, V_NG, V_CPW, V_WB, V_ZERO)
        if K_NG == 1:
            meta += sk + zk
        else:
            meta += tl.sum(sk + zk, 1)
        if V_NG == 1:
            meta += sv + zv
        else:
            meta += tl.sum(sv + zv, 1)
        if STAGE == 0:
            meta += tl.sum(wk.to(tl.float32), 1) + tl.sum(wv.to(tl.float32), 1)
        elif STAGE == 1:
            ck = K._unpack(wk, BLOCK_N, D, K_BITS, K_CPW)
            cv = K._unpack(wv, BLOCK_N, D, V_BITS, V_CPW)
            acc += (ck + cv).to(tl.float32)
        else:
            if K_NG == 1:
                kk = K._operand_tile(wk, BLOCK_N, D, K_FMT, K_BITS, K_CPW, K_MAGIC, K_MAGIC_BITS, KDT, FAST16)
            else:
                kk = K._values_dt(wk, sk, zk, BLOCK_N, D, K_NG, K_GS, K_FMT, K_BITS, K_CPW, K_ZERO, K_MAGIC_BITS, KDT,
                                  FAST16)
            if V_NG == 1:
                vv = K._operand_tile(wv, BLOCK_N, D, V_FMT, V_BITS, V_CPW, V_MAGIC, V_MAGIC_BITS, VDT, FAST16)
            else:
                vv = K._values_dt(wv, sv, zv, BLOCK_N, D, V_NG, V_GS, V_FMT, V_BITS, V_CPW, V_ZERO, V_MAGIC_BITS, VDT,
                                  FAST16)
            s = K._dot(q, tl.trans(kk), IEEE)  # (BLOCK_G, BLOCK_N)
            if STAGE == 2:  # both dots, no softmax: the weights are the scores themselves
                p = s
            else:
                s = tl.where(n_ok[None, :], s * scale_log2, float("-inf"))
                m_i, alpha, p, l_i = K._online(s, m_i, l_i)
                out = out * alpha[:, None]
            out += K._dot(p.to(VDT), vv, IEEE)
    total = tl.sum(tl.sum(acc, 1) + meta, 0) + tl.sum(tl.where(g_ok, l_i + qsum + tl.sum(out, 1), 0.0), 0)
    tl.store(Out + pid_s * tl.num_programs(1) + tl.program_id(1), total)


def run_stage(stage: int, q, kf, vf, lengths, *, layout: ScalarLayout, n_splits: int, block_n: int, config: dict):
    """One launch of :func:`stage_split` with the arguments scalar_decode_split would give decode_split."""
    B, H_q, D = q.shape
    kc, ks, kz = kf
    vc, vs, vz = vf
    H_kv, S = kc.shape[1], kc.shape[2]
    split = QA._round_up(-(-S // n_splits), block_n)
    dt, mag, bits, ieee = QA._dot_type(layout, ks.dtype)
    out = torch.empty(n_splits * B * H_kv, dtype=torch.float32, device=q.device)
    heads = torch.arange(H_kv, dtype=torch.int32, device=q.device)
    st = QA._strides3
    stage_split[(n_splits, B * H_kv)](
        q, kc, ks, kz if kz is not None else ks, vc, vs, vz if vz is not None else vs, lengths, heads, out,
        float(D**-0.5) * LOG2E, H_kv, split, *q.stride(),
        *st(kc, kc), *st(ks, ks), *st(kz, ks), *st(vc, vc), *st(vs, vs), *st(vz, vs),
        G=H_q // H_kv, BLOCK_G=16, BLOCK_N=block_n, D=D,
        **layout.consts("K", D, dt, mag, bits), **layout.consts("V", D, dt, mag, bits), IEEE=ieee, STAGE=stage,
        FAST16=bool(config.get("fast16")), num_warps=config["num_warps"], num_stages=config["num_stages"])
    return out


LAYOUTS = {"uniform_int4 g32": ScalarLayout("int", 4, 32), "quarot4 (g128)": ScalarLayout("int", 4, 128, 0.95),
           "uniform_int2 g32": ScalarLayout("int", 2, 32), "fp8": ScalarLayout("fp8", 8, 128)}


def main(argv: list[str] | None = None) -> int:
    from harness.measure import copy_bandwidth, graph_ms_per_call
    from scripts.bench.common import emit_lines
    from scripts.bench_quant_attention import fields, nbytes

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cell", default="8x32768")
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--heads", default="32,8,128", help="query heads, kv heads, head dim")
    ap.add_argument("--planar", action="store_true", help="the split stage runs decode_split_planar (INT4)")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    H_q, H_kv, D = (int(x) for x in args.heads.split(","))
    B, S = (int(x) for x in args.cell.split("x"))
    bw = copy_bandwidth(dev, nbytes=2 << 30)
    cfg = dict(QA.DECODE_CONFIG, planar=args.planar)
    QA.DECODE_CONFIG.update(cfg)
    bn = cfg["block_n"]
    lines = [f"# Quantized decode split kernel by stage, {torch.cuda.get_device_name(0)}, {args.cell}, heads "
             f"{H_q}/{H_kv}/{D}, bf16; copy bandwidth {bw / 1e12:.2f} TB/s; unpacking {K._UNPACK}; config "
             f"{cfg}", "", "| layout | stage | ms | frac of copy bw |", "|---|---|---:|---:|"]
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(B, H_q, D, device=dev, dtype=torch.bfloat16, generator=g)
    lengths = torch.full((B,), S, dtype=torch.long, device=dev)
    k = torch.randn(B, H_kv, S, D, device=dev, dtype=torch.bfloat16, generator=g)
    v = torch.randn_like(k)
    t = graph_ms_per_call([functools.partial(decode_attention, q, k, v, lengths, scaling=D**-0.5)] * 10, args.iters)
    lines.append(f"| dense bf16 (full) | decode_attention | {t:.3f} | {2 * k.numel() * 2 / t / 1e-3 / bw:.2f} |")
    print(lines[-1], flush=True)
    ns = decode_splits(B, H_kv, S, dev, bn, cfg["per_sm"])
    split = QA._round_up(-(-S // ns), bn)
    ns = -(-S // split)
    for name in [n for n in args.layouts.split(",") if n]:
        lay = LAYOUTS[name]
        kf, vf = fields(lay, k), fields(lay, v)
        read = nbytes(kf, S) + nbytes(vf, S)
        for i, stage in enumerate(STAGES):
            fn = functools.partial(run_stage, i, q, kf, vf, lengths, layout=lay, n_splits=ns, block_n=bn, config=cfg)
            try:
                t = graph_ms_per_call([fn] * 10, args.iters)
                lines.append(f"| {name} | {stage} | {t:.3f} | {read / t / 1e-3 / bw:.2f} |")
            except Exception as e:  # noqa: BLE001 - a stage that does not compile is listed
                lines.append(f"| {name} | {stage} | failed: {type(e).__name__}: {str(e)[:100]} | |")
            print(lines[-1], flush=True)
        mid_o = torch.empty(B, H_q, ns, D, dtype=torch.float32, device=dev)
        mid_l = torch.empty(B, H_q, ns, dtype=torch.float32, device=dev)
        heads = torch.arange(H_kv, dtype=torch.int32, device=dev)
        fn = functools.partial(QA.scalar_decode_split, q, kf, vf, lengths, mid_o, mid_l, heads, group=H_q // H_kv,
                               k_layout=lay, v_layout=lay, scaling=D**-0.5, n_splits=ns, block_n=bn)
        t = graph_ms_per_call([fn] * 10, args.iters)
        kind = "decode_split_planar" if QA._planar(lay, lay, D) else "decode_split"
        lines.append(f"| {name} | split ({kind}) | {t:.3f} | {read / t / 1e-3 / bw:.2f} |")
        print(lines[-1], flush=True)
        del kf, vf
    return emit_lines(lines, args.out)


if __name__ == "__main__":
    sys.exit(main())
