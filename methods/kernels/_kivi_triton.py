"""Triton kernels of :mod:`methods.kernels.kivi_attention` (imported on first use: Triton decides at import time
whether ``@triton.jit`` compiles or interprets, so ``TRITON_INTERPRET`` must be set before). Launchers,
references and documentation live in kivi_attention.py.

Names: ``GS`` KIVI's group size (tokens per key group, channels per value group), ``R`` the residual length
(ring slots), ``K_*`` / ``V_*`` the code widths and the dot operand's magic offset (see
:mod:`methods.kernels._quant_attention_triton`: a code is OR-ed into the mantissa of a 16-bit float)."""

import triton
import triton.language as tl

from ._codes_triton import raw_words, store_words, unpack_rows, words_of
from ._quant_attention_triton import (
    TREE_MAX_CPW,
    _code_f32,
    _codes16,
    _online,
    _quantize_store,
    _round_meta,
    _scale16,
    _unpack,
)
from ._quant_attention_triton import _dot as _dot3


@triton.jit
def _raw(KC, KS, KZ, VC, VS, VZ, n0, hi, kcg, ksg, kzg, vcs, vss, vzs, D: tl.constexpr, GS: tl.constexpr,
         K_BITS: tl.constexpr, K_CPW: tl.constexpr, K_WB: tl.constexpr, K_WBP: tl.constexpr, V_BITS: tl.constexpr,
         V_CPW: tl.constexpr, V_WB: tl.constexpr, V_WBP: tl.constexpr):
    """The packed key group n0 / GS and the values of slots n0 .. n0+GS-1 below hi, as stored (nothing loaded
    when n0 >= hi): key bytes (D, GS/K_CPW, K_WBP) (a channel's GS codes per row), key scale and zero (D,),
    value bytes (GS, D/V_CPW, V_WBP) (the word of each code where unpacked directly: raw_words), value scales
    and zeros (GS, D/GS); nothing is converted here."""
    V_NG: tl.constexpr = D // GS
    gi = n0 // GS
    offs_d = tl.arange(0, D)
    d_ok = offs_d < tl.where(n0 < hi, D, 0)
    kr = raw_words(KC + gi * kcg, offs_d, d_ok, GS * K_BITS // 8, GS, K_CPW, K_WB, K_WBP)
    ks = tl.load(KS + gi * ksg + offs_d, mask=d_ok, other=0.0)
    kz = tl.load(KZ + gi * kzg + offs_d, mask=d_ok, other=0.0)
    offs_n = n0 + tl.arange(0, GS)
    n_ok = offs_n < hi
    sn = offs_n.to(tl.int64)
    vr = raw_words(VC, offs_n, n_ok, vcs, D, V_CPW, V_WB, V_WBP)
    grp = tl.arange(0, V_NG)[None, :]
    vs = tl.load(VS + sn[:, None] * vss + grp, mask=n_ok[:, None], other=0.0)
    vz = tl.load(VZ + sn[:, None] * vzs + grp, mask=n_ok[:, None], other=0.0)
    return kr, ks, kz, vr, vs, vz


@triton.jit
def _fast_bf16(FAST: tl.constexpr, CPW: tl.constexpr, WB: tl.constexpr, DT: tl.constexpr):
    """Whether a side's codes are dequantized as the scalar kernels' bf16 fast path does (``FAST``: the launcher's
    ``DECODE_CONFIG["fast16"]`` of methods/kernels/kivi_attention.py)
    (:func:`methods.kernels._quant_attention_triton._codes16`: 4- and 2-bit codes, a bf16 model, on a GPU): the
    reference computes code * scale + zero in fp32, where it is exact but for the zero point's addition, and
    rounds once to bf16; one bf16 FMA rounds once too."""
    return FAST and DT == tl.bfloat16 and WB == 1 and (CPW == 2 or CPW == 4) and CPW <= TREE_MAX_CPW


@triton.jit
def _step(q, kr, ks, kz, vr, vs, vz, n0, hi, m_i, l_i, acc, scale_log2, D: tl.constexpr, GS: tl.constexpr,
          K_BITS: tl.constexpr, K_CPW: tl.constexpr, K_WB: tl.constexpr, K_WBP: tl.constexpr,
          V_BITS: tl.constexpr, V_CPW: tl.constexpr, V_WB: tl.constexpr, V_WBP: tl.constexpr, DT: tl.constexpr,
          IEEE: tl.constexpr, FAST16: tl.constexpr):
    """One key group of the packed prefix into the online softmax: keys (D, GS) = code * scale + zero per channel,
    values (GS, D) = code * scale + zero per token and group of GS channels, in fp32 (a code becomes a float by an
    OR into the exponent field, no integer conversion), rounded to the model dtype DT as the reference store
    rounds them, then one 2D dot each (q in DT is the dot's A operand, held once). bf16 4- and 2-bit codes with
    ``FAST16`` (:func:`_fast_bf16`): exact bf16 codes from the packed bytes four at a time and one bf16
    FMA an element, the same values."""
    V_NG: tl.constexpr = D // GS
    if _fast_bf16(FAST16, K_CPW, K_WB, DT):  # exact bf16 codes four bytes an instruction group, one bf16 FMA an element
        kc = _codes16(words_of(kr, K_WB, K_WBP), D, GS, K_CPW, True, DT)
        k = tl.fma(kc, ks.to(DT)[:, None], kz.to(DT)[:, None])
    else:
        kc = _code_f32(_unpack(words_of(kr, K_WB, K_WBP), D, GS, K_BITS, K_CPW))  # (D, GS): a channel's codes a row
        k = (kc * ks.to(tl.float32)[:, None] + kz.to(tl.float32)[:, None]).to(DT)
    s = _dot3(q, k, IEEE)  # (BLOCK_G, GS)
    n_ok = n0 + tl.arange(0, GS) < hi
    s = tl.where(n_ok[None, :], s * scale_log2, float("-inf"))
    m_i, alpha, p, l_i = _online(s, m_i, l_i)
    if _fast_bf16(FAST16, V_CPW, V_WB, DT):
        vc = tl.reshape(_codes16(words_of(vr, V_WB, V_WBP), GS, D, V_CPW, True, DT), [GS, V_NG, GS])
        v = tl.reshape(_scale16(vc, vs, vz, True, DT), [GS, D])
    else:
        vc = _code_f32(_unpack(words_of(vr, V_WB, V_WBP), GS, D, V_BITS, V_CPW))  # (GS, D)
        v = tl.reshape(vc, [GS, V_NG, GS]) * vs.to(tl.float32)[:, :, None] + vz.to(tl.float32)[:, :, None]
        v = tl.reshape(v, [GS, D]).to(DT)
    acc = acc * alpha[:, None] + _dot3(p.to(DT), v, IEEE)
    return m_i, l_i, acc


@triton.jit
def decode_split(Q, KC, KS, KZ, KR, VC, VS, VZ, VR, Lens, MidO, MidL, scale_log2, H_kv, NS, SPLIT,
                 sqb, sqh, kcb, kch, kcg, ksb, ksh, ksg, kzb, kzh, kzg, krb, krh, krs,
                 vcb, vch, vcs, vsb, vsh, vss, vzb, vzh, vzs, vrb, vrh, vrs,
                 sob, soh, sos, slb, slh, sls,
                 G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, GS: tl.constexpr, R: tl.constexpr,
                 K_BITS: tl.constexpr, K_CPW: tl.constexpr, K_WB: tl.constexpr, K_WBP: tl.constexpr,
                 V_BITS: tl.constexpr, V_CPW: tl.constexpr, V_WB: tl.constexpr, V_WBP: tl.constexpr,
                 DT: tl.constexpr, IEEE: tl.constexpr, FAST16: tl.constexpr):
    """Program (range, row * H_kv + kv head), the kv head's query group at once. With L = lengths[b], keys of
    slots below nq_k = floor(L / R) R are codes, values below nq_v = max(L - R, 0); the rest are in the rings.

    Ranges 0 .. NS-1 cover [0, nq_v) (both sides packed), one key group of GS slots per step (:func:`_step`):
    keys and values dequantized in registers and rounded to the model dtype as the reference store reads them,
    then one 2D dot each. Range NS, the tail [nq_v, L) (at most R + GS slots): keys dequantized from
    codes (groups below nq_k) or read from the key ring, values from the value ring, all rounded to the model
    dtype as the reference store reads them. 2D dots only."""
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H_kv
    h = pid_bh % H_kv
    L = tl.load(Lens + b).to(tl.int32)
    nq_k = (L // R) * R
    nq_v = tl.maximum(L - R, 0)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, D)
    g_ok = offs_g < G
    heads = h * G + offs_g
    b64 = b.to(tl.int64)
    q = tl.load(Q + b64 * sqb + heads[:, None] * sqh + offs_d[None, :], mask=g_ok[:, None], other=0.0).to(DT)
    KC += b64 * kcb + h * kch
    KS += b64 * ksb + h * ksh
    KZ += b64 * kzb + h * kzh
    KR += b64 * krb + h * krh
    VC += b64 * vcb + h * vch
    VS += b64 * vsb + h * vsh
    VZ += b64 * vzb + h * vzh
    VR += b64 * vrb + h * vrh
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    if pid_s < NS:
        lo = pid_s * SPLIT
        hi = tl.minimum(lo + SPLIT, nq_v)
        # two key groups per iteration, each group's bytes loaded one group ahead of their use (buffers a, b)
        a_kr, a_ks, a_kz, a_vr, a_vs, a_vz = _raw(KC, KS, KZ, VC, VS, VZ, lo, hi, kcg, ksg, kzg, vcs, vss, vzs, D,
                                                  GS, K_BITS, K_CPW, K_WB, K_WBP, V_BITS, V_CPW, V_WB, V_WBP)
        for n0 in range(lo, hi, 2 * GS):
            b_kr, b_ks, b_kz, b_vr, b_vs, b_vz = _raw(KC, KS, KZ, VC, VS, VZ, n0 + GS, hi, kcg, ksg, kzg, vcs, vss,
                                                      vzs, D, GS, K_BITS, K_CPW, K_WB, K_WBP, V_BITS, V_CPW, V_WB,
                                                      V_WBP)
            m_i, l_i, acc = _step(q, a_kr, a_ks, a_kz, a_vr, a_vs, a_vz, n0, hi, m_i, l_i, acc, scale_log2, D, GS,
                                  K_BITS, K_CPW, K_WB, K_WBP, V_BITS, V_CPW, V_WB, V_WBP, DT, IEEE, FAST16)
            a_kr, a_ks, a_kz, a_vr, a_vs, a_vz = _raw(KC, KS, KZ, VC, VS, VZ, n0 + 2 * GS, hi, kcg, ksg, kzg, vcs,
                                                      vss, vzs, D, GS, K_BITS, K_CPW, K_WB, K_WBP, V_BITS, V_CPW,
                                                      V_WB, V_WBP)
            m_i, l_i, acc = _step(q, b_kr, b_ks, b_kz, b_vr, b_vs, b_vz, n0 + GS, hi, m_i, l_i, acc, scale_log2, D,
                                  GS, K_BITS, K_CPW, K_WB, K_WBP, V_BITS, V_CPW, V_WB, V_WBP, DT, IEEE, FAST16)
    else:
        for n0 in range(nq_v // GS * GS, L, GS):
            gi = n0 // GS
            offs_n = n0 + tl.arange(0, GS)
            quant = n0 < nq_k  # the whole group is codes or the whole group is in the ring (nq_k % GS == 0)
            kmask = offs_d < tl.where(quant, D, 0)
            kq = unpack_rows(KC + gi * kcg, offs_d, kmask, GS * K_BITS // 8, K_BITS, GS).to(tl.float32)
            ks = tl.load(KS + gi * ksg + offs_d, mask=kmask, other=0.0).to(tl.float32)
            kz = tl.load(KZ + gi * kzg + offs_d, mask=kmask, other=0.0).to(tl.float32)
            ring_k = (offs_n >= nq_k) & (offs_n < L)
            kr = tl.load(KR + (offs_n % R)[None, :] * krs + offs_d[:, None], mask=ring_k[None, :], other=0.0)
            kt = tl.where(quant, kq * ks[:, None] + kz[:, None], kr.to(tl.float32)).to(DT)  # (D, GS)
            ok = (offs_n >= nq_v) & (offs_n < L)
            s = tl.where(ok[None, :], _dot3(q, kt, IEEE) * scale_log2, float("-inf"))
            m_i, alpha, p, l_i = _online(s, m_i, l_i)
            vr = tl.load(VR + (offs_n % R)[:, None] * vrs + offs_d[None, :], mask=ok[:, None], other=0.0)  # (GS, D)
            acc = acc * alpha[:, None] + _dot3(p.to(DT), vr.to(DT), IEEE)
    has = l_i > 0
    inv = 1.0 / tl.where(has, l_i, 1.0)
    tl.store(MidO + b * sob + heads[:, None] * soh + pid_s * sos + offs_d[None, :], acc * inv[:, None],
             mask=g_ok[:, None])
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    tl.store(MidL + b * slb + heads * slh + pid_s * sls, lse, mask=g_ok)


@triton.jit
def append(Knew, Vnew, Lens, Valid, KC, KS, KZ, KR, VC, VS, VZ, VR, snb, snh, svnb, svnh,
           kcb, kch, kcg, ksb, ksh, ksg, kzb, kzh, kzg, krb, krh, krs,
           vcb, vch, vcs, vsb, vsh, vss, vzb, vzh, vzs, vrb, vrh, vrs,
           D: tl.constexpr, GS: tl.constexpr, R: tl.constexpr, K_BITS: tl.constexpr, V_BITS: tl.constexpr,
           V_CPW: tl.constexpr, V_WB: tl.constexpr, V_WBP: tl.constexpr, META: tl.constexpr):
    """Program (row b, kv head h): a decode step's new token at slot L = lengths[b] (valid rows only; the
    counters are advanced by the combine kernel). The value of slot L - R leaves the window: it is quantized
    (per token, groups of GS channels) into slot L - R; k, v go to ring slot L % R; when L + 1 is a multiple
    of R the key window is full: its R keys (the ring, the new key from registers) are quantized per channel
    in groups of GS tokens into key groups (L + 1 - R) / GS ... (the KIVI store's blocks). All as the
    reference store encodes (UniformQuantizer's arithmetic), without a host decision: device-side branches."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    b64 = b.to(tl.int64)
    L = tl.load(Lens + b)
    offs_d = tl.arange(0, D)
    if tl.load(Valid + b) != 0:
        KC += b64 * kcb + h * kch
        KS += b64 * ksb + h * ksh
        KZ += b64 * kzb + h * kzh
        KR += b64 * krb + h * krh
        VR += b64 * vrb + h * vrh
        k = tl.load(Knew + b64 * snb + h * snh + offs_d)
        v = tl.load(Vnew + b64 * svnb + h * svnh + offs_d)
        slot = L % R
        if L >= R:
            x = tl.load(VR + slot * vrs + offs_d).to(tl.float32)  # the value of slot L - R, leaving the window
            out = L - R
            _quantize_store(x, VC + b64 * vcb + h * vch + out * vcs, VS + b64 * vsb + h * vsh + out * vss,
                            VZ + b64 * vzb + h * vzh + out * vzs, D, D // GS, GS, 0, V_BITS, True, 1.0, META)
        tl.debug_barrier()  # every thread has read the ring slot before it is overwritten
        tl.store(VR + slot * vrs + offs_d, v.to(VR.dtype.element_ty))
        tl.store(KR + slot * krs + offs_d, k.to(KR.dtype.element_ty))
        if (L + 1) % R == 0:
            LEVELS: tl.constexpr = (1 << K_BITS) - 1
            CB: tl.constexpr = GS * K_BITS // 8  # bytes of one channel's group
            g0 = ((L + 1 - R) // GS).to(tl.int64)
            kf = k.to(tl.float32)
            wi = tl.arange(0, GS // 8)
            for t in tl.static_range(R // GS):
                # (D, GS / 8, 8): channel, word, code of the word; loaded in that shape, no reshape (see
                # _quant_attention_triton._store_codes: a reshape before packing misordered codes on the H100)
                tok = t * GS + wi[:, None] * 8 + tl.arange(0, 8)[None, :]  # ring slot == block position
                last = (tok == R - 1)[None, :, :]
                x = tl.load(KR + tok[None, :, :] * krs + offs_d[:, None, None], mask=~last, other=0.0).to(tl.float32)
                x = tl.where(last, kf[:, None, None], x)  # the new key from registers, not the ring
                lo = tl.min(tl.min(x, 2), 1)
                scale = _round_meta(tl.math.div_rn(tl.max(tl.max(x, 2), 1) - lo, tl.full(lo.shape, LEVELS, tl.float32)),
                                    META)
                zero = _round_meta(lo, META)
                y = tl.math.div_rn(x - zero[:, None, None],
                                   tl.broadcast_to(tl.maximum(scale, 1.1754943508222875e-38)[:, None, None], x.shape))
                y = tl.minimum(tl.maximum(y, 0.0), LEVELS * 1.0)
                codes = ((y + 12582912.0) - 12582912.0).to(tl.int32)  # round half to even, as torch.round
                store_words(KC + (g0 + t) * kcg, offs_d[:, None] * CB + wi[None, :] * K_BITS, codes,
                            tl.full([D, GS // 8], 1, tl.int1), K_BITS)
                tl.store(KS + (g0 + t) * ksg + offs_d, scale.to(KS.dtype.element_ty))
                tl.store(KZ + (g0 + t) * kzg + offs_d, zero.to(KZ.dtype.element_ty))
