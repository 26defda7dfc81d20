"""Triton kernels of :mod:`methods.kernels.ragged_attention` and :mod:`methods.kernels.scoring` (imported on first
use: Triton decides at import time whether ``@triton.jit`` compiles or interprets, so ``TRITON_INTERPRET`` must
be set before). Launchers, references and documentation live in those two modules.

Scores are kept in log2 units (``s * scaling * log2(e)``) and exponentiated with ``exp2``, as the dense kernels
of :mod:`methods.kernels.attention` do; a log-sum-exp ``lse`` here is ``m + log2(l)`` in the same units.
"""

import triton
import triton.language as tl

BIG_IDX = tl.constexpr(2**30)  # "no slot" in the eviction arg-min; compiled kernels read only constexpr globals


# --------------------------------------------------------------------------------------------------
# Decode over the ragged flat buffer


@triton.jit
def ragged_split(Q, K, V, Offs, NVis, MidO, MidL, Logits, scale_log2, H_kv,
                 sqb, sqh, sqd, skn, skd, svn, svd,
                 sob, soh, sos, sod, slb, slh, sls, sgn, sgg,
                 G: tl.constexpr, SPLIT: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                 D: tl.constexpr, IEEE: tl.constexpr, WRITE_LOGITS: tl.constexpr):
    """Program (range r, segment s = b * H_kv + h): slots ``[r SPLIT, (r + 1) SPLIT)`` of the segment that are
    visible (below ``NVis[s]``), read once for the kv head's whole query group; partial output and lse per
    query head. With ``WRITE_LOGITS`` each visible slot's score per query head goes to ``Logits (N, G)``."""
    pid_r = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = pid_s // H_kv
    h = pid_s % H_kv
    off = tl.load(Offs + pid_s).to(tl.int64)
    n_vis = tl.load(NVis + pid_s).to(tl.int32)
    lo = pid_r * SPLIT
    hi = tl.minimum(lo + SPLIT, n_vis)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, D)
    g_ok = offs_g < G
    heads = h * G + offs_g
    q = tl.load(Q + b * sqb + heads[:, None] * sqh + offs_d[None, :] * sqd, mask=g_ok[:, None], other=0.0)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    k_base = K + off * skn
    v_base = V + off * svn
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        kk = tl.load(k_base + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=n_ok[:, None], other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(kk), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(kk))
        s = tl.where(n_ok[None, :], s * scale_log2, float("-inf"))  # (BLOCK_G, BLOCK_N)
        if WRITE_LOGITS:
            tl.store(Logits + (off + offs_n[None, :]) * sgn + offs_g[:, None] * sgg, s,
                     mask=g_ok[:, None] & n_ok[None, :])
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vv = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=n_ok[:, None], other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv)
        m_i = m_new
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    tl.store(MidO + b * sob + heads[:, None] * soh + pid_r * sos + offs_d[None, :] * sod, out, mask=g_ok[:, None])
    tl.store(MidL + b * slb + heads * slh + pid_r * sls, lse, mask=g_ok)


