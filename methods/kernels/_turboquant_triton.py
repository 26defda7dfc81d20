"""Triton kernels of :mod:`methods.kernels.turboquant_attention` (imported on first use: Triton decides at
import time whether ``@triton.jit`` compiles or interprets, so ``TRITON_INTERPRET`` must be set before).
Launchers, references and documentation live in turboquant_attention.py.

Constexprs of a K or V side: ``*B`` MSE bits (0: no MSE stage), ``*M`` QJL sketch size (0: no QJL stage),
``*NB`` boundaries padded to a power of two. Stored fields are (B, H_kv, S, n) with unit stride along n and
strides ``<field>b``, ``<field>h``, ``<field>s`` (norm ``kn``, codes ``kc``, sketch bits ``kq``, gamma ``kg``;
``v*`` likewise). The Walsh-Hadamard matrix is generated in column chunks of ``CH`` (no (D, D) tile is held
in registers while anything else is)."""

import triton
import triton.language as tl

from ._codes_triton import _store_codes, dot, dot_f32, fwht, hadamard, unpack_rows
from ._common_triton import rnd


@triton.jit
def _encode(x, NRM, CODES, QJL, GAM, C, BND, SGN, S_, D: tl.constexpr, BITS: tl.constexpr, M: tl.constexpr,
            NB: tl.constexpr, ROT: tl.constexpr, MDT: tl.constexpr, CH: tl.constexpr, LOG_D: tl.constexpr):
    """TurboQuantizer.encode_fields of one vector x (D,) fp32 into one slot (the pointers are the slot's
    norm, codes, sketch bits and gamma)."""
    offs_d = tl.arange(0, D)
    norm = tl.sqrt(tl.sum(x * x, 0))
    u = tl.math.div_rn(x, tl.broadcast_to(tl.maximum(norm, 1.1754943508222875e-38), x.shape))
    if ROT:
        y = fwht(u * tl.load(SGN + offs_d).to(tl.float32), D, LOG_D)  # (D,) H diag(s) u / sqrt(D)
    else:
        y = u
    tl.store(NRM, rnd(norm, MDT).to(MDT))
    if BITS > 0:
        offs_b = tl.arange(0, NB)
        bnd = tl.load(BND + offs_b, mask=offs_b < (1 << BITS) - 1, other=float("inf")).to(tl.float32)
        idx = tl.sum((bnd[None, :] < y[:, None]).to(tl.int32), 1)  # (D,) torch.bucketize(y, boundaries)
        y_mse = tl.load(C + idx).to(tl.float32)
        _store_codes(CODES, idx, D, BITS)  # packed without a reshape (_quant_attention_triton._store_codes)
    else:
        y_mse = tl.zeros([D], tl.float32)
    if M > 0:
        r = y - y_mse
        for c in tl.static_range(M // CH):  # sketch rows by chunks: S r >= 0, 8 signs a byte
            offs_m = c * CH + tl.arange(0, CH)
            Sm = tl.load(S_ + offs_m[:, None] * D + offs_d[None, :]).to(tl.float32)  # (CH, D)
            bits = (tl.sum(Sm * r[None, :], 1) >= 0).to(tl.int32)  # (CH,)
            _store_codes(QJL + c * (CH // 8), bits, CH, 1)
        tl.store(GAM, rnd(tl.sqrt(tl.sum(r * r, 0)), MDT).to(MDT))


@triton.jit
def prepare(Q, QR, SQ, K, V, KN, KC, KQ, KG, VN, VC, VQ, VG, CK, BK, CV, BV, SK_, SV_, PK, PV, Lens, start,
            sqb, sqh, srb, srh, ssb, ssh, skb, skh, skt, svb, svh, svt,
            knb, knh, kns, kcb, kch, kcs, kqb, kqh, kqs, kgb, kgh, kgs,
            vnb, vnh, vns, vcb, vch, vcs, vqb, vqh, vqs, vgb, vgh, vgs,
            G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, KB: tl.constexpr, KM: tl.constexpr,
            KNB: tl.constexpr, VB: tl.constexpr, VM: tl.constexpr, VNB: tl.constexpr, ROT: tl.constexpr,
            QUERIES: tl.constexpr, APPEND: tl.constexpr, DECODE: tl.constexpr, MDT: tl.constexpr,
            CH: tl.constexpr, LOG_D: tl.constexpr, INV_SQRT_D: tl.constexpr):
    """Program (row b, kv head h, 2 t + kind). With QUERIES, program (b, h, 0) rotates the query group once,
    q_r = H diag(s_K) q / sqrt(D) (fp32, to QR (B, H_q, D)), and for a QJL key side projects it, S_K q_r (to
    SQ (B, H_q, KM)). With APPEND, program (b, h, 2 t + kind) encodes token t's key (kind 0) or value (kind 1)
    into slot lengths[b] (DECODE: one token; the counters are not advanced here) or start + t (a chunk)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    t = tl.program_id(2) // 2
    kind = tl.program_id(2) % 2
    b64 = b.to(tl.int64)
    offs_d = tl.arange(0, D)
    if QUERIES:
        if tl.program_id(2) == 0:
            offs_g = tl.arange(0, BLOCK_G)
            g_ok = offs_g < G
            heads = h * G + offs_g
            q = tl.load(Q + b64 * sqb + heads[:, None] * sqh + offs_d[None, :], mask=g_ok[:, None], other=0.0)
            q = q.to(tl.float32)
            if ROT:
                q = q * tl.load(PK + offs_d).to(tl.float32)[None, :]
            if KM > 0:
                sq = tl.zeros([BLOCK_G, KM], tl.float32)
            for c in tl.static_range(D // CH):
                offs_c = c * CH + tl.arange(0, CH)
                if ROT:
                    qc = dot_f32(q, hadamard(D, c * CH, CH), MDT) * INV_SQRT_D  # (BLOCK_G, CH) columns of q_r
                else:
                    qc = tl.load(Q + b64 * sqb + heads[:, None] * sqh + offs_c[None, :], mask=g_ok[:, None],
                                 other=0.0).to(tl.float32)
                tl.store(QR + b64 * srb + heads[:, None] * srh + offs_c[None, :], qc, mask=g_ok[:, None])
                if KM > 0:
                    skc = tl.load(SK_ + tl.arange(0, KM)[None, :] * D + offs_c[:, None])  # (CH, KM) rows of S_K^T
                    sq += dot_f32(qc, skc, MDT)
            if KM > 0:
                tl.store(SQ + b64 * ssb + heads[:, None] * ssh + tl.arange(0, KM)[None, :], sq, mask=g_ok[:, None])
    if APPEND:
        if DECODE:
            slot = tl.load(Lens + b)
        else:
            slot = start + t
        if kind == 0:
            x = tl.load(K + b64 * skb + h * skh + t * skt + offs_d).to(tl.float32)
            _encode(x, KN + b64 * knb + h * knh + slot * kns, KC + b64 * kcb + h * kch + slot * kcs,
                    KQ + b64 * kqb + h * kqh + slot * kqs, KG + b64 * kgb + h * kgh + slot * kgs,
                    CK, BK, PK, SK_, D, KB, KM, KNB, ROT, MDT, CH, LOG_D)
        else:
            x = tl.load(V + b64 * svb + h * svh + t * svt + offs_d).to(tl.float32)
            _encode(x, VN + b64 * vnb + h * vnh + slot * vns, VC + b64 * vcb + h * vch + slot * vcs,
                    VQ + b64 * vqb + h * vqh + slot * vqs, VG + b64 * vgb + h * vgh + slot * vgs,
                    CV, BV, PV, SV_, D, VB, VM, VNB, ROT, MDT, CH, LOG_D)


@triton.jit
def _dequant_tile(NRM, CODES, QJL, GAM, C, S_, SGN, Out, sn, sc, sq, sg, so, offs_n, n_ok, coef,
                  D: tl.constexpr, BLOCK_N: tl.constexpr, BITS: tl.constexpr, M: tl.constexpr, ROT: tl.constexpr,
                  CH: tl.constexpr, MDT: tl.constexpr, INV_SQRT_D: tl.constexpr):
    """TurboQuantizer.decode_fields of slots offs_n into Out (rows at offs_n * so, model dtype MDT)."""
    offs_d = tl.arange(0, D)
    sl = offs_n.to(tl.int64)
    if BITS > 0:
        y = tl.load(C + unpack_rows(CODES, sl, n_ok, sc, BITS, D)).to(tl.float32)  # (BLOCK_N, D)
    else:
        y = tl.zeros([BLOCK_N, D], tl.float32)
    if M > 0:
        sign = (2 * unpack_rows(QJL, sl, n_ok, sq, 1, M) - 1).to(MDT)  # (BLOCK_N, M), exact
        gam = tl.load(GAM + sl * sg, mask=n_ok, other=0.0).to(tl.float32)
        Sm = tl.load(S_ + tl.arange(0, M)[:, None] * D + offs_d[None, :])  # (M, D) in MDT: the products are exact
        y += (coef * gam)[:, None] * dot(sign, Sm, MDT == tl.float32)
    norm = tl.load(NRM + sl * sn, mask=n_ok, other=0.0).to(tl.float32)
    if ROT:
        for c in tl.static_range(D // CH):
            offs_c = c * CH + tl.arange(0, CH)
            xc = dot_f32(y, hadamard(D, c * CH, CH), MDT) * INV_SQRT_D  # (BLOCK_N, CH) columns of H y / sqrt(D)
            xc = xc * tl.load(SGN + offs_c).to(tl.float32)[None, :] * norm[:, None]
            tl.store(Out + sl[:, None] * so + offs_c[None, :], xc.to(Out.dtype.element_ty), mask=n_ok[:, None])
    else:
        tl.store(Out + sl[:, None] * so + offs_d[None, :], (y * norm[:, None]).to(Out.dtype.element_ty),
                 mask=n_ok[:, None])


@triton.jit
def dequant(KN, KC, KQ, KG, VN, VC, VQ, VG, CK, CV, SK_, SV_, PK, PV, OutK, OutV, n_slots, H_kv, coef_k, coef_v,
            knb, knh, kns, kcb, kch, kcs, kqb, kqh, kqs, kgb, kgh, kgs,
            vnb, vnh, vns, vcb, vch, vcs, vqb, vqh, vqs, vgb, vgh, vgs, okb, okh, oks, ovb, ovh, ovs,
            D: tl.constexpr, BLOCK_N: tl.constexpr, KB: tl.constexpr, KM: tl.constexpr, VB: tl.constexpr,
            VM: tl.constexpr, ROT: tl.constexpr, CH: tl.constexpr, MDT: tl.constexpr, INV_SQRT_D: tl.constexpr):
    """Program (slot tile, row * H_kv + kv head, K|V): the stored slots [0, n_slots) decoded into dense
    OutK / OutV (B, H_kv, >= n_slots, D) (a prefill chunk's past, as the reference path reads it)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < n_slots
    b = (tl.program_id(1) // H_kv).to(tl.int64)
    h = tl.program_id(1) % H_kv
    if tl.program_id(2) == 0:
        _dequant_tile(KN + b * knb + h * knh, KC + b * kcb + h * kch, KQ + b * kqb + h * kqh, KG + b * kgb + h * kgh,
                      CK, SK_, PK, OutK + b * okb + h * okh, kns, kcs, kqs, kgs, oks, offs_n, n_ok, coef_k,
                      D, BLOCK_N, KB, KM, ROT, CH, MDT, INV_SQRT_D)
    else:
        _dequant_tile(VN + b * vnb + h * vnh, VC + b * vcb + h * vch, VQ + b * vqb + h * vqh, VG + b * vgb + h * vgh,
                      CV, SV_, PV, OutV + b * ovb + h * ovh, vns, vcs, vqs, vgs, ovs, offs_n, n_ok, coef_v,
                      D, BLOCK_N, VB, VM, ROT, CH, MDT, INV_SQRT_D)


@triton.jit
def decode_split(QR, SQ, KN, KC, KQ, KG, VN, VC, VQ, VG, CK, CV, Lens, MidO, MidQ, MidL,
                 scale_log2, coef_k, H_kv, SPLIT, srb, srh, ssb, ssh,
                 knb, knh, kns, kcb, kch, kcs, kqb, kqh, kqs, kgb, kgh, kgs,
                 vnb, vnh, vns, vcb, vch, vcs, vqb, vqh, vqs, vgb, vgh, vgs,
                 sob, soh, sos, sqqb, sqqh, sqqs, slb, slh, sls,
                 G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, KB: tl.constexpr, KM: tl.constexpr, VB: tl.constexpr, VM: tl.constexpr,
                 DT: tl.constexpr, IEEE: tl.constexpr):
    """Program (range, row * H_kv + kv head): the range's stored slots below lengths[b], for the kv head's
    query group, from the rotated queries QR (and SQ = S_K q_r). Per key: score = norm * (q_r . centroid[codes]
    + coef_k gamma (S_K q_r) . signs). Writes the range's normalised partial output in the rotated space
    (MidO, D-dim: sum p norm centroid[codes]; MidQ, VM-dim: sum p norm gamma signs) and its log2-sum-exp."""
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
    b64 = b.to(tl.int64)
    q_d = tl.load(QR + b64 * srb + heads[:, None] * srh + offs_d[None, :], mask=g_ok[:, None], other=0.0).to(DT)
    if KM > 0:
        offs_mk = tl.arange(0, KM)
        sq_d = tl.load(SQ + b64 * ssb + heads[:, None] * ssh + offs_mk[None, :], mask=g_ok[:, None], other=0.0)
        sq_d = sq_d.to(DT)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    if VM > 0:
        acc_q = tl.zeros([BLOCK_G, VM], tl.float32)
    KN += b64 * knb + h * knh
    KC += b64 * kcb + h * kch
    KQ += b64 * kqb + h * kqh
    KG += b64 * kgb + h * kgh
    VN += b64 * vnb + h * vnh
    VC += b64 * vcb + h * vch
    VQ += b64 * vqb + h * vqh
    VG += b64 * vgb + h * vgh
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        sn = offs_n.to(tl.int64)
        kn = tl.load(KN + sn * kns, mask=n_ok, other=0.0).to(tl.float32)  # (BLOCK_N,) norms
        if KB > 0:
            kc = unpack_rows(KC, sn, n_ok, kcs, KB, D)  # (BLOCK_N, D)
            s = dot(q_d, tl.trans(tl.load(CK + kc).to(DT)), IEEE)  # (BLOCK_G, BLOCK_N)
        else:
            s = tl.zeros([BLOCK_G, BLOCK_N], tl.float32)
        if KM > 0:
            ks = unpack_rows(KQ, sn, n_ok, kqs, 1, KM)  # (BLOCK_N, KM) sign bits
            kg = tl.load(KG + sn * kgs, mask=n_ok, other=0.0).to(tl.float32)
            s += dot(sq_d, tl.trans((2 * ks - 1).to(DT)), IEEE) * (coef_k * kg)[None, :]
        s = tl.where(n_ok[None, :], s * (kn * scale_log2)[None, :], float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
        vn = tl.load(VN + sn * vns, mask=n_ok, other=0.0).to(tl.float32)
        pv = p * vn[None, :]  # (BLOCK_G, BLOCK_N)
        acc = acc * alpha[:, None]
        if VB > 0:
            vc = unpack_rows(VC, sn, n_ok, vcs, VB, D)
            acc += dot(pv.to(DT), tl.load(CV + vc).to(DT), IEEE)
        if VM > 0:
            vs = unpack_rows(VQ, sn, n_ok, vqs, 1, VM)  # (BLOCK_N, VM)
            vg = tl.load(VG + sn * vgs, mask=n_ok, other=0.0).to(tl.float32)
            acc_q = acc_q * alpha[:, None] + dot((pv * vg[None, :]).to(DT), (2 * vs - 1).to(DT), IEEE)
    has = l_i > 0
    inv = 1.0 / tl.where(has, l_i, 1.0)
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    tl.store(MidO + b * sob + heads[:, None] * soh + pid_s * sos + offs_d[None, :], acc * inv[:, None],
             mask=g_ok[:, None])
    if VM > 0:
        offs_mv = tl.arange(0, VM)
        tl.store(MidQ + b * sqqb + heads[:, None] * sqqh + pid_s * sqqs + offs_mv[None, :], acc_q * inv[:, None],
                 mask=g_ok[:, None])
    tl.store(MidL + b * slb + heads * slh + pid_s * sls, lse, mask=g_ok)


@triton.jit
def combine(MidO, MidQ, MidL, Q, KNew, VNew, Out, SV_, PV, Lens, Seen, Valid, n_splits, scale_log2, coef_v, H_kv,
            sob, soh, sos, sqqb, sqqh, sqqs, slb, slh, sls, sqb, sqh, skb, skh, svb, svh, s_ob, s_oh,
            G: tl.constexpr, NS: tl.constexpr, D: tl.constexpr, VM: tl.constexpr, ROT: tl.constexpr,
            ADVANCE: tl.constexpr, CH: tl.constexpr, INV_SQRT_D: tl.constexpr):
    """Program (row b, query head hq): merge the ranges (weights 2^(lse - max)) in the rotated space, add the
    sketch part coef_v * z @ S_V (by chunks of sketch rows), un-rotate once (diag(s_V) H / sqrt(D), by chunks
    of output columns), and merge the new token's exact key and value; program (b, 0) then advances
    lengths[b] and seen[b] by valid[b]."""
    pid = tl.program_id(0)
    H_q = H_kv * G
    b = pid // H_q
    hq = pid % H_q
    hk = hq // G
    offs_s = tl.arange(0, NS)
    offs_d = tl.arange(0, D)
    s_ok = offs_s < n_splits
    lse = tl.load(MidL + b * slb + hq * slh + offs_s * sls, mask=s_ok, other=float("-inf"))
    q = tl.load(Q + b * sqb + hq * sqh + offs_d).to(tl.float32)
    kn = tl.load(KNew + b * skb + hk * skh + offs_d).to(tl.float32)
    s_new = tl.sum(q * kn, 0) * scale_log2
    m = tl.maximum(tl.max(lse, 0), s_new)
    w = tl.exp2(lse - m)  # empty ranges (lse -inf) weigh 0
    w_new = tl.exp2(s_new - m)
    inv = 1.0 / (tl.sum(w, 0) + w_new)
    o = tl.load(MidO + b * sob + hq * soh + offs_s[:, None] * sos + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    y = tl.sum(o * w[:, None], 0) * inv  # (D,) rotated-space output of the stored slots
    if VM > 0:
        for c in tl.static_range(VM // CH):
            offs_m = c * CH + tl.arange(0, CH)
            zq = tl.load(MidQ + b * sqqb + hq * sqqh + offs_s[:, None] * sqqs + offs_m[None, :], mask=s_ok[:, None],
                         other=0.0)
            z = tl.sum(zq * w[:, None], 0) * inv  # (CH,) sketch-space output
            sv = tl.load(SV_ + offs_m[:, None] * D + offs_d[None, :]).to(tl.float32)  # (CH, D) rows of S_V
            y += coef_v * tl.sum(z[:, None] * sv, 0)
    if ROT:
        for c in tl.static_range(D // CH):
            offs_c = c * CH + tl.arange(0, CH)
            sg = tl.load(PV + offs_c).to(tl.float32)
            vn = tl.load(VNew + b * svb + hk * svh + offs_c).to(tl.float32)
            oc = tl.sum(y[:, None] * hadamard(D, c * CH, CH), 0) * (INV_SQRT_D * sg) + (w_new * inv) * vn
            tl.store(Out + b * s_ob + hq * s_oh + offs_c, oc.to(Out.dtype.element_ty))
    else:
        vn = tl.load(VNew + b * svb + hk * svh + offs_d).to(tl.float32)
        tl.store(Out + b * s_ob + hq * s_oh + offs_d, (y + (w_new * inv) * vn).to(Out.dtype.element_ty))
    if ADVANCE:
        if hq == 0:
            v = tl.load(Valid + b).to(tl.int64)
            tl.store(Lens + b, tl.load(Lens + b) + v)
            tl.store(Seen + b, tl.load(Seen + b) + v)
