"""Triton kernels of :mod:`methods.kernels.sparse_attention` (imported on first use: Triton decides at import time
whether ``@triton.jit`` compiles or interprets, so ``TRITON_INTERPRET`` must be set before). Launchers, references
and documentation live in sparse_attention.py."""

import triton
import triton.language as tl

# GATE (sparse_split): 0 = pages (a slot is read where its page's bit for the query head is set), 1 = grid (where
# the key's grid bound reaches the query head's threshold), 2 = dense (every slot). Module globals stay out of the
# kernels: compiled Triton reads a global only if it is a tl.constexpr instance.


@triton.jit
def _sortable(x):
    """fp32 -> int64 whose order is the floats' order (the bit pattern, negatives' magnitude bits flipped)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)


@triton.jit
def _kth_key(key, k, BITS: tl.constexpr):
    """The k-th largest of the 1-D int64 ``key`` (from _sortable; entries at -2**31 never count): a radix search
    over the 2**32 key values, BITS bits a round (2**BITS counts a round, 32 / BITS rounds). k >= 1 and at most
    the number of real entries."""
    R: tl.constexpr = 1 << BITS
    offs_r = tl.arange(0, R).to(tl.int64)
    lo = tl.sum(key * 0, 0) - 2147483648  # count(key >= lo) = everything
    for rnd in tl.static_range(32 // BITS):
        shift = 32 - BITS * (rnd + 1)
        c = lo + (offs_r << shift)  # (R,) candidate thresholds above lo
        cnt = tl.sum((key[None, :] >= c[:, None]).to(tl.int64), 1)  # (R,)
        j = tl.max(tl.where(cnt >= k, offs_r, 0), 0)  # the largest candidate that keeps k keys
        lo = lo + (j << shift)
    return lo


@triton.jit
def _online_tile(q, k_base, v_base, offs_n, rows, allowed, offs_d, m_i, l_i, acc, scale_log2, sks, skd, svs, svd,
                 IEEE: tl.constexpr):
    """Online softmax of the query rows ``q`` (BLOCK_G, D) over the key rows ``offs_n``: K/V are loaded only where
    ``rows`` (masked loads move no bytes elsewhere); scores count where ``allowed`` (BLOCK_G, BLOCK_N). A query row
    that sees no key of this tile keeps its state (no -inf - -inf)."""
    kk = tl.load(k_base + offs_n[:, None] * sks + offs_d[None, :] * skd, mask=rows[:, None], other=0.0)
    if IEEE:
        s = tl.dot(q, tl.trans(kk), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(kk))
    s = tl.where(allowed, s * scale_log2, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    vv = tl.load(v_base + offs_n[:, None] * svs + offs_d[None, :] * svd, mask=rows[:, None], other=0.0)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv)
    return m_new, l_i, acc


@triton.jit
def sparse_split(Q, K, V, Lens, IdxEnd, MidO, MidL, MidC, Bits, Codes, Err, W, Thr, Qn, scale_log2, H_kv, SPLIT,
                 sqb, sqh, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
                 sob, soh, sos, sod, slb, slh, sls, scb, sch, scs,
                 sbb, sbh, sbp, scob, scoh, scos, scod, seb, seh, ses, swb, swh, swd, stb, sth,
                 G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                 D: tl.constexpr, IEEE: tl.constexpr, GATE: tl.constexpr, PAGE: tl.constexpr):
    """One (slot range, row, kv head): flash-decoding over slots [pid_s * SPLIT, min(+SPLIT, lengths[b])) that
    reads an indexed slot (< idx_end[b]) only where the gate lets some query head of the group through, and every
    buffer slot (>= idx_end[b]). Writes the partial output and log-sum-exp per query head and the number of
    indexed slots read (union over the group)."""
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H_kv
    h = pid_bh % H_kv
    n_len = tl.load(Lens + b).to(tl.int32)
    n_idx = tl.load(IdxEnd + b).to(tl.int32)
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
    cnt = tl.sum(tl.zeros([BLOCK_N], tl.int32), 0)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        idx_ok = n_ok & (offs_n < n_idx)
        buf = n_ok & (offs_n >= n_idx)
        if GATE == 0:  # pages: bit g of the slot's page
            bits = tl.load(Bits + b * sbb + h * sbh + (offs_n // PAGE) * sbp, mask=idx_ok, other=0)
            surv = ((bits[None, :] >> offs_g[:, None]) & 1) != 0
        elif GATE == 1:  # grid: sum_d w_d code_d + |q| err >= thr (w = q * step, thr = t - margin - q.lo)
            codes = tl.load(Codes + b * scob + h * scoh + offs_n[:, None] * scos + offs_d[None, :] * scod,
                            mask=idx_ok[:, None], other=0).to(tl.float32)
            err = tl.load(Err + b * seb + h * seh + offs_n * ses, mask=idx_ok, other=0.0)
            surv = (offs_g[:, None] < 0) & (offs_n[None, :] < 0)  # (BLOCK_G, BLOCK_N) all False
            for g in tl.static_range(G):
                w = tl.load(W + b * swb + (h * G + g) * swh + offs_d * swd)
                thr = tl.load(Thr + b * stb + (h * G + g) * sth)
                qn = tl.load(Qn + b * stb + (h * G + g) * sth)
                u = tl.sum(codes * w[None, :], 1) + qn * err
                surv = surv | ((offs_g[:, None] == g) & (u >= thr)[None, :])
        else:  # dense
            surv = (offs_g[:, None] >= 0) & (offs_n[None, :] >= 0)
        surv = (surv & idx_ok[None, :]) | buf[None, :]
        rows = tl.max(surv.to(tl.int32), 0) > 0  # (BLOCK_N,) some query head of the group reads the slot
        cnt += tl.sum((rows & idx_ok).to(tl.int32), 0)
        if tl.max(rows.to(tl.int32), 0) > 0:  # a tile nobody reads costs its gate only
            m_i, l_i, acc = _online_tile(q, k_base, v_base, offs_n, rows, surv, offs_d, m_i, l_i, acc, scale_log2,
                                         sks, skd, svs, svd, IEEE)
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    tl.store(MidO + b * sob + heads[:, None] * soh + pid_s * sos + offs_d[None, :] * sod, out, mask=g_ok[:, None])
    tl.store(MidL + b * slb + heads * slh + pid_s * sls, lse, mask=g_ok)
    tl.store(MidC + b * scb + h * sch + pid_s * scs, cnt)


@triton.jit
def sparse_combine(MidO, MidL, MidC, Out, Lens, IdxEnd, Valid, Acc, n_splits, H_kv,
                   sob, soh, sos, sod, slb, slh, sls, scb, sch, scs, s_ob, s_oh, s_od, sab, sac, s_valid,
                   G: tl.constexpr, BLOCK_G: tl.constexpr, CH: tl.constexpr, D: tl.constexpr):
    """Merge the ranges of BLOCK_G query heads of one (row, kv head), CH ranges at a time; the row's first program
    also books the row's reads of this step into Acc[b] = (indexed slots read, buffer slots read, indexed slots
    there, steps), if the row is valid."""
    pid = tl.program_id(0)
    n_gb = (G + BLOCK_G - 1) // BLOCK_G
    b = pid // (H_kv * n_gb)
    h = (pid // n_gb) % H_kv
    gb = pid % n_gb
    offs_g = gb * BLOCK_G + tl.arange(0, BLOCK_G)
    offs_c = tl.arange(0, CH)
    offs_d = tl.arange(0, D)
    g_ok = offs_g < G
    heads = h * G + offs_g
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    for s0 in range(0, n_splits, CH):
        s_ok = (s0 + offs_c) < n_splits
        lse = tl.load(MidL + b * slb + heads[:, None] * slh + (s0 + offs_c)[None, :] * sls,
                      mask=g_ok[:, None] & s_ok[None, :], other=float("-inf"))  # (BLOCK_G, CH)
        m = tl.maximum(m, tl.max(lse, 1))
    m = tl.where(m == float("-inf"), 0.0, m)
    den = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    for s0 in range(0, n_splits, CH):
        s_ok = (s0 + offs_c) < n_splits
        lse = tl.load(MidL + b * slb + heads[:, None] * slh + (s0 + offs_c)[None, :] * sls,
                      mask=g_ok[:, None] & s_ok[None, :], other=float("-inf"))
        w = tl.exp2(lse - m[:, None])  # empty ranges weigh 0
        den += tl.sum(w, 1)
        o = tl.load(MidO + b * sob + heads[:, None, None] * soh + (s0 + offs_c)[None, :, None] * sos
                    + offs_d[None, None, :] * sod,
                    mask=g_ok[:, None, None] & s_ok[None, :, None] & (offs_d[None, None, :] >= 0), other=0.0)
        acc += tl.sum(o * w[:, :, None], 1)
    out = acc / tl.where(den > 0, den, 1.0)[:, None]
    tl.store(Out + b * s_ob + heads[:, None] * s_oh + offs_d[None, :] * s_od, out.to(Out.dtype.element_ty),
             mask=g_ok[:, None])
    read = tl.sum(tl.zeros([CH], tl.int64), 0)
    for c0 in range(0, H_kv * n_splits, CH):
        c = c0 + offs_c
        read += tl.sum(tl.load(MidC + b * scb + (c // n_splits) * sch + (c % n_splits) * scs,
                               mask=c < H_kv * n_splits, other=0).to(tl.int64), 0)
    n_len = tl.load(Lens + b)
    n_idx = tl.load(IdxEnd + b)
    book = (h == 0) & (gb == 0) & (tl.load(Valid + b * s_valid) != 0)
    tl.store(Acc + b * sab, tl.load(Acc + b * sab) + read, mask=book)
    tl.store(Acc + b * sab + sac, tl.load(Acc + b * sab + sac) + (n_len - n_idx) * H_kv, mask=book)
    tl.store(Acc + b * sab + 2 * sac, tl.load(Acc + b * sab + 2 * sac) + n_idx * H_kv, mask=book)
    tl.store(Acc + b * sab + 3 * sac, tl.load(Acc + b * sab + 3 * sac) + 1, mask=book)


@triton.jit
def quest_scores(Q, Kmin, Kmax, IdxEnd, S, H_kv, P_cap,
                 sqb, sqh, sqd, smb, smh, smp, smd, ssb, ssh, ssp,
                 G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr, D: tl.constexpr,
                 IEEE: tl.constexpr, GROUP: tl.constexpr, PAGE: tl.constexpr):
    """Upper bounds sum_d max(q_d min_d, q_d max_d) = q+ . max + q- . min of a block of pages for the query heads of
    one kv head: per query head (row h * G + g of S) or, GROUP, summed over the group (row h); -inf past the row's
    idx_end[b] // PAGE pages."""
    pid_p = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H_kv
    h = pid_bh % H_kv
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, D)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    g_ok = offs_g < G
    n_pages = (tl.load(IdxEnd + b) // PAGE).to(tl.int32)
    p_ok = offs_p < n_pages
    q = tl.load(Q + b * sqb + (h * G + offs_g)[:, None] * sqh + offs_d[None, :] * sqd, mask=g_ok[:, None],
                other=0.0)
    zero = tl.zeros_like(q)
    qp = tl.maximum(q, zero)
    qm = tl.minimum(q, zero)
    base = b * smb + h * smh + offs_p[:, None] * smp + offs_d[None, :] * smd
    mn = tl.load(Kmin + base, mask=p_ok[:, None], other=0.0)
    mx = tl.load(Kmax + base, mask=p_ok[:, None], other=0.0)
    if IEEE:
        s = tl.dot(qp, tl.trans(mx), input_precision="ieee") + tl.dot(qm, tl.trans(mn), input_precision="ieee")
    else:
        s = tl.dot(qp.to(mx.dtype), tl.trans(mx)) + tl.dot(qm.to(mn.dtype), tl.trans(mn))
    s = tl.where(p_ok[None, :], s, float("-inf"))
    if GROUP:
        sg = tl.sum(tl.where(g_ok[:, None], s, 0.0), 0)
        sg = tl.where(p_ok, sg, float("-inf"))
        tl.store(S + b * ssb + h * ssh + offs_p * ssp, sg, mask=offs_p < P_cap)
    else:
        tl.store(S + b * ssb + (h * G + offs_g)[:, None] * ssh + offs_p[None, :] * ssp, s,
                 mask=g_ok[:, None] & (offs_p < P_cap)[None, :])


@triton.jit
def quest_select(S, IdxEnd, Budget, Bits, H_kv, P_cap, ssb, ssh, ssp, sbb, sbh, sbp,
                 G: tl.constexpr, ROWS: tl.constexpr, BLOCK_P: tl.constexpr, PAGE: tl.constexpr, RANK: tl.constexpr,
                 BITS: tl.constexpr):
    """Top Budget[n_pages] pages of score row r of kv head h (ROWS = G rows, one per query head, or 1 shared by the
    group), one program per row; ties go to the lower page. ORs the selection into the bits (bit g: query head g
    reads the page; zeroed by the caller when ROWS > 1)."""
    pid = tl.program_id(0)
    b = pid // (H_kv * ROWS)
    h = (pid // ROWS) % H_kv
    r = pid % ROWS
    offs_p = tl.arange(0, BLOCK_P)
    n_pages = (tl.load(IdxEnd + b) // PAGE).to(tl.int32)
    p_ok = offs_p < n_pages
    k = tl.minimum(tl.load(Budget + n_pages).to(tl.int64), n_pages.to(tl.int64))
    s = tl.load(S + b * ssb + (h * ROWS + r) * ssh + offs_p * ssp, mask=p_ok, other=0.0)
    key = tl.where(p_ok, _sortable(s), -2147483648)
    if RANK:  # few pages: each page's rank by counting the pages ahead of it (ties: the lower page ahead)
        ahead = (key[None, :] > key[:, None]) | ((key[None, :] == key[:, None]) & (offs_p[None, :] < offs_p[:, None]))
        rank = tl.sum(ahead.to(tl.int64), 1)
        sel = p_ok & (rank < k)
    else:
        tau = _kth_key(key, tl.maximum(k, 1), BITS)
        gt = p_ok & (key > tau)
        eq = p_ok & (key == tau)
        n_gt = tl.sum(gt.to(tl.int64), 0)
        tie = tl.cumsum(eq.to(tl.int64), 0) - 1  # rank among the ties, lower pages first
        sel = (gt | (eq & (tie < k - n_gt))) & ((tl.zeros([BLOCK_P], tl.int64) + k) > 0)
    if ROWS == 1:
        tl.store(Bits + b * sbb + h * sbh + offs_p * sbp, tl.where(sel, (1 << G) - 1, 0), mask=offs_p < P_cap)
    else:
        tl.atomic_or(Bits + b * sbb + h * sbh + offs_p * sbp, tl.where(sel, 1 << r, 0), mask=sel & (offs_p < P_cap))


@triton.jit
def grid_gate_params(Q, Sample, SValid, Kth, Lo, Step, Kmax, W, Thr, Qn, H_kv, gate_eps,
                     sqb, sqh, sqd, ssb, ssh, ssm, ssd, svb, svh, svm, slb, slh, sld, skb, skh,
                     swb, swh, swd, stb, sth,
                     G: tl.constexpr, M: tl.constexpr, D: tl.constexpr, KTH: tl.constexpr, BITS: tl.constexpr):
    """One query head (program): the threshold t = the Kth[m]-th largest score of its kv head's m valid sample
    keys (-inf if none; KTH 0: counted ranks, 1: bisection, 2: a sort), and the grid gate's operands w = q * step,
    |q| and thr = t - gate_eps |q| kmax - q . lo."""
    pid = tl.program_id(0)
    H_q = H_kv * G
    b = pid // H_q
    hq = pid % H_q
    h = hq // G
    offs_d = tl.arange(0, D)
    offs_m = tl.arange(0, M)
    q = tl.load(Q + b * sqb + hq * sqh + offs_d * sqd).to(tl.float32)  # (D,)
    smp = tl.load(Sample + b * ssb + h * ssh + offs_m[:, None] * ssm + offs_d[None, :] * ssd).to(tl.float32)
    sv = tl.load(SValid + b * svb + h * svh + offs_m * svm) != 0  # (M,)
    s = tl.sum(smp * q[None, :], 1)  # (M,) fp32 scores
    m = tl.sum(sv.to(tl.int32), 0)
    k = tl.maximum(tl.load(Kth + m).to(tl.int64), 1)
    if KTH == 0:  # a small sample: the k-th largest is the key with exactly k - 1 keys ahead of it (ties by index)
        key = tl.where(sv, _sortable(s), -2147483648)
        ahead = (key[None, :] > key[:, None]) | ((key[None, :] == key[:, None]) & (offs_m[None, :] < offs_m[:, None]))
        rank = tl.sum(ahead.to(tl.int32), 1)
        t = tl.max(tl.where(sv & (rank == k - 1), s, float("-inf")), 0)
    elif KTH == 1:
        key = tl.where(sv, _sortable(s), -2147483648)
        tau = _kth_key(key, k, BITS)
        t = tl.max(tl.where(key == tau, s, float("-inf")), 0)
    else:
        srt = tl.sort(tl.where(sv, s, float("-inf")), 0, descending=True)
        t = tl.max(tl.where(offs_m == k - 1, srt, float("-inf")), 0)
    t = tl.where(m > 0, t, float("-inf"))
    lo = tl.load(Lo + b * slb + h * slh + offs_d * sld)
    step = tl.load(Step + b * slb + h * slh + offs_d * sld)
    qn = tl.sqrt(tl.sum(q * q, 0))
    c0 = tl.sum(q * lo, 0)
    kmax = tl.load(Kmax + b * skb + h * skh)
    tl.store(W + b * swb + hq * swh + offs_d * swd, q * step)
    tl.store(Thr + b * stb + hq * sth, t - gate_eps * qn * kmax - c0)
    tl.store(Qn + b * stb + hq * sth, qn)


@triton.jit
def quest_append(Knew, Vnew, K, V, Lens, Seen, Valid, IdxEnd, Kmin, Kmax, H_kv, s_valid,
                 snb, snh, snd, svnb, svnh, svnd, skb, skh, sks, skd, svb, svh, svs, svd, smb, smh, smp, smd,
                 BLOCK_H: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr, META: tl.constexpr):
    """Row b (one program, every kv head): idx_end = the row's tokens in whole pages; if they fill whole pages
    (lengths % PAGE == 0) the last one gets its key min/max (META; idempotent); then the new K/V go to slot
    lengths[b] and lengths, seen advance by valid[b]."""
    b = tl.program_id(0)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, D)
    h_ok = offs_h < H_kv
    n = tl.load(Lens + b)
    if META:
        offs_t = tl.arange(0, PAGE)
        nh = tl.zeros([BLOCK_H], tl.int64) + n  # (the interpreter cannot mix scalar and vector masks)
        full = h_ok & (nh % PAGE == 0) & (nh > 0)  # (BLOCK_H,)
        p = n // PAGE - 1
        ptr = K + b * skb + offs_h[:, None, None] * skh + (n - PAGE + offs_t)[None, :, None] * sks \
            + offs_d[None, None, :] * skd
        m3 = full[:, None, None] & (offs_t[None, :, None] >= 0) & (offs_d[None, None, :] >= 0)
        kp = tl.load(ptr, mask=m3, other=0.0)  # (BLOCK_H, PAGE, D)
        mn = tl.min(kp, 1)
        mx = tl.max(kp, 1)
        dst = b * smb + offs_h[:, None] * smh + p * smp + offs_d[None, :] * smd
        m2 = full[:, None] & (offs_d[None, :] >= 0)
        tl.store(Kmin + dst, mn.to(Kmin.dtype.element_ty), mask=m2)
        tl.store(Kmax + dst, mx.to(Kmax.dtype.element_ty), mask=m2)
    tl.store(IdxEnd + b, (n // PAGE) * PAGE)
    ok = h_ok[:, None]
    kk = tl.load(Knew + b * snb + offs_h[:, None] * snh + offs_d[None, :] * snd, mask=ok)
    vv = tl.load(Vnew + b * svnb + offs_h[:, None] * svnh + offs_d[None, :] * svnd, mask=ok)
    tl.store(K + b * skb + offs_h[:, None] * skh + n * sks + offs_d[None, :] * skd, kk.to(K.dtype.element_ty), mask=ok)
    tl.store(V + b * svb + offs_h[:, None] * svh + n * svs + offs_d[None, :] * svd, vv.to(V.dtype.element_ty), mask=ok)
    add = tl.load(Valid + b * s_valid).to(n.dtype)
    tl.store(Lens + b, n + add)
    tl.store(Seen + b, tl.load(Seen + b) + add)


@triton.jit
def grid_append(Knew, Vnew, K, V, Lens, Seen, Valid, IdxEnd, Steps, Codes, Err, Lo, Inv, Step, Kmax, H_kv, s_valid,
                snb, snh, snd, svnb, svnh, svnd, skb, skh, sks, skd, svb, svh, svs, svd,
                scob, scoh, scos, scod, seb, seh, ses, slb, slh, sld, skmb, skmh,
                BLOCK_H: tl.constexpr, D: tl.constexpr, MERGE: tl.constexpr, LEVELS: tl.constexpr):
    """Row b (one program, every kv head): every MERGE decode steps the buffer joins the index (idx_end = lengths);
    the new key is encoded (code = clamp(floor((k - lo) * inv + 1/2), 0, LEVELS), err = |k - (lo + code step)|) and
    kmax grows with its norm (valid rows); the new K/V go to slot lengths[b]; lengths, seen and steps advance."""
    b = tl.program_id(0)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, D)
    h_ok = offs_h < H_kv
    ok = h_ok[:, None]
    n = tl.load(Lens + b)
    st = tl.load(Steps + b)
    merge = (st > 0) & (st % MERGE == 0)
    tl.store(IdxEnd + b, n, mask=merge)
    kk = tl.load(Knew + b * snb + offs_h[:, None] * snh + offs_d[None, :] * snd, mask=ok)
    vv = tl.load(Vnew + b * svnb + offs_h[:, None] * svnh + offs_d[None, :] * svnd, mask=ok)
    ks = kk.to(K.dtype.element_ty)
    tl.store(K + b * skb + offs_h[:, None] * skh + n * sks + offs_d[None, :] * skd, ks, mask=ok)
    tl.store(V + b * svb + offs_h[:, None] * svh + n * svs + offs_d[None, :] * svd, vv.to(V.dtype.element_ty), mask=ok)
    kf = ks.to(tl.float32)
    lp = b * slb + offs_h[:, None] * slh + offs_d[None, :] * sld
    lo = tl.load(Lo + lp, mask=ok, other=0.0)
    inv = tl.load(Inv + lp, mask=ok, other=0.0)
    step = tl.load(Step + lp, mask=ok, other=0.0)
    code = tl.minimum(tl.maximum(tl.floor((kf - lo) * inv + 0.5), 0.0), LEVELS * 1.0)
    diff = kf - (lo + code * step)
    err = tl.sqrt(tl.sum(diff * diff, 1))
    tl.store(Codes + b * scob + offs_h[:, None] * scoh + n * scos + offs_d[None, :] * scod,
             code.to(Codes.dtype.element_ty), mask=ok)
    tl.store(Err + b * seb + offs_h * seh + n * ses, err, mask=h_ok)
    add = tl.load(Valid + b * s_valid).to(n.dtype)
    norm = tl.sqrt(tl.sum(kf * kf, 1))
    km = tl.load(Kmax + b * skmb + offs_h * skmh, mask=h_ok, other=0.0)
    grow = h_ok & ((tl.zeros([BLOCK_H], tl.int64) + add) > 0)
    tl.store(Kmax + b * skmb + offs_h * skmh, tl.maximum(km, norm), mask=grow)
    tl.store(Lens + b, n + add)
    tl.store(Seen + b, tl.load(Seen + b) + add)
    tl.store(Steps + b, st + 1)