@triton.jit
def ragged_combine(MidO, MidL, Out, Lse, n_ranges, H_q, sob, soh, sos, sod, slb, slh, sls, s_ob, s_oh, s_od,
                   s_lb, s_lh, NR: tl.constexpr, D: tl.constexpr):
    """Program (b, query head): merge the ranges' partial outputs; the final lse (log2 units) goes to ``Lse``."""
    pid = tl.program_id(0)
    b = pid // H_q
    hq = pid % H_q
    offs_r = tl.arange(0, NR)
    offs_d = tl.arange(0, D)
    r_ok = offs_r < n_ranges
    lse = tl.load(MidL + b * slb + hq * slh + offs_r * sls, mask=r_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.exp2(lse - m)  # ranges past the segment (lse -inf) weigh 0
    o = tl.load(MidO + b * sob + hq * soh + offs_r[:, None] * sos + offs_d[None, :] * sod, mask=r_ok[:, None],
                other=0.0)
    tot = tl.sum(w, 0)
    out = tl.sum(o * w[:, None], 0) / tot
    tl.store(Out + b * s_ob + hq * s_oh + offs_d * s_od, out.to(Out.dtype.element_ty))
    tl.store(Lse + b * s_lb + hq * s_lh, m + tl.log2(tot))


@triton.jit
def ragged_update(Logits, Lse, Score, Pos, Offs, NVis, Valid, PosLim, MidMin, MidIdx, n_sink, H_kv,
                  sgn, sgg, s_lb, s_lh, smm, smr,
                  G: tl.constexpr, SPLIT: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                  REDUCE: tl.constexpr, ACCUM: tl.constexpr, EVICT: tl.constexpr):
    """Program (range r, segment s), after the attention of a decode step, over the same slots:
    - ``ACCUM``: each visible slot's score gains the attention the step's queries paid it, the query heads of the
      group combined by ``REDUCE`` (0 mean, 1 max, 2 sum), in rows still generating (``Valid[b]``);
    - ``EVICT``: the range's lowest score among eviction candidates (visible, position <= ``PosLim[s]``, position
      >= ``n_sink``) and its first slot, to ``MidMin``/``MidIdx`` (s, r); the launcher picks the segment's."""
    pid_r = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = pid_s // H_kv
    h = pid_s % H_kv
    off = tl.load(Offs + pid_s).to(tl.int64)
    n_vis = tl.load(NVis + pid_s).to(tl.int32)
    ok = tl.load(Valid + b).to(tl.int32) != 0
    lo = pid_r * SPLIT
    hi = tl.minimum(lo + SPLIT, n_vis)
    offs_g = tl.arange(0, BLOCK_G)
    g_ok = offs_g < G
    if ACCUM:
        lse = tl.load(Lse + b * s_lb + (h * G + offs_g) * s_lh, mask=g_ok, other=0.0)
    if EVICT:
        lim = tl.load(PosLim + pid_s)
    best = tl.min(tl.full([BLOCK_N], float("inf"), tl.float32), 0)
    best_idx = tl.min(tl.full([BLOCK_N], BIG_IDX, tl.int32), 0)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        sc = tl.load(Score + off + offs_n, mask=n_ok, other=0.0)
        if ACCUM:
            lg = tl.load(Logits + (off + offs_n[:, None]) * sgn + offs_g[None, :] * sgg,
                         mask=n_ok[:, None] & g_ok[None, :], other=float("-inf"))
            p = tl.exp2(lg - lse[None, :])  # (BLOCK_N, BLOCK_G), 0 for padded heads
            if REDUCE == 1:
                gain = tl.max(p, 1)
            elif REDUCE == 2:
                gain = tl.sum(p, 1)
            else:
                gain = tl.sum(p, 1) / G
            sc = sc + tl.where(ok, gain, 0.0)
            tl.store(Score + off + offs_n, sc, mask=n_ok)  # rows not generating write back what they had
        if EVICT:
            pos = tl.load(Pos + off + offs_n, mask=n_ok, other=0)
            cand = n_ok & (pos <= lim) & (pos >= n_sink)
            key = tl.where(cand, sc, float("inf"))
            bmin = tl.min(key, 0)
            bidx = tl.min(tl.where(cand & (key == bmin), offs_n, BIG_IDX), 0)
            take = bmin < best
            best_idx = tl.where(take, bidx, best_idx)
            best = tl.where(take, bmin, best)
    if EVICT:
        tl.store(MidMin + pid_s * smm + pid_r * smr, best)
        tl.store(MidIdx + pid_s * smm + pid_r * smr, best_idx)


# --------------------------------------------------------------------------------------------------
# Prefill-time scoring


@triton.jit
def prefill_lse(Q, K, V, Out, Lse, scale_log2, start, T, H_q,
                sqb, sqh, sqt, sqd, skb, skh, sks, skd, svb, svh, svs, svd, sob, sot, soh, sod, s_lb, s_lh, s_lt,
                G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
                IEEE: tl.constexpr):
    """Causal chunk attention (queries at slots start..start+T-1 over slots 0..start+T-1, rows aligned), as
    :func:`methods.kernels.attention.prefill_attention`, also writing each query's lse (log2 units)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H_q
    hq = pid_bh % H_q
    hk = hq // G
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    m_ok = offs_m < T
    q = tl.load(Q + b * sqb + hq * sqh + offs_m[:, None] * sqt + offs_d[None, :] * sqd, mask=m_ok[:, None],
                other=0.0)
    q_slot = start + offs_m
    end = tl.minimum(start + (pid_m + 1) * BLOCK_M, start + T)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    for n0 in range(0, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < end
        kk = tl.load(k_base + offs_n[:, None] * sks + offs_d[None, :] * skd, mask=n_ok[:, None], other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(kk), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(kk))
        allowed = n_ok[None, :] & (offs_n[None, :] <= q_slot[:, None])
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
        m_i = m_new
    out = acc / l_i[:, None]  # slot 0 is visible to every query
    tl.store(Out + b * sob + offs_m[:, None] * sot + hq * soh + offs_d[None, :] * sod,
             out.to(Out.dtype.element_ty), mask=m_ok[:, None])
    tl.store(Lse + b * s_lb + hq * s_lh + offs_m * s_lt, m_i + tl.log2(l_i), mask=m_ok)


@triton.jit
def mass_accumulate(Q, K, Lse, Mass, scale_log2, start, T, H_q,
                    sqb, sqh, sqt, sqd, skb, skh, sks, skd, s_lb, s_lh, s_lt, smb, smh, sms,
                    G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
                    IEEE: tl.constexpr):
    """Program (key tile, b * H_q + query head): the attention each key of the tile receives from the chunk's
    queries that see it (slot <= the query's), ``exp2(s - lse)`` summed over the queries, added to ``Mass``.
    Keys are loaded once; query tiles stream (the transpose of flash attention's loop, as in its backward)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H_q
    hq = pid_bh % H_q
    hk = hq // G
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    n_ok = offs_n < start + T
    kk = tl.load(K + b * skb + hk * skh + offs_n[:, None] * sks + offs_d[None, :] * skd, mask=n_ok[:, None],
                 other=0.0)
    acc = tl.zeros([BLOCK_N], tl.float32)
    first = tl.maximum(pid_n * BLOCK_N - start, 0)  # the first query that can see a key of this tile
    m_lo = (first // BLOCK_M) * BLOCK_M
    for m0 in range(m_lo, T, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < T
        q = tl.load(Q + b * sqb + hq * sqh + offs_m[:, None] * sqt + offs_d[None, :] * sqd, mask=m_ok[:, None],
                    other=0.0)
        lse = tl.load(Lse + b * s_lb + hq * s_lh + offs_m * s_lt, mask=m_ok, other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(kk), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(kk))
        allowed = m_ok[:, None] & n_ok[None, :] & (offs_n[None, :] <= start + offs_m[:, None])
        p = tl.where(allowed, tl.exp2(s * scale_log2 - lse[:, None]), 0.0)
        acc += tl.sum(p, 0)
    ptr = Mass + b * smb + hq * smh + offs_n * sms
    old = tl.load(ptr, mask=n_ok, other=0.0)
    tl.store(ptr, old + acc, mask=n_ok)


@triton.jit
def ragged_append(Knew, Vnew, K, V, Offs, Hwm, Hole, NVis, Valid, Seen, Positions, Pos, Score, ScoreNew, NRecent,
                  PosLim, H_kv, skb, skh, skd, svb, svh, svd, sKn, sKd, sVn, sVd, s_pb,
                  D: tl.constexpr, POS: tl.constexpr, SCORE: tl.constexpr, SCORE_NEW: tl.constexpr,
                  EVICT: tl.constexpr):
    """Program (segment s = b * H_kv + h) of a decode step's bookkeeping: the new token goes to the segment's hole
    (a slot the last eviction freed) or its high-water mark, with its position and starting score; ``NVis[s]`` = the
    visible prefix (kept tokens and the new one); the high-water mark and the hole advance for rows still
    generating (``Valid``), and their ``Seen`` counts the token; ``PosLim[s]`` = the newest position eviction may
    free (position - protected recent window)."""
    s = tl.program_id(0)
    b = s // H_kv
    h = s % H_kv
    ok = tl.load(Valid + b).to(tl.int32) != 0
    hole = tl.load(Hole + s)
    hwm = tl.load(Hwm + s)
    free = hole < 0
    rel = tl.where(free, hwm, hole)
    dest = tl.load(Offs + s) + rel  # int64
    offs_d = tl.arange(0, D)
    kk = tl.load(Knew + b * skb + h * skh + offs_d * skd)
    vv = tl.load(Vnew + b * svb + h * svh + offs_d * svd)
    tl.store(K + dest * sKn + offs_d * sKd, kk.to(K.dtype.element_ty))
    tl.store(V + dest * sVn + offs_d * sVd, vv.to(V.dtype.element_ty))
    p = tl.load(Positions + b * s_pb)
    if POS:
        tl.store(Pos + dest, p.to(Pos.dtype.element_ty))
    if SCORE:
        if SCORE_NEW:
            tl.store(Score + dest, tl.load(ScoreNew + s).to(tl.float32))
        else:
            tl.store(Score + dest, 0.0)
    if EVICT:
        tl.store(PosLim + s, p - tl.load(NRecent + s))
    tl.store(NVis + s, hwm + free.to(hwm.dtype))
    tl.store(Hwm + s, hwm + (free & ok).to(hwm.dtype))
    tl.store(Hole + s, tl.where(ok, -1, hole))
    if h == 0:
        tl.store(Seen + b, tl.load(Seen + b) + ok.to(tl.int64))


@triton.jit
def ragged_evict(MidMin, MidIdx, Valid, Hwm, Hole, Seen, Base, n_ranges, H_kv, keep_num, keep_den, smm, smr,
                 NR: tl.constexpr):
    """Program (segment s), last of an evicting decode step: the segment's first lowest-score candidate over the
    ranges of :func:`ragged_update`; the budget ``Base[s] + keep(Seen[b])`` with ``keep(n)`` the budget function
    (round half up of n x keep_num / keep_den, at least 1, at most n); a segment of a row still generating that holds
    more than its budget frees that slot (``Hole[s]``: the next token takes it)."""
    s = tl.program_id(0)
    b = s // H_kv
    offs_r = tl.arange(0, NR)
    r_ok = offs_r < n_ranges
    mins = tl.load(MidMin + s * smm + offs_r * smr, mask=r_ok, other=float("inf"))
    idx = tl.load(MidIdx + s * smm + offs_r * smr, mask=r_ok, other=BIG_IDX)
    low = tl.min(mins, 0)
    first = tl.min(tl.where((mins == low) & (idx < BIG_IDX), idx, BIG_IDX), 0)
    n = tl.load(Seen + b)
    kept = (2 * n * keep_num + keep_den) // (2 * keep_den)
    kept = tl.minimum(tl.maximum(kept, 1), n)
    kept = tl.where(n > 0, kept, 0)
    budget = tl.load(Base + s) + kept
    hole = tl.load(Hole + s)
    n_occ = tl.load(Hwm + s) - (hole >= 0).to(tl.int64)
    ok = tl.load(Valid + b).to(tl.int32) != 0
    evict = ok & (n_occ > budget) & (first < BIG_IDX)
    tl.store(Hole + s, tl.where(evict, first.to(tl.int64), hole))
