"""Triton helpers shared by the KIVI and TurboQuant kernels (imported on first use, like every ``_*_triton``
module): packed codes in and out, round-half-to-even, the Walsh-Hadamard matrix. Launchers, references and
documentation live in kivi_attention.py and turboquant_attention.py.

Packed codes follow :func:`methods.quantizers.pack_codes`: a little-endian bit stream, code i at bits
[i*BITS, (i+1)*BITS), read as words (one byte of 8 // BITS codes for 1, 2, 4, 8 bits; BITS bytes of 8 codes
otherwise) whose code planes a tree of joins puts back in order (no gather)."""

import triton
import triton.language as tl

from ._quant_attention_triton import (  # noqa: F401 (_store_codes re-exported for the TurboQuant kernels)
    TREE_MAX_CPW,
    _or,
    _shifted,
    _store_codes,
    _store_word_bytes,
    _unpack,
    _words,
)


@triton.jit
def unpack_rows(ptr, offs, ok, stride, BITS: tl.constexpr, COLS: tl.constexpr):
    """Codes (ROWS, COLS) int32: row r holds COLS codes of BITS bits packed (as pack_codes does) from byte
    ``ptr + offs[r] * stride`` (loaded where ``ok``, else 0); the word reader and join tree of the scalar
    kernels (:mod:`methods.kernels._quant_attention_triton`)."""
    CPW: tl.constexpr = 8 // BITS if 8 % BITS == 0 else 8  # codes per packed word
    WB: tl.constexpr = 1 if 8 % BITS == 0 else BITS  # bytes per word
    w = _words(ptr, offs, ok, stride, COLS, CPW, WB)  # (ROWS, COLS / CPW), (ROWS, COLS) unpacked directly
    return _unpack(w, offs.shape[0], COLS, BITS, CPW).to(tl.int32)


@triton.jit
def raw_words(C, offs, ok, stride, COLS: tl.constexpr, CPW: tl.constexpr, WB: tl.constexpr, WBP: tl.constexpr):
    """The packed words (COLS / CPW of WB bytes) of rows ``C + offs[r] * stride`` (where ``ok``) loaded as they
    are: uint8 (R, COLS / CPW, WBP), WBP = WB rounded up to a power of two (unpacked directly, CPW > ``TREE_MAX_CPW``:
    (R, COLS, WBP), the word of each code). Nothing consumes them here, so a loop can issue the next tile's loads before it computes
    with this one (:func:`words_of` assembles the words when they are used; one-byte words stay uint8, four a
    register)."""
    if CPW > TREE_MAX_CPW:
        w = (tl.arange(0, COLS) // CPW)[None, :, None]
    else:
        w = tl.arange(0, COLS // CPW)[None, :, None]
    k = tl.arange(0, WBP)[None, None, :]
    return tl.load(C + offs[:, None, None].to(tl.int64) * stride + w * WB + k, mask=ok[:, None, None] & (k < WB),
                   other=0)


@triton.jit
def words_of(raw, WB: tl.constexpr, WBP: tl.constexpr):
    """Bytes (R, NW, WBP) -> little-endian words (R, NW): uint8 for one byte, int32 up to 3, int64 above (the
    words :func:`methods.kernels._quant_attention_triton._unpack` reads)."""
    if WBP == 1:
        return tl.reshape(raw, [raw.shape[0], raw.shape[1]])
    elif WB <= 3:
        k = tl.arange(0, WBP)[None, None, :]
        return tl.sum(raw.to(tl.int32) << (8 * k), 2)
    else:
        k = tl.arange(0, WBP)[None, None, :]
        return tl.sum(raw.to(tl.int64) << (8 * k).to(tl.int64), 2)


@triton.jit
def store_words(ptr, word_off, codes, ok, BITS: tl.constexpr):
    """Pack ``codes`` (..., 8) int32 (the last axis: 8 consecutive codes) into words of BITS bytes stored at
    ``ptr + word_off`` (...,) where ``ok``: the layout of :func:`methods.quantizers.pack_codes`. The caller builds
    the 8-code axis by how it loads, not by reshaping codes (a reshape before packing misordered 2-bit codes on
    the H100: :func:`methods.kernels._quant_attention_triton._store_codes`); the fields are joined by an OR."""
    w = tl.reduce(_shifted(codes, tl.arange(0, 8), BITS), len(codes.shape) - 1, _or)
    _store_word_bytes(ptr, word_off, w, ok, BITS)


@triton.jit
def hadamard(D: tl.constexpr, c0, CH: tl.constexpr):
    """Columns c0 .. c0+CH-1 (D, CH) fp32 of the Walsh-Hadamard matrix, (-1)^popcount(i & j), unnormalised (+-1,
    exact in any float type; the orthonormal matrix of :func:`methods.quantizers.hadamard_transform` is this over
    sqrt(D)), generated in registers (D <= 256)."""
    x = tl.arange(0, D)[:, None] & (c0 + tl.arange(0, CH))[None, :]
    x = x ^ (x >> 4)
    x = x ^ (x >> 2)
    x = x ^ (x >> 1)
    return (1 - 2 * (x & 1)).to(tl.float32)


@triton.jit
def fwht(x, D: tl.constexpr, LOG_D: tl.constexpr):
    """Orthonormal Walsh-Hadamard transform of one vector x (D,) fp32 by butterflies, in the order and with
    the arithmetic of :func:`methods.quantizers.hadamard_transform` (a + b, a - b per stage, then 1 / sqrt(D)),
    so the result is bitwise the reference's."""
    for i in tl.static_range(LOG_D):  # stage i: pairs (j, j + 2^i) in blocks of 2^(i+1)
        y = tl.permute(tl.reshape(x, [D >> (i + 1), 2, 1 << i]), (0, 2, 1))  # (D / 2h, h, 2), h = 2^i
        a, b = tl.split(y)
        x = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 2, 1)), [D])
    return x * (1.0 / tl.sqrt(D * 1.0))


