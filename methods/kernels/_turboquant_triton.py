"""Triton kernels of :mod:`methods.kernels.turboquant_attention` (imported on first use: Triton decides at
import time whether ``@triton.jit`` compiles or interprets, so ``TRITON_INTERPRET`` must be set before).
Launchers, references and documentation live in turboquant_attention.py.

Constexprs of a K or V side: ``*B`` MSE bits (0: no MSE stage), ``*M`` QJL sketch size (0: no QJL stage),
``*NB`` boundaries padded to a power of two (append only)."""

import triton
import triton.language as tl

from ._codes_triton import dot, hadamard, store_words, unpack_rows
from ._layers_triton import rnd


@triton.jit
def decode_split(Q, KN, KC, KQ, KG, VN, VC, VQ, VG, CK, CV, SK_, SV_, PK, PV, Lens, MidO, MidL,
                 scale_log2, coef_k, coef_v, H_kv,
                 sqb, sqh, knb, knh, kns, kcb, kch, kcs, kqb, kqh, kqs, kgb, kgh, kgs,
                 vnb, vnh, vns, vcb, vch, vcs, vqb, vqh, vqs, vgb, vgh, vgs,
                 sob, soh, sos, slb, slh, sls,
                 G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                 SPLIT: tl.constexpr, KB: tl.constexpr, KM: tl.constexpr, VB: tl.constexpr, VM: tl.constexpr,
                 ROT: tl.constexpr, DT: tl.constexpr, IEEE: tl.constexpr):
    """Program (range, row * H_kv + kv head): the range's stored slots below lengths[b], for the kv head's
    query group. Stored fields are (B, H_kv, S, n) with unit stride along n (strides ``<field>b/h/s``).
    q is rotated once (q_r = H diag(s_K) q / sqrt(D)), and for a QJL key side projected once (S_K q_r); per
    key: norm * (q_r . centroid[codes] + coef gamma (S_K q_r) . signs). Values accumulate in the rotated space
    (p norm centroid[codes], and p norm gamma signs in the m-dim sketch space); at the end the sketch part is
    projected by S_V^T and the sum un-rotated, once."""
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
    q = tl.load(Q + b * sqb + heads[:, None] * sqh + offs_d[None, :], mask=g_ok[:, None], other=0.0).to(tl.float32)
    if ROT:
        Hm = hadamard(D)
        sk = tl.load(PK + offs_d).to(tl.float32)
        q = dot(q * sk[None, :], Hm, True)  # (BLOCK_G, D) rotated queries
    q_d = q.to(DT)
    if KM > 0:
        offs_mk = tl.arange(0, KM)
        Sk = tl.load(SK_ + offs_mk[:, None] * D + offs_d[None, :]).to(tl.float32)  # (KM, D)
        sq_d = dot(q, tl.trans(Sk), True).to(DT)  # (BLOCK_G, KM) S_K q_r
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    if VM > 0:
        acc_q = tl.zeros([BLOCK_G, VM], tl.float32)
    b64 = b.to(tl.int64)
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
            kc = unpack_rows(KC, sn * kcs, n_ok, KB, D)  # (BLOCK_N, D)
            ky = tl.load(CK + kc)  # centroids, model dtype
            s = dot(q_d, tl.trans(ky.to(DT)), IEEE)  # (BLOCK_G, BLOCK_N)
        else:
            s = tl.zeros([BLOCK_G, BLOCK_N], tl.float32)
        if KM > 0:
            ks = unpack_rows(KQ, sn * kqs, n_ok, 1, KM)  # (BLOCK_N, KM) bits
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
            vc = unpack_rows(VC, sn * vcs, n_ok, VB, D)
            vy = tl.load(CV + vc)
            acc += dot(pv.to(DT), vy.to(DT), IEEE)
        if VM > 0:
            vs = unpack_rows(VQ, sn * vqs, n_ok, 1, VM)  # (BLOCK_N, VM)
            vg = tl.load(VG + sn * vgs, mask=n_ok, other=0.0).to(tl.float32)
            acc_q = acc_q * alpha[:, None] + dot((pv * vg[None, :]).to(DT), (2 * vs - 1).to(DT), IEEE)
    if VM > 0:
        offs_mv = tl.arange(0, VM)
        Sv = tl.load(SV_ + offs_mv[:, None] * D + offs_d[None, :]).to(tl.float32)  # (VM, D)
        acc += coef_v * dot(acc_q, Sv, True)
    if ROT:
        sv = tl.load(PV + offs_d).to(tl.float32)
        acc = dot(acc, hadamard(D), True) * sv[None, :]  # un-rotate: diag(s_V) H y / sqrt(D)
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    tl.store(MidO + b * sob + heads[:, None] * soh + pid_s * sos + offs_d[None, :], out, mask=g_ok[:, None])
    tl.store(MidL + b * slb + heads * slh + pid_s * sls, lse, mask=g_ok)


