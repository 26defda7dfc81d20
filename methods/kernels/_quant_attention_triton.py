"""Triton kernels of :mod:`methods.kernels.quant_attention` (imported on first use: Triton decides at import
time whether ``@triton.jit`` compiles or interprets, so ``TRITON_INTERPRET`` must be set before). Launchers,
references, the layouts and the kernel contract live in quant_attention.py.

Names: a K or V *layout* is described by constexprs ``FMT`` (0 int: code * scale + zero, 1 fp8: e4m3(code) *
scale), ``BITS``, ``GS`` (channels per scale group), ``CPW`` (codes per packed word), ``WB`` (bytes per word),
``ZERO`` (a zero point is stored), ``MAGIC`` / ``MAGIC_BITS`` (the float the dot operand carries on top of the
code: codes become 16-bit floats by an OR into the mantissa, no integer-to-float conversion; 0 = convert)."""

import os

import triton
import triton.language as tl

from ._common_triton import rnd

# How packed words become codes in channel order, fixed when this module is imported (``KVBENCH_UNPACK``): a layout
# of CPW codes a word is unpacked by a tree of joins when CPW <= TREE_MAX_CPW (a tile loads each packed word once and
# the joins interleave its code planes: fewest loads, the INT4 decode's measured path), else directly (each channel
# loads its own word, a byte read CPW times from L1, and shifts its code out; no join or reshape).
# "tree" (default): every width. "direct": none (the cross-check when a fused path parts from its reference on the
# GPU only; the planar INT4 kernel is off then). Both are held to the reference compiled on the GPU
# (tests/test_quant_kernels.py ``test_unpack_modes_match_the_reference_on_gpu``). The 2-bit parting of 03f98cf was
# not the tree: on the H100 at 765db5e the tree dequantized 2-bit codes exactly at head dim 64 while the append
# packed them out of order (:func:`_store_codes`).
_UNPACK_MODES = {"tree": 8, "direct": 0}
_UNPACK = os.environ.get("KVBENCH_UNPACK", "tree")
if _UNPACK not in _UNPACK_MODES:
    raise ValueError(f"KVBENCH_UNPACK={_UNPACK!r}: use one of {sorted(_UNPACK_MODES)} (default tree)")
TREE_MAX_CPW = tl.constexpr(_UNPACK_MODES[_UNPACK])
# --------------------------------------------------------------------------------------------------
# Codes: packed words -> (N, D) codes in channel order -> dot operands or dequantized values