@triton.jit
def dot_f32(a, b, DT: tl.constexpr):
    """a (M, K) fp32 @ b (K, N), b's entries exact in DT (the Hadamard matrix's +-1, a sketch held in DT), to
    ~fp32 accuracy: IEEE for DT fp32 (CPU tests, fp32 models), else two DT tensor-core dots, a's DT head and its
    rounded rest (error ~2^-16 of |a| for bf16; no fp32 tile is held for an FMA dot)."""
    if DT == tl.float32:
        return tl.dot(a, b.to(tl.float32), input_precision="ieee")
    else:
        hi = a.to(DT)
        lo = (a - hi.to(tl.float32)).to(DT)
        bb = b.to(DT)
        return tl.dot(hi, bb) + tl.dot(lo, bb)


@triton.jit
def dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def combine_new(MidO, MidL, Q, KNew, VNew, Out, Lens, Seen, Valid, n_splits, scale_log2, H_kv,
                sob, soh, sos, slb, slh, sls, sqb, sqh, skb, skh, svb, svh, s_ob, s_oh,
                G: tl.constexpr, NS: tl.constexpr, D: tl.constexpr, ADVANCE: tl.constexpr):
    """One query head (program (b, hq)): merge the splits' partial outputs and log2-sum-exps with the new
    token's exact key and value; program (b, 0) then advances lengths[b] and seen[b] by valid[b]."""
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
    vn = tl.load(VNew + b * svb + hk * svh + offs_d).to(tl.float32)
    s_new = tl.sum(q * kn, 0) * scale_log2
    m = tl.maximum(tl.max(lse, 0), s_new)
    w = tl.exp2(lse - m)  # empty ranges (lse -inf) weigh 0
    w_new = tl.exp2(s_new - m)
    o = tl.load(MidO + b * sob + hq * soh + offs_s[:, None] * sos + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    out = (tl.sum(o * w[:, None], 0) + w_new * vn) / (tl.sum(w, 0) + w_new)
    tl.store(Out + b * s_ob + hq * s_oh + offs_d, out.to(Out.dtype.element_ty))
    if ADVANCE:
        if hq == 0:
            v = tl.load(Valid + b).to(tl.int64)
            tl.store(Lens + b, tl.load(Lens + b) + v)
            tl.store(Seen + b, tl.load(Seen + b) + v)