@triton.jit
def _encode(x, NRM, CODES, QJL, GAM, C, BND, SGN, S_, D: tl.constexpr, BITS: tl.constexpr, M: tl.constexpr,
            NB: tl.constexpr, ROT: tl.constexpr, MDT: tl.constexpr):
    """TurboQuantizer.encode_fields of one vector x (D,) fp32 into one slot (the pointers are the slot's
    norm, codes, sketch bits and gamma)."""
    offs_d = tl.arange(0, D)
    norm = tl.sqrt(tl.sum(x * x, 0))
    u = tl.math.div_rn(x, tl.maximum(norm, 1.1754943508222875e-38))
    if ROT:
        sg = tl.load(SGN + offs_d).to(tl.float32)
        y = tl.sum((u * sg)[:, None] * hadamard(D), 0)  # (D,) H diag(s) u / sqrt(D)
    else:
        y = u
    tl.store(NRM, rnd(norm, MDT).to(MDT))
    if BITS > 0:
        offs_b = tl.arange(0, NB)
        bnd = tl.load(BND + offs_b, mask=offs_b < (1 << BITS) - 1, other=float("inf")).to(tl.float32)
        idx = tl.sum((bnd[None, :] < y[:, None]).to(tl.int32), 1)  # (D,) torch.bucketize(y, boundaries)
        y_mse = tl.load(C + idx).to(tl.float32)
        store_words(CODES, tl.arange(0, D // 8) * BITS, tl.reshape(idx, [D // 8, 8]), tl.full([D // 8], 1, tl.int1),
                    BITS)
    else:
        y_mse = tl.zeros([D], tl.float32)
    if M > 0:
        r = y - y_mse
        offs_m = tl.arange(0, M)
        Sm = tl.load(S_ + offs_m[:, None] * D + offs_d[None, :]).to(tl.float32)  # (M, D)
        proj = tl.sum(Sm * r[None, :], 1)  # (M,) S r
        bits = (proj >= 0).to(tl.int32)
        store_words(QJL, tl.arange(0, M // 8), tl.reshape(bits, [M // 8, 8]), tl.full([M // 8], 1, tl.int1), 1)
        tl.store(GAM, rnd(tl.sqrt(tl.sum(r * r, 0)), MDT).to(MDT))


@triton.jit
def append(K, V, KN, KC, KQ, KG, VN, VC, VQ, VG, CK, BK, CV, BV, SK_, SV_, PK, PV, Lens, skb, skh, svb, svh,
           knb, knh, kns, kcb, kch, kcs, kqb, kqh, kqs, kgb, kgh, kgs,
           vnb, vnh, vns, vcb, vch, vcs, vqb, vqh, vqs, vgb, vgh, vgs,
           D: tl.constexpr, KB: tl.constexpr, KM: tl.constexpr, KNB: tl.constexpr,
           VB: tl.constexpr, VM: tl.constexpr, VNB: tl.constexpr, ROT: tl.constexpr, MDT: tl.constexpr):
    """Program (row, kv head, K|V): encode the new vector into slot lengths[b] (the counters are not
    advanced here)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    kind = tl.program_id(2)
    slot = tl.load(Lens + b)
    b64 = b.to(tl.int64)
    offs_d = tl.arange(0, D)
    if kind == 0:
        x = tl.load(K + b64 * skb + h * skh + offs_d).to(tl.float32)
        _encode(x, KN + b64 * knb + h * knh + slot * kns, KC + b64 * kcb + h * kch + slot * kcs,
                KQ + b64 * kqb + h * kqh + slot * kqs, KG + b64 * kgb + h * kgh + slot * kgs,
                CK, BK, PK, SK_, D, KB, KM, KNB, ROT, MDT)
    else:
        x = tl.load(V + b64 * svb + h * svh + offs_d).to(tl.float32)
        _encode(x, VN + b64 * vnb + h * vnh + slot * vns, VC + b64 * vcb + h * vch + slot * vcs,
                VQ + b64 * vqb + h * vqh + slot * vqs, VG + b64 * vgb + h * vgh + slot * vgs,
                CV, BV, PV, SV_, D, VB, VM, VNB, ROT, MDT)