@triton.jit
def _words(C, offs_n, n_ok, s_slot, COLS: tl.constexpr, CPW: tl.constexpr, WB: tl.constexpr):
    """Packed words (N, COLS / CPW) of slots ``offs_n`` (unpacked directly, CPW > ``TREE_MAX_CPW``: (N, COLS),
    column c holding the word of code c): word i is bytes i*WB .. i*WB + WB - 1, little-endian (bytes kept as uint8, so a tile holds 4
    codes-bytes per register; int32 up to 3 bytes, int64 above)."""
    if CPW > TREE_MAX_CPW:
        i = (tl.arange(0, COLS) // CPW)[None, :]
    else:
        i = tl.arange(0, COLS // CPW)[None, :]
    ptr = C + offs_n[:, None].to(tl.int64) * s_slot + i * WB
    m = n_ok[:, None]
    if WB == 1:
        w = tl.load(ptr, mask=m, other=0)
    elif WB <= 3:
        w = tl.load(ptr, mask=m, other=0).to(tl.int32)
        for k in tl.static_range(1, WB):
            w = w | (tl.load(ptr + k, mask=m, other=0).to(tl.int32) << (8 * k))
    else:
        w = tl.load(ptr, mask=m, other=0).to(tl.int64)
        for k in tl.static_range(1, WB):
            w = w | (tl.load(ptr + k, mask=m, other=0).to(tl.int64) << (8 * k))
    return w


@triton.jit
def _code(w, j: tl.constexpr, BITS: tl.constexpr):
    return ((w >> (j * BITS)) & ((1 << BITS) - 1)).to(tl.uint8)


@triton.jit
def _unpack(w, N: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, CPW: tl.constexpr):
    """Words (N, D / CPW) -> codes (N, D) uint8 in channel order (code j of word i is channel CPW * i + j): a
    tree of joins interleaves the CPW code planes (each join adds an in-register axis; the reshape merges it).
    Direct (CPW > ``TREE_MAX_CPW``): words (N, D), one per channel (:func:`_words`), each shifted by its code's
    place. One return after the branches: Triton's compiler goes on past a return inside a compile-time ``if``, so an
    early return would compile the tree after it as well (the interpreter would not)."""
    if CPW > TREE_MAX_CPW:
        sh = ((tl.arange(0, D) % CPW) * BITS)[None, :]
        c = ((w >> sh.to(w.dtype)) & ((1 << BITS) - 1)).to(tl.uint8)
    else:
        if CPW == 1:
            t = w
        elif CPW == 2:
            t = tl.join(_code(w, 0, BITS), _code(w, 1, BITS))
        elif CPW == 4:
            t = tl.join(tl.join(_code(w, 0, BITS), _code(w, 2, BITS)), tl.join(_code(w, 1, BITS), _code(w, 3, BITS)))
        else:
            t = tl.join(
                tl.join(tl.join(_code(w, 0, BITS), _code(w, 4, BITS)), tl.join(_code(w, 2, BITS), _code(w, 6, BITS))),
                tl.join(tl.join(_code(w, 1, BITS), _code(w, 5, BITS)), tl.join(_code(w, 3, BITS), _code(w, 7, BITS))))
        c = tl.reshape(t, [N, D])
    return c


@triton.jit
def _operand(c, FMT: tl.constexpr, MAGIC: tl.constexpr, MAGIC_BITS: tl.constexpr, DT: tl.constexpr):
    """Codes (uint8) -> dot operand in DT: fp8 bytes reinterpreted; int codes OR-ed into the mantissa of
    MAGIC (value MAGIC + code, exact), added (MAGIC_BITS < 0, the interpreter) or converted (MAGIC_BITS 0)."""
    if FMT == 1:
        return c.to(tl.float8e4nv, bitcast=True).to(DT)
    elif MAGIC_BITS == 0:
        return c.to(tl.float32).to(DT)
    elif MAGIC_BITS < 0:
        return (c.to(tl.float32) + MAGIC).to(DT)
    else:
        return (c.to(tl.int16) | MAGIC_BITS).to(DT, bitcast=True)


@triton.jit
def _code_f32(c):
    """int codes (< 2^23) -> fp32, exact, without an integer-to-float conversion: 2^23 + c by an OR, minus 2^23."""
    return (c.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _meta(S, offs_n, n_ok, s_slot, NG: tl.constexpr):
    """Per-slot per-group metadata (scale or zero point) as (N, NG) fp32."""
    grp = tl.arange(0, NG)
    return tl.load(S + offs_n[:, None].to(tl.int64) * s_slot + grp[None, :], mask=n_ok[:, None], other=0.0).to(
        tl.float32)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _load_tile(C, S, Z, offs_n, n_ok, cs, ss, zs, D: tl.constexpr, NG: tl.constexpr, CPW: tl.constexpr,
               WB: tl.constexpr, ZERO: tl.constexpr):
    """The raw tile of slots ``offs_n``: packed words (N, D / CPW), scales and zero points ((N,) with one group,
    (N, NG) with several; zeros of the scale's shape when not stored)."""
    w = _words(C, offs_n, n_ok, cs, D, CPW, WB)
    if NG == 1:
        sc = tl.load(S + offs_n.to(tl.int64) * ss, mask=n_ok, other=0.0).to(tl.float32)
        if ZERO:
            z = tl.load(Z + offs_n.to(tl.int64) * zs, mask=n_ok, other=0.0).to(tl.float32)
        else:
            z = tl.zeros_like(sc)
    else:
        sc = _meta(S, offs_n, n_ok, ss, NG)
        if ZERO:
            z = _meta(Z, offs_n, n_ok, zs, NG)
        else:
            z = tl.zeros_like(sc)
    return w, sc, z


@triton.jit
def _values(w, sc, z, N: tl.constexpr, D: tl.constexpr, NG: tl.constexpr, GS: tl.constexpr, FMT: tl.constexpr,
            BITS: tl.constexpr, CPW: tl.constexpr, ZERO: tl.constexpr):
    """Dequantized values (N, D) fp32 of a raw tile (the reference's decode, before rounding to the model dtype)."""
    c = _unpack(w, N, D, BITS, CPW)
    if FMT == 1:
        return c.to(tl.float8e4nv, bitcast=True).to(tl.float32) * sc[:, None]
    elif NG == 1:
        x = _code_f32(c) * sc[:, None]
        if ZERO:
            x += z[:, None]
        return x
    else:
        x = tl.reshape(_code_f32(c), [N, NG, GS]) * sc[:, :, None]
        if ZERO:
            x += z[:, :, None]
        return tl.reshape(x, [N, D])


def _planes_asm(bits: int, sub: bool) -> str:
    """PTX of :func:`_codes16`: four packed bytes (one register, ``pack=4``) -> their ``8 // bits`` code planes,
    each as four bf16 values in two registers (outputs $0 .. $(2P - 1), the input $(2P)): per plane a shift and
    a mask of all four bytes at once, then two byte permutes that put each code under the exponent byte 0x43 (bf16
    128 + code, exact for codes < 128); ``sub``: minus 128 (exact), the code itself."""
    planes = 8 // bits
    mask = ((1 << bits) - 1) * 0x01010101
    lines = ["{", ".reg .b32 t, m;", "mov.b32 m, 0x43004300;"]
    for j in range(planes):
        lines += [f"shr.b32 t, ${2 * planes}, {j * bits};", f"and.b32 t, t, {mask:#010x};",
                  f"prmt.b32 ${2 * j}, t, 0x43434343, 0x5140;", f"prmt.b32 ${2 * j + 1}, t, 0x43434343, 0x5342;"]
        if sub:
            lines += [f"sub.rn.bf16x2 ${2 * j}, ${2 * j}, m;", f"sub.rn.bf16x2 ${2 * j + 1}, ${2 * j + 1}, m;"]
    return "\n".join(lines + ["}"])


_ASM4, _ASM4_SUB = tl.constexpr(_planes_asm(4, False)), tl.constexpr(_planes_asm(4, True))
_ASM2, _ASM2_SUB = tl.constexpr(_planes_asm(2, False)), tl.constexpr(_planes_asm(2, True))
_ASM_OUT2, _ASM_OUT4 = tl.constexpr("=r," * 4 + "r"), tl.constexpr("=r," * 8 + "r")


@triton.jit
def _fast16(FAST: tl.constexpr, FMT: tl.constexpr, CPW: tl.constexpr, MAGIC_BITS: tl.constexpr):
    """Whether :func:`_codes16` serves a layout: the launcher asks for it (``FAST``: ``DECODE_CONFIG["fast16"]``
    of methods/kernels/quant_attention.py, never under the interpreter, which runs no inline PTX), int codes two
    or four a byte (4- and 2-bit), bf16 operands (0x4300: the GPU's bf16 models), unpacked by the join tree."""
    return FAST and FMT == 0 and MAGIC_BITS == 0x4300 and (CPW == 2 or CPW == 4) and CPW <= TREE_MAX_CPW


@triton.jit
def _planes16(w, SUB: tl.constexpr):
    """Packed bytes of two 4-bit codes -> their low and high code planes (each w's shape) as bf16: 128 + code, or
    the code itself (``SUB``), four bytes at a time (:func:`_planes_asm`)."""
    if SUB:
        c0, c1 = tl.inline_asm_elementwise(_ASM4_SUB, _ASM_OUT2, [w], dtype=(tl.bfloat16,) * 2, is_pure=True, pack=4)
    else:
        c0, c1 = tl.inline_asm_elementwise(_ASM4, _ASM_OUT2, [w], dtype=(tl.bfloat16,) * 2, is_pure=True, pack=4)
    return c0, c1


@triton.jit
def _codes16(w, N: tl.constexpr, D: tl.constexpr, CPW: tl.constexpr, SUB: tl.constexpr, DT: tl.constexpr):
    """Packed bytes (N, D / CPW) -> (N, D) bf16 in channel order: 128 + code (the dot operand of one group a
    vector), or the code itself (``SUB``: to dequantize in bf16). The conversion of :func:`_unpack` +
    :func:`_operand`, done on four bytes at a time by a few 32-bit instructions (:func:`_planes_asm`; Triton's own
    ops work byte by byte: about 9 SASS instructions an element of the INT4 split loop); the planes are
    interleaved by the same join tree as :func:`_unpack` (bf16 planes instead of uint8 ones)."""
    if CPW == 2:
        c0, c1 = _planes16(w, SUB)
        t = tl.join(c0, c1)
    else:
        if SUB:
            c0, c1, c2, c3 = tl.inline_asm_elementwise(_ASM2_SUB, _ASM_OUT4, [w], dtype=(tl.bfloat16,) * 4,
                                                       is_pure=True, pack=4)
        else:
            c0, c1, c2, c3 = tl.inline_asm_elementwise(_ASM2, _ASM_OUT4, [w], dtype=(tl.bfloat16,) * 4,
                                                       is_pure=True, pack=4)
        t = tl.join(tl.join(c0, c2), tl.join(c1, c3))
    return tl.reshape(t, [N, D])


@triton.jit
def _scale16(x, sc, z, ZERO: tl.constexpr, DT: tl.constexpr):
    """Exact codes (N, NG, GS) in DT times their group's scale plus its zero point (sc, z (N, NG)), one fused
    multiply-add in DT (tl.fma: one rounding whatever Triton's FP-fusion default, HFMA2 two elements an
    instruction on sm_90)."""
    if ZERO:
        y = tl.fma(x, sc.to(DT)[:, :, None], z.to(DT)[:, :, None])
    else:
        y = x * sc.to(DT)[:, :, None]
    return y


@triton.jit
def _values_dt(w, sc, z, N: tl.constexpr, D: tl.constexpr, NG: tl.constexpr, GS: tl.constexpr, FMT: tl.constexpr,
               BITS: tl.constexpr, CPW: tl.constexpr, ZERO: tl.constexpr, MAGIC_BITS: tl.constexpr,
               DT: tl.constexpr, FAST: tl.constexpr):
    """Dequantized values (N, D) in the dot dtype DT. bf16 int codes (:func:`_fast16`): code * scale + zero by
    one bf16 FMA an element on the exact code (the reference computes it in fp32, where code * scale is exact,
    and rounds once to the model dtype: the same value unless adding the zero point rounds in fp32); else
    :func:`_values` in fp32, rounded to DT."""
    if _fast16(FAST, FMT, CPW, MAGIC_BITS):
        x = _scale16(tl.reshape(_codes16(w, N, D, CPW, True, DT), [N, NG, GS]), sc, z, ZERO, DT)
        return tl.reshape(x, [N, D])
    else:
        return _values(w, sc, z, N, D, NG, GS, FMT, BITS, CPW, ZERO).to(DT)


@triton.jit
def _operand_tile(w, N: tl.constexpr, D: tl.constexpr, FMT: tl.constexpr, BITS: tl.constexpr, CPW: tl.constexpr,
                  MAGIC: tl.constexpr, MAGIC_BITS: tl.constexpr, DT: tl.constexpr, FAST: tl.constexpr):
    """A raw tile's dot operand (N, D) in DT (one group a vector): :func:`_codes16` where it serves, else
    :func:`_unpack` + :func:`_operand`."""
    if _fast16(FAST, FMT, CPW, MAGIC_BITS):
        x = _codes16(w, N, D, CPW, False, DT)
    else:
        x = _operand(_unpack(w, N, D, BITS, CPW), FMT, MAGIC, MAGIC_BITS, DT)
    return x


@triton.jit
def _qk(q, qsum, w, sc, z, N: tl.constexpr, D: tl.constexpr,
        NG: tl.constexpr, GS: tl.constexpr, FMT: tl.constexpr, BITS: tl.constexpr, CPW: tl.constexpr,
        ZERO: tl.constexpr, MAGIC: tl.constexpr, MAGIC_BITS: tl.constexpr, DT: tl.constexpr, IEEE: tl.constexpr,
        FAST: tl.constexpr):
    """Scores (R, N) of query rows q (R, D) (in DT; qsum (R,) their sums) against a raw key tile. One group per
    vector (fp8, QuaRot): the codes are the dot operand and the metadata scales the scores,
    scale * (q . codes) + (zero - MAGIC * scale) * sum(q); several groups: dequantized per channel first."""
    if NG == 1:
        d = _dot(q, tl.trans(_operand_tile(w, N, D, FMT, BITS, CPW, MAGIC, MAGIC_BITS, DT, FAST)), IEEE)  # (R, N)
        s = sc[None, :] * d
        if ZERO:
            s += (z - MAGIC * sc)[None, :] * qsum[:, None]
        elif MAGIC != 0:
            s -= (MAGIC * sc)[None, :] * qsum[:, None]
    else:
        k = _values_dt(w, sc, z, N, D, NG, GS, FMT, BITS, CPW, ZERO, MAGIC_BITS, DT, FAST)
        s = _dot(q, tl.trans(k), IEEE)
    return s


@triton.jit
def _pv(p, w, sc, z, N: tl.constexpr, D: tl.constexpr,
        NG: tl.constexpr, GS: tl.constexpr, FMT: tl.constexpr, BITS: tl.constexpr, CPW: tl.constexpr,
        ZERO: tl.constexpr, MAGIC: tl.constexpr, MAGIC_BITS: tl.constexpr, DT: tl.constexpr, IEEE: tl.constexpr,
        FAST: tl.constexpr):
    """Weights p (R, N) times a raw value tile -> ((R, D), a per-row correction (R,) to add to every channel). One
    group per vector: (p * scale) @ codes, correction sum_n p zero - MAGIC sum_n p scale; several groups: p @
    the dequantized values, no correction."""
    corr = tl.zeros([p.shape[0]], tl.float32)
    if NG == 1:
        pv = (p * sc[None, :]).to(DT)
        acc = _dot(pv, _operand_tile(w, N, D, FMT, BITS, CPW, MAGIC, MAGIC_BITS, DT, FAST), IEEE)
        if ZERO:
            corr += tl.sum(p * z[None, :], 1)
        if MAGIC != 0:
            corr -= MAGIC * tl.sum(pv.to(tl.float32), 1)
    else:
        v = _values_dt(w, sc, z, N, D, NG, GS, FMT, BITS, CPW, ZERO, MAGIC_BITS, DT, FAST)
        acc = _dot(p.to(DT), v, IEEE)
    return acc, corr


@triton.jit
def _online(s, m_i, l_i):
    """Online-softmax step on scores s (R, N) (log2 units, -inf where masked): new max, rescale, weights."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    return m_new, alpha, p, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _split_range(Heads, Lens, H_loc, split, BLOCK_N: tl.constexpr):
    """This split program's (s, b * H_loc + j): split s, row b, local kv head j, its global kv head h and the
    slots [lo, hi) it reads (``split`` a multiple of BLOCK_N, ``hi`` cut at the row's length). ``lo`` is declared
    a multiple of BLOCK_N (the launchers round ``split`` up to one), which the compiler's alignment analysis can
    use; it did not vectorize QuaRot's and fp8's per-slot scales (still 2-byte LDG in the sm_90 loop, 16 a tile):
    their mask ``offs_n < hi`` is per element."""
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H_loc
    j = pid_bh % H_loc
    h = tl.load(Heads + j)
    n_len = tl.load(Lens + b).to(tl.int32)
    lo = tl.multiple_of(pid_s * split, BLOCK_N)
    return pid_s, b, j, h, lo, tl.minimum(lo + split, n_len)


@triton.jit
def _group_query(Q, b, h, sqb, sqh, sqd, G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, DT: tl.constexpr):
    """The G query heads of kv head h in row b, padded to BLOCK_G rows for the tensor cores: (their global
    indices, which rows are real, q (BLOCK_G, D) in the dot dtype DT, each row's sum in fp32)."""
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, D)
    g_ok = offs_g < G
    heads = h * G + offs_g
    q = tl.load(Q + b * sqb + heads[:, None] * sqh + offs_d[None, :] * sqd, mask=g_ok[:, None], other=0.0).to(DT)
    return heads, g_ok, q, tl.sum(q.to(tl.float32), 1)


@triton.jit
def _finish(m_i, l_i):
    """(1 / sum of weights, log2-sum-exp) of a split's online softmax; an empty split: (1, -inf)."""
    has = l_i > 0
    return 1.0 / tl.where(has, l_i, 1.0), tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))


# --------------------------------------------------------------------------------------------------
# Decode: split kernel over the stored slots, combine kernel that merges the splits and the new token


@triton.jit
def decode_split(Q, KC, KS, KZ, VC, VS, VZ, Lens, Heads, MidO, MidL, scale_log2, H_loc, split,
                 sqb, sqh, sqd,
                 kcb, kch, kcs: tl.constexpr, ksb, ksh, kss: tl.constexpr, kzb, kzh, kzs: tl.constexpr,
                 vcb, vch, vcs: tl.constexpr, vsb, vsh, vss: tl.constexpr, vzb, vzh, vzs: tl.constexpr,
                 sob, soh, sos, sod, slb, slh, sls,
                 G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
                 K_NG: tl.constexpr, K_GS: tl.constexpr, K_FMT: tl.constexpr, K_BITS: tl.constexpr,
                 K_CPW: tl.constexpr, K_WB: tl.constexpr, K_ZERO: tl.constexpr, K_MAGIC: tl.constexpr,
                 K_MAGIC_BITS: tl.constexpr, KDT: tl.constexpr,
                 V_NG: tl.constexpr, V_GS: tl.constexpr, V_FMT: tl.constexpr, V_BITS: tl.constexpr,
                 V_CPW: tl.constexpr, V_WB: tl.constexpr, V_ZERO: tl.constexpr, V_MAGIC: tl.constexpr,
                 V_MAGIC_BITS: tl.constexpr, VDT: tl.constexpr, IEEE: tl.constexpr, PREFETCH: tl.constexpr,
                 FAST16: tl.constexpr):
    """Program (s, b * H_loc + j): local kv head j (global Heads[j]) of row b over the stored slots
    [s * split, min((s + 1) * split, lengths[b])) (split: a runtime multiple of BLOCK_N, so one compiled kernel
    serves every capacity), for the G query heads of its group at once; writes the partial output
    (normalised) and its log2-sum-exp per query head. The slot strides are constexprs: a tile's scales and
    zero points are then a run the compiler can prove contiguous and copies asynchronously with the codes
    (with a runtime stride every tile waited on synchronous 2-byte loads of its metadata; seen in the PTX
    for sm_90: ld.global.b16 in the loop, cp.async after). ``FAST16``: 4- and 2-bit bf16 operands by
    :func:`_codes16` (:func:`_fast16`)."""
    pid_s, b, j, h, lo, hi = _split_range(Heads, Lens, H_loc, split, BLOCK_N)
    heads, g_ok, q, qsum = _group_query(Q, b, h, sqb, sqh, sqd, G, BLOCK_G, D, KDT)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    corr = tl.zeros([BLOCK_G], tl.float32)
    kc0, ks0, kz0 = KC + b * kcb + j * kch, KS + b * ksb + j * ksh, KZ + b * kzb + j * kzh
    vc0, vs0, vz0 = VC + b * vcb + j * vch, VS + b * vsb + j * vsh, VZ + b * vzb + j * vzh
    offs_n = lo + tl.arange(0, BLOCK_N)
    n_ok = offs_n < hi
    if PREFETCH:  # the first tile; each iteration loads the next one before it computes (hides DRAM latency)
        wk, sk, zk = _load_tile(kc0, ks0, kz0, offs_n, n_ok, kcs, kss, kzs, D, K_NG, K_CPW, K_WB, K_ZERO)
        wv, sv, zv = _load_tile(vc0, vs0, vz0, offs_n, n_ok, vcs, vss, vzs, D, V_NG, V_CPW, V_WB, V_ZERO)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        if PREFETCH:
            nxt = offs_n + BLOCK_N
            nxt_ok = nxt < hi
            wk2, sk2, zk2 = _load_tile(kc0, ks0, kz0, nxt, nxt_ok, kcs, kss, kzs, D, K_NG, K_CPW, K_WB, K_ZERO)
            wv2, sv2, zv2 = _load_tile(vc0, vs0, vz0, nxt, nxt_ok, vcs, vss, vzs, D, V_NG, V_CPW, V_WB, V_ZERO)
        else:
            wk, sk, zk = _load_tile(kc0, ks0, kz0, offs_n, n_ok, kcs, kss, kzs, D, K_NG, K_CPW, K_WB, K_ZERO)
            wv, sv, zv = _load_tile(vc0, vs0, vz0, offs_n, n_ok, vcs, vss, vzs, D, V_NG, V_CPW, V_WB, V_ZERO)
        s = _qk(q, qsum, wk, sk, zk, BLOCK_N, D, K_NG, K_GS, K_FMT, K_BITS, K_CPW, K_ZERO, K_MAGIC, K_MAGIC_BITS,
                KDT, IEEE, FAST16)
        s = tl.where(n_ok[None, :], s * scale_log2, float("-inf"))
        m_i, alpha, p, l_i = _online(s, m_i, l_i)
        a, c = _pv(p, wv, sv, zv, BLOCK_N, D, V_NG, V_GS, V_FMT, V_BITS, V_CPW, V_ZERO, V_MAGIC, V_MAGIC_BITS, VDT,
                   IEEE, FAST16)
        acc = acc * alpha[:, None] + a
        corr = corr * alpha + c
        if PREFETCH:
            wk, sk, zk, wv, sv, zv = wk2, sk2, zk2, wv2, sv2, zv2
    inv, lse = _finish(m_i, l_i)
    out = (acc + corr[:, None]) * inv[:, None]
    offs_d = tl.arange(0, D)
    tl.store(MidO + b * sob + heads[:, None] * soh + pid_s * sos + offs_d[None, :] * sod, out, mask=g_ok[:, None])
    tl.store(MidL + b * slb + heads * slh + pid_s * sls, lse, mask=g_ok)


@triton.jit
def _plane_values(c, sc, z, N: tl.constexpr, H: tl.constexpr, NG: tl.constexpr, GS: tl.constexpr,
                  ZERO: tl.constexpr):
    """One code plane (N, H = D / 2) of 4-bit codes (column i is channel 2 i + j) dequantized in fp32: column i's
    group is i // (GS / 2) in both planes, so each plane is viewed as (N, NG, GS / 2) for its scales."""
    x = tl.reshape(_code_f32(c), [N, NG, GS // 2]) * sc[:, :, None]
    if ZERO:
        x += z[:, :, None]
    return tl.reshape(x, [N, H])


@triton.jit
def _plane_scale16(x, sc, z, N: tl.constexpr, H: tl.constexpr, NG: tl.constexpr, GS: tl.constexpr,
                   ZERO: tl.constexpr, DT: tl.constexpr):
    """A plane of exact bf16 codes (N, H) dequantized in bf16, one FMA an element (as :func:`_values_dt`)."""
    return tl.reshape(_scale16(tl.reshape(x, [N, NG, GS // 2]), sc, z, ZERO, DT), [N, H])


@triton.jit
def _plane_operands(w, sc, z, N: tl.constexpr, H: tl.constexpr, NG: tl.constexpr, GS: tl.constexpr,
                    FMT: tl.constexpr, BITS: tl.constexpr, ZERO: tl.constexpr, MAGIC: tl.constexpr,
                    MAGIC_BITS: tl.constexpr, DT: tl.constexpr, FAST: tl.constexpr):
    """The two code planes of a tile of packed bytes (N, H) as dot operands in DT: the codes (one group a vector:
    the magic operand) or the dequantized values (several groups). bf16 (:func:`_fast16`): both planes from one
    :func:`_planes16` per four bytes, and a plane's consecutive columns are consecutive bytes, which is how the
    tensor-core operand pairs them (no repacking, unlike the join of :func:`_codes16`)."""
    if _fast16(FAST, FMT, 2, MAGIC_BITS):
        if NG == 1:
            x0, x1 = _planes16(w, False)
        else:
            c0, c1 = _planes16(w, True)
            x0 = _plane_scale16(c0, sc, z, N, H, NG, GS, ZERO, DT)
            x1 = _plane_scale16(c1, sc, z, N, H, NG, GS, ZERO, DT)
    else:
        c0 = _code(w, 0, BITS)
        c1 = _code(w, 1, BITS)
        if NG == 1:
            x0 = _operand(c0, FMT, MAGIC, MAGIC_BITS, DT)
            x1 = _operand(c1, FMT, MAGIC, MAGIC_BITS, DT)
        else:
            x0 = _plane_values(c0, sc, z, N, H, NG, GS, ZERO).to(DT)
            x1 = _plane_values(c1, sc, z, N, H, NG, GS, ZERO).to(DT)
    return x0, x1


@triton.jit
def _planes_qk(q0, q1, qsum, w, sc, z, N: tl.constexpr, H: tl.constexpr, NG: tl.constexpr, GS: tl.constexpr,
               FMT: tl.constexpr, BITS: tl.constexpr, ZERO: tl.constexpr, MAGIC: tl.constexpr,
               MAGIC_BITS: tl.constexpr, DT: tl.constexpr, IEEE: tl.constexpr, FAST: tl.constexpr):
    """Scores (R, N) from a key tile of packed words (N, H), two codes a byte: one dot per code plane against the
    query's matching half (q0 = q[:, 0::2], q1 = q[:, 1::2]); the codes are never interleaved into channel order."""
    x0, x1 = _plane_operands(w, sc, z, N, H, NG, GS, FMT, BITS, ZERO, MAGIC, MAGIC_BITS, DT, FAST)
    d = _dot(q0, tl.trans(x0), IEEE)
    d += _dot(q1, tl.trans(x1), IEEE)
    if NG == 1:
        s = sc[None, :] * d
        if ZERO:
            s += (z - MAGIC * sc)[None, :] * qsum[:, None]
        elif MAGIC != 0:
            s -= (MAGIC * sc)[None, :] * qsum[:, None]
    else:
        s = d
    return s


@triton.jit
def _planes_pv(p, w, sc, z, N: tl.constexpr, H: tl.constexpr, NG: tl.constexpr, GS: tl.constexpr,
               FMT: tl.constexpr, BITS: tl.constexpr, ZERO: tl.constexpr, MAGIC: tl.constexpr,
               MAGIC_BITS: tl.constexpr, DT: tl.constexpr, IEEE: tl.constexpr, FAST: tl.constexpr):
    """Weights p (R, N) times a value tile of packed words (N, H) -> the two planes' outputs (R, H) each (channels
    0::2 and 1::2) and the per-row correction (R,) every channel gets (as :func:`_pv`)."""
    x0, x1 = _plane_operands(w, sc, z, N, H, NG, GS, FMT, BITS, ZERO, MAGIC, MAGIC_BITS, DT, FAST)
    corr = tl.zeros([p.shape[0]], tl.float32)
    if NG == 1:
        pv = (p * sc[None, :]).to(DT)
        if ZERO:
            corr += tl.sum(p * z[None, :], 1)
        if MAGIC != 0:
            corr -= MAGIC * tl.sum(pv.to(tl.float32), 1)
    else:
        pv = p.to(DT)
    a0 = _dot(pv, x0, IEEE)
    a1 = _dot(pv, x1, IEEE)
    return a0, a1, corr


@triton.jit
def decode_split_planar(Q, KC, KS, KZ, VC, VS, VZ, Lens, Heads, MidO, MidL, scale_log2, H_loc, split,
                        sqb, sqh, sqd,
                        kcb, kch, kcs: tl.constexpr, ksb, ksh, kss: tl.constexpr, kzb, kzh, kzs: tl.constexpr,
                        vcb, vch, vcs: tl.constexpr, vsb, vsh, vss: tl.constexpr, vzb, vzh, vzs: tl.constexpr,
                        sob, soh, sos, sod, slb, slh, sls,
                        G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
                        K_NG: tl.constexpr, K_GS: tl.constexpr, K_FMT: tl.constexpr, K_BITS: tl.constexpr,
                        K_CPW: tl.constexpr, K_WB: tl.constexpr, K_ZERO: tl.constexpr, K_MAGIC: tl.constexpr,
                        K_MAGIC_BITS: tl.constexpr, KDT: tl.constexpr,
                        V_NG: tl.constexpr, V_GS: tl.constexpr, V_FMT: tl.constexpr, V_BITS: tl.constexpr,
                        V_CPW: tl.constexpr, V_WB: tl.constexpr, V_ZERO: tl.constexpr, V_MAGIC: tl.constexpr,
                        V_MAGIC_BITS: tl.constexpr, VDT: tl.constexpr, IEEE: tl.constexpr, PREFETCH: tl.constexpr,
                 FAST16: tl.constexpr):
    """:func:`decode_split` for K and V both stored two 4-bit codes a byte (INT4: uniform_int, QuaRot, RateQuant's
    4-bit groups), without putting the codes back into channel order: the query is loaded as its two halves
    q[:, 0::2] and q[:, 1::2] (once per program), each byte's low and high codes are two planes, scores are one dot
    per plane, values accumulate one output per plane, and the partial output is written back to the even and odd
    channels once per range. Same arguments and results as decode_split (PREFETCH is ignored)."""
    H: tl.constexpr = D // 2
    pid_s, b, j, h, lo, hi = _split_range(Heads, Lens, H_loc, split, BLOCK_N)
    offs_g = tl.arange(0, BLOCK_G)
    offs_h = tl.arange(0, H)
    g_ok = offs_g < G
    heads = h * G + offs_g
    qp = Q + b * sqb + heads[:, None] * sqh + (2 * offs_h)[None, :] * sqd
    q0 = tl.load(qp, mask=g_ok[:, None], other=0.0).to(KDT)  # (BLOCK_G, H) channels 0, 2, 4, ...
    q1 = tl.load(qp + sqd, mask=g_ok[:, None], other=0.0).to(KDT)  # channels 1, 3, 5, ...
    qsum = tl.sum(q0.to(tl.float32), 1) + tl.sum(q1.to(tl.float32), 1)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc0 = tl.zeros([BLOCK_G, H], tl.float32)
    acc1 = tl.zeros([BLOCK_G, H], tl.float32)
    corr = tl.zeros([BLOCK_G], tl.float32)
    kc0, ks0, kz0 = KC + b * kcb + j * kch, KS + b * ksb + j * ksh, KZ + b * kzb + j * kzh
    vc0, vs0, vz0 = VC + b * vcb + j * vch, VS + b * vsb + j * vsh, VZ + b * vzb + j * vzh
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        wk, sk, zk = _load_tile(kc0, ks0, kz0, offs_n, n_ok, kcs, kss, kzs, D, K_NG, K_CPW, K_WB, K_ZERO)
        wv, sv, zv = _load_tile(vc0, vs0, vz0, offs_n, n_ok, vcs, vss, vzs, D, V_NG, V_CPW, V_WB, V_ZERO)
        s = _planes_qk(q0, q1, qsum, wk, sk, zk, BLOCK_N, H, K_NG, K_GS, K_FMT, K_BITS, K_ZERO, K_MAGIC,
                       K_MAGIC_BITS, KDT, IEEE, FAST16)
        s = tl.where(n_ok[None, :], s * scale_log2, float("-inf"))
        m_i, alpha, p, l_i = _online(s, m_i, l_i)
        a0, a1, c = _planes_pv(p, wv, sv, zv, BLOCK_N, H, V_NG, V_GS, V_FMT, V_BITS, V_ZERO, V_MAGIC, V_MAGIC_BITS,
                               VDT, IEEE, FAST16)
        acc0 = acc0 * alpha[:, None] + a0
        acc1 = acc1 * alpha[:, None] + a1
        corr = corr * alpha + c
    inv, lse = _finish(m_i, l_i)
    op = MidO + b * sob + heads[:, None] * soh + pid_s * sos + (2 * offs_h)[None, :] * sod
    tl.store(op, (acc0 + corr[:, None]) * inv[:, None], mask=g_ok[:, None])
    tl.store(op + sod, (acc1 + corr[:, None]) * inv[:, None], mask=g_ok[:, None])
    tl.store(MidL + b * slb + heads * slh + pid_s * sls, lse, mask=g_ok)


@triton.jit
def decode_combine(MidO, MidL, Q, Knew, Vnew, Out, RotV, Lens, Seen, Valid, n_splits, scale_log2, H_kv,
                   sob, soh, sos, sod, slb, slh, sls, sqb, sqh, sqd, skb, skh, skd, svb, svh, svd,
                   s_ob, s_oh, s_od, s_valid,
                   G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, ROT: tl.constexpr,
                   ADVANCE: tl.constexpr, IEEE: tl.constexpr):
    """Program (b * H_kv + h): merges the splits of the G query heads of kv head h and the new token's exact
    key and value (one more term of the log-sum-exp), un-rotates the output (``ROT``: out @ RotV) and, in
    program h == 0, advances lengths[b] and seen[b] by valid[b] (``ADVANCE``)."""
    pid = tl.program_id(0)
    b = pid // H_kv
    h = pid % H_kv
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, D)
    g_ok = offs_g < G
    heads = h * G + offs_g
    q = tl.load(Q + b * sqb + heads[:, None] * sqh + offs_d[None, :] * sqd, mask=g_ok[:, None], other=0.0).to(
        tl.float32)
    kn = tl.load(Knew + b * skb + h * skh + offs_d * skd).to(tl.float32)
    vn = tl.load(Vnew + b * svb + h * svh + offs_d * svd).to(tl.float32)
    m = tl.sum(q * kn[None, :], 1) * scale_log2  # (BLOCK_G,) the new token's score: its weight starts at 1
    l = tl.full([BLOCK_G], 1.0, tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32) + vn[None, :]
    for s in range(0, n_splits):
        lse = tl.load(MidL + b * slb + heads * slh + s * sls, mask=g_ok, other=float("-inf"))
        o = tl.load(MidO + b * sob + heads[:, None] * soh + s * sos + offs_d[None, :] * sod, mask=g_ok[:, None],
                    other=0.0)
        m_new = tl.maximum(m, lse)
        a = tl.exp2(m - m_new)
        w = tl.exp2(lse - m_new)  # an empty split (lse -inf) weighs 0
        l = l * a + w
        acc = acc * a[:, None] + o * w[:, None]
        m = m_new
    out = acc / l[:, None]
    if ROT:
        r = tl.load(RotV + offs_d[:, None] * D + offs_d[None, :])
        out = _dot(out, r, True)
    tl.store(Out + b * s_ob + heads[:, None] * s_oh + offs_d[None, :] * s_od, out.to(Out.dtype.element_ty),
             mask=g_ok[:, None])
    if ADVANCE:
        if h == 0:
            add = tl.load(Valid + b * s_valid).to(tl.int64)
            tl.store(Lens + b, tl.load(Lens + b) + add)
            tl.store(Seen + b, tl.load(Seen + b) + add)


# --------------------------------------------------------------------------------------------------
# Append: quantize new tokens in registers and store them


@triton.jit
def _round_meta(x, META: tl.constexpr):
    """Round fp32 to the metadata dtype (0 fp32, 1 bf16, 2 fp16) and back, as the reference's .to(meta)."""
    if META == 1:
        return rnd(x, tl.bfloat16)
    elif META == 2:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


@triton.jit
def _e4m3(y):
    """fp32 in [-448, 448] -> float8_e4m3fn bits (int32), round to nearest even as torch converts: normals by
    rounding the fp32 mantissa to 3 bits on the bit pattern (a carry moves the exponent), subnormals
    (|y| < 2^-6) as round_half_even(|y| * 2^9). Written out because Triton's interpreter drops the carry."""
    a = tl.abs(y)
    u = a.to(tl.uint32, bitcast=True)
    u = (u + 0x7FFFF + ((u >> 20) & 1)) & 0xFFF00000
    normal = ((((u >> 23) & 0xFF).to(tl.int32) - 120) << 3) | ((u >> 20) & 7).to(tl.int32)
    sub = ((a * 512.0 + 12582912.0) - 12582912.0).to(tl.int32)
    code = tl.where(a < 0.015625, sub, normal)
    return tl.where(y < 0, code | 128, code)


@triton.jit
def _or(a, b):
    return a | b


@triton.jit
def _shifted(codes, pos, BITS: tl.constexpr):
    """codes << pos * BITS, in int32 while eight codes fit 24 bits (BITS <= 3), else int64: the fields of a packed
    word before they are ORed together (:func:`_store_codes`, ``_codes_triton.store_words``)."""
    if BITS <= 3:
        out = codes << (pos * BITS)
    else:
        out = codes.to(tl.int64) << (pos * BITS).to(tl.int64)
    return out


@triton.jit
def _store_word_bytes(ptr, off, word, ok, BITS: tl.constexpr):
    """Words of eight codes -> their BITS bytes, little-endian, at ``ptr + off`` (byte k at ``off + k``) where ok
    (None: every word)."""
    for k in tl.static_range(BITS):
        tl.store(ptr + off + k, ((word >> (8 * k)) & 255).to(tl.uint8), mask=ok)


@triton.jit
def _store_codes(C, codes, N: tl.constexpr, BITS: tl.constexpr):
    """Codes (N,) int32 (each < 2^BITS) -> bytes C[0 .. N * BITS / 8), the little-endian bit stream of
    :func:`methods.quantizers.pack_codes`, eight codes to a word of BITS bytes (for 1, 2, 4 and 8 bits the same
    bytes as 8 // BITS codes a byte). Built without a reshape: an (N / 8, N) tile holds code c shifted to its place
    in word c // 8 and zero elsewhere, and an OR along the row makes the word (idempotent, so a layout that holds an
    element in two threads cannot double it). The reshape-and-sum this replaces packed 2-bit codes out of order on
    the H100 at head dim 64 (Triton 3.6, 765db5e: ``test_kernels_match_reference_on_gpu[k2g32int-v2-tiny]``) while
    the interpreter agreed."""
    c = tl.arange(0, N)
    wi = tl.arange(0, N // 8)
    mine = (c // 8)[None, :] == wi[:, None]  # (N / 8, N)
    word = tl.reduce(tl.where(mine, _shifted(codes[None, :], (c % 8)[None, :], BITS), 0), 1, _or)
    _store_word_bytes(C, wi * BITS, word, None, BITS)


@triton.jit
def _quantize_store(x, C, S, Z, D: tl.constexpr, NG: tl.constexpr, GS: tl.constexpr, FMT: tl.constexpr,
                    BITS: tl.constexpr, ZERO: tl.constexpr, CLIP: tl.constexpr, META: tl.constexpr):
    """One vector x (D,) fp32 -> codes at C (bytes), scale(s) at S, zero point(s) at Z, as the codec encodes:
    int: per group lo = min * clip, scale = rnd((max * clip - lo) / (2^bits - 1)), zero = rnd(lo),
    code = round_half_even((x - zero) / max(scale, tiny)) clamped; fp8: scale = rnd(absmax / 448),
    code = e4m3(clamp(x / max(scale, tiny), +-448)). Groups are rows of an (NG, D) mask over x, not a reshape
    (see :func:`_store_codes`); each channel's scale and zero come back by a max over its one group (exact)."""
    offs = tl.arange(0, D)
    mine = (offs // GS)[None, :] == tl.arange(0, NG)[:, None]  # (NG, D): channel d is in group d // GS
    grp = tl.arange(0, NG)
    if FMT == 1:
        amax = tl.max(tl.where(mine, tl.abs(x)[None, :], 0.0), 1)  # (NG,)
        scale = _round_meta(tl.math.div_rn(amax, tl.full(amax.shape, 448.0, tl.float32)), META)
        s = tl.max(tl.where(mine, tl.maximum(scale, 1.1754943508222875e-38)[:, None], 0.0), 0)  # (D,)
        y = tl.math.div_rn(x, s)
        y = tl.minimum(tl.maximum(y, -448.0), 448.0)
        codes = _e4m3(y)
    else:
        LEVELS: tl.constexpr = (1 << BITS) - 1
        lo = tl.min(tl.where(mine, x[None, :], float("inf")), 1) * CLIP
        hi = tl.max(tl.where(mine, x[None, :], float("-inf")), 1) * CLIP
        scale = _round_meta(tl.math.div_rn(hi - lo, tl.full(lo.shape, LEVELS, tl.float32)), META)
        zero = _round_meta(lo, META)
        s = tl.max(tl.where(mine, tl.maximum(scale, 1.1754943508222875e-38)[:, None], 0.0), 0)  # (D,)
        z = tl.max(tl.where(mine, zero[:, None], float("-inf")), 0)
        y = tl.math.div_rn(x - z, s)
        y = tl.minimum(tl.maximum(y, 0.0), LEVELS * 1.0)
        y = (y + 12582912.0) - 12582912.0  # round half to even (|y| < 2^22), as torch.round
        codes = y.to(tl.int32)
        if ZERO:
            tl.store(Z + grp, zero.to(Z.dtype.element_ty))
    tl.store(S + grp, scale.to(S.dtype.element_ty))
    _store_codes(C, codes, D, BITS)


@triton.jit
def append(Knew, Vnew, Q, Lens, Heads, KC, KS, KZ, VC, VS, VZ, QR, KR, VR, RotK, RotV, start, H_loc,
           snb, snh, snt, snd, svnb, svnh, svnt, svnd, sqb, sqh, sqd,
           kcb, kch, kcs, ksb, ksh, kss, kzb, kzh, kzs,
           vcb, vch, vcs, vsb, vsh, vss, vzb, vzh, vzs,
           sqrb, sqrh, skrb, skrh, svrb, svrh,
           G: tl.constexpr, BLOCK_R: tl.constexpr, D: tl.constexpr, DECODE: tl.constexpr, ROT: tl.constexpr,
           K_NG: tl.constexpr, K_GS: tl.constexpr, K_FMT: tl.constexpr, K_BITS: tl.constexpr,
           K_CPW: tl.constexpr, K_WB: tl.constexpr, K_WBP: tl.constexpr, K_ZERO: tl.constexpr,
           K_CLIP: tl.constexpr,
           V_NG: tl.constexpr, V_GS: tl.constexpr, V_FMT: tl.constexpr, V_BITS: tl.constexpr,
           V_CPW: tl.constexpr, V_WB: tl.constexpr, V_WBP: tl.constexpr, V_ZERO: tl.constexpr,
           V_CLIP: tl.constexpr, META: tl.constexpr):
    """Program (b * H_loc + j, t): the new token t of row b, local kv head j (global Heads[j]), goes to slot
    lengths[b] (``DECODE``; the caller's T is 1) or start + t. ``ROT`` (decode only): the key and the G query
    heads of the group are rotated by RotK, the value by RotV, in fp32 (rows padded to BLOCK_R for one dot),
    and written to QR / KR / VR for the split and combine kernels; the rotated key and value are quantized.
    Counters are not touched (the combine kernel advances them)."""
    pid = tl.program_id(0)
    t = tl.program_id(1)
    b = pid // H_loc
    j = pid % H_loc
    h = tl.load(Heads + j)
    offs_d = tl.arange(0, D)
    if DECODE:
        slot = tl.load(Lens + b)
    else:
        slot = start + t
    if ROT:
        offs_r = tl.arange(0, BLOCK_R)
        is_q = offs_r < G
        qrows = tl.load(Q + b * sqb + (h * G + offs_r[:, None]) * sqh + offs_d[None, :] * sqd, mask=is_q[:, None],
                        other=0.0).to(tl.float32)
        kn = tl.load(Knew + b * snb + h * snh + t * snt + offs_d * snd).to(tl.float32)
        rows = tl.where((offs_r == G)[:, None], kn[None, :], qrows)  # (BLOCK_R, D): G query heads, then k
        rk = tl.load(RotK + offs_d[:, None] * D + offs_d[None, :])
        rows = _dot(rows, rk, True)
        tl.store(QR + b * sqrb + (h * G + offs_r[:, None]) * sqrh + offs_d[None, :], rows, mask=is_q[:, None])
        kx = tl.sum(tl.where((offs_r == G)[:, None], rows, 0.0), 0)
        vn = tl.load(Vnew + b * svnb + h * svnh + t * svnt + offs_d * svnd).to(tl.float32)
        vrows = tl.where((offs_r == 0)[:, None], vn[None, :], 0.0)
        rv = tl.load(RotV + offs_d[:, None] * D + offs_d[None, :])
        vx = tl.sum(tl.where((offs_r == 0)[:, None], _dot(vrows, rv, True), 0.0), 0)
        tl.store(KR + b * skrb + h * skrh + offs_d, kx)
        tl.store(VR + b * svrb + h * svrh + offs_d, vx)
    else:
        kx = tl.load(Knew + b * snb + h * snh + t * snt + offs_d * snd).to(tl.float32)
        vx = tl.load(Vnew + b * svnb + h * svnh + t * svnt + offs_d * svnd).to(tl.float32)
    slot64 = slot.to(tl.int64)
    _quantize_store(kx, KC + b * kcb + j * kch + slot64 * kcs, KS + b * ksb + j * ksh + slot64 * kss,
                    KZ + b * kzb + j * kzh + slot64 * kzs, D, K_NG, K_GS, K_FMT, K_BITS, K_ZERO, K_CLIP, META)
    _quantize_store(vx, VC + b * vcb + j * vch + slot64 * vcs, VS + b * vsb + j * vsh + slot64 * vss,
                    VZ + b * vzb + j * vzh + slot64 * vzs, D, V_NG, V_GS, V_FMT, V_BITS, V_ZERO, V_CLIP, META)


# --------------------------------------------------------------------------------------------------
# Dequantize stored slots (prefill chunks attend over them with the dense prefill kernel)


@triton.jit
def dequant(C, S, Z, Heads, Out, n_slots, H_loc, cb, ch, cs, sb, sh, ss, zb, zh, zs, sob, soh, sos, sod,
            BLOCK_N: tl.constexpr, D: tl.constexpr, NG: tl.constexpr, GS: tl.constexpr, FMT: tl.constexpr,
            BITS: tl.constexpr, CPW: tl.constexpr, WB: tl.constexpr, ZERO: tl.constexpr):
    """Program (slot block, b * H_loc + j): slots [m * BLOCK_N, ...) < n_slots of local kv head j -> Out[b,
    Heads[j]] in Out's dtype (the reference's decode_fields(dtype=model dtype))."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H_loc
    j = pid_bh % H_loc
    h = tl.load(Heads + j)
    offs_n = pid_m * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < n_slots
    w, sc, z = _load_tile(C + b * cb + j * ch, S + b * sb + j * sh, Z + b * zb + j * zh, offs_n, n_ok, cs, ss, zs, D,
                          NG, CPW, WB, ZERO)
    x = _values(w, sc, z, BLOCK_N, D, NG, GS, FMT, BITS, CPW, ZERO)
    offs_d = tl.arange(0, D)
    tl.store(Out + b * sob + h * soh + offs_n[:, None].to(tl.int64) * sos + offs_d[None, :] * sod,
             x.to(Out.dtype.element_ty), mask=n_ok[:, None])
