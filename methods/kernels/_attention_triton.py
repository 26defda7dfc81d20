"""Triton kernels of :mod:`methods.kernels.attention` (imported on first use: Triton decides at import time
whether ``@triton.jit`` compiles or interprets, so ``TRITON_INTERPRET`` must be set before). Launchers,
references and documentation live in attention.py."""

import triton
import triton.language as tl


@triton.jit
def attend_tile(q, k_base, v_base, offs_n, n_ok, allowed, offs_d, m_i, l_i, acc, scale_log2, sks, skd, svs, svd,
                IEEE: tl.constexpr):
    """One tile of keys/values (rows ``offs_n``, loaded where ``n_ok``) into the online softmax of the
    query rows ``q``: scores where ``allowed`` (log2 units), running max ``m_i``, sum ``l_i``, ``acc``."""
    kk = tl.load(k_base + offs_n[:, None] * sks + offs_d[None, :] * skd, mask=n_ok[:, None], other=0.0)
    if IEEE:
        s = tl.dot(q, tl.trans(kk), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(kk))
    s = tl.where(allowed, s * scale_log2, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    vv = tl.load(v_base + offs_n[:, None] * svs + offs_d[None, :] * svd, mask=n_ok[:, None], other=0.0)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv)
    return m_new, l_i, acc


@triton.jit
def decode_split(Q, K, V, Lens, MidO, MidL, scale_log2, H_kv,
                 sqb, sqh, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
                 sob, soh, sos, sod, slb, slh, sls,
                 G: tl.constexpr, SPLIT: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                 D: tl.constexpr, IEEE: tl.constexpr):
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H_kv
    h = pid_bh % H_kv
    n_len = tl.load(Lens + b).to(tl.int32)
    lo = pid_s * SPLIT
    hi = tl.minimum(lo + SPLIT, n_len)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, D)
    g_ok = offs_g < G
    heads = h * G + offs_g
    q = tl.load(Q + b * sqb + heads[:, None] * sqh + offs_d[None, :] * sqd, mask=g_ok[:, None], other=0.0)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        m_i, l_i, acc = attend_tile(q, k_base, v_base, offs_n, n_ok, n_ok[None, :], offs_d, m_i, l_i, acc,
                                    scale_log2, sks, skd, svs, svd, IEEE)
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    tl.store(MidO + b * sob + heads[:, None] * soh + pid_s * sos + offs_d[None, :] * sod, out, mask=g_ok[:, None])
    tl.store(MidL + b * slb + heads * slh + pid_s * sls, lse, mask=g_ok)


@triton.jit
def decode_combine(MidO, MidL, Out, n_splits, H_q, sob, soh, sos, sod, slb, slh, sls, s_ob, s_oh, s_od,
                   NS: tl.constexpr, D: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // H_q
    hq = pid % H_q
    offs_s = tl.arange(0, NS)
    offs_d = tl.arange(0, D)
    s_ok = offs_s < n_splits
    lse = tl.load(MidL + b * slb + hq * slh + offs_s * sls, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.exp2(lse - m)  # empty ranges (lse -inf) weigh 0
    o = tl.load(MidO + b * sob + hq * soh + offs_s[:, None] * sos + offs_d[None, :] * sod, mask=s_ok[:, None],
                other=0.0)
    out = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
    tl.store(Out + b * s_ob + hq * s_oh + offs_d * s_od, out.to(Out.dtype.element_ty))


@triton.jit
def prefill(Q, K, V, Out, scale_log2, start, T, H_q,
            sqb, sqh, sqt, sqd, skb, skh, sks, skd, svb, svh, svs, svd, sob, sot, soh, sod,
            G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, IEEE: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H_q
    hq = pid_bh % H_q
    hk = hq // G
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query index within the chunk
    offs_d = tl.arange(0, D)
    m_ok = offs_m < T
    q = tl.load(Q + b * sqb + hq * sqh + offs_m[:, None] * sqt + offs_d[None, :] * sqd, mask=m_ok[:, None],
                other=0.0)
    q_slot = start + offs_m
    end = tl.minimum(start + (pid_m + 1) * BLOCK_M, start + T)  # keys this tile may see: slots < end
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    for n0 in range(0, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < end
        causal = n_ok[None, :] & (offs_n[None, :] <= q_slot[:, None])
        m_i, l_i, acc = attend_tile(q, k_base, v_base, offs_n, n_ok, causal, offs_d, m_i, l_i, acc,
                                    scale_log2, sks, skd, svs, svd, IEEE)
    out = acc / l_i[:, None]  # slot 0 is visible to every query: l_i > 0
    tl.store(Out + b * sob + offs_m[:, None] * sot + hq * soh + offs_d[None, :] * sod,
             out.to(Out.dtype.element_ty), mask=m_ok[:, None])
