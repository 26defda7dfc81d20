"""Attention straight from quantized K/V: the fused decode (and prefill) kernels of
:class:`methods.stores.CodecStore`, each beside the plain-torch reference it is tested against (DESIGN §7).

Why: a decode step is bandwidth-bound, so a cache read in fewer bytes should make it faster. That only
happens when the kernel reads the packed codes and dequantizes in registers; the reference path
(dequantize the whole cache into a dense tensor, then attend) reads the cache twice and writes it once.

Dispatch (how a codec names its kernel)
----------------------------------------
A codec of :class:`~methods.stores.CodecStore` declares ``kernel_layout(dim) -> dict | None``: a dict whose
``"kernel"`` entry names a family in :data:`KERNELS` (the rest is that family's description of the stored
fields), or None for "no fused kernel". K and V codecs must name the same family. ``KERNELS[name]`` is a class
with ``reason(layer, k_decl, v_decl) -> str | None`` (why it cannot serve this layer) and an instance per store
(``KERNELS[name](layer, k_decl, v_decl, batch=, device=, dtype=)``) with

- ``decode(store, q (B, H_q, D), k (B, H_kv, D), v (B, H_kv, D), valid (B,), *, scaling) -> (B, H_q, D)``:
  quantize the new token into slot ``store.lengths[b]`` (one append kernel: quantize in registers, store codes
  and metadata), attend over the stored slots [0, lengths[b]) dequantized in registers plus the new token
  exactly (the reference semantics of ``SlotStore.extend`` with ``overlay_new``), then advance
  ``store.lengths`` / ``store.seen`` by ``valid``. Static shapes, no host sync, no attribute rebinding: the
  engine captures it in a CUDA graph. A finished row (valid False) writes its token past its valid slots
  without counting it; its output is discarded (as in the reference);
- ``prefill(store, q (B, H_q, T, D), k, v (B, H_kv, T, D), *, start, scaling) -> (B, T, H_q, D)`` or None
  (the store then takes its reference path): every row holds ``start`` valid slots; quantize the chunk into
  slots start .. start+T-1 and attend over [0, start) as stored plus the chunk exactly (causal). The store
  advances its counters.

Kernel contract (each family writes these, as :func:`scalar_decode_attention` does)
------------------------------------------------------------------------------------
``<name>_decode_attention(q (B, H_q, D), <stored K fields (B, H_kv, S, n)>, <stored V fields>, lengths (B,)
int64, k_new (B, H_kv, D), v_new (B, H_kv, D), *, <layout>, scaling) -> (B, H_q, D)``: attention of one query
per row over the stored slots [0, lengths[b]) plus the new token (exact). Flash-decoding: the slots are split
into ``n_splits`` ranges (a function of shapes only, :func:`methods.kernels.attention.decode_splits`, so a
CUDA graph replays at every length); one program per (row, kv head, range) reads the range's packed K/V once
for the kv head's whole query group and writes a partial output and its log2-sum-exp; :func:`combine_new`
merges the ranges and the new token (one more term of the log-sum-exp) and can advance the counters.
``<name>_decode_attention_reference(...)``: the same in plain torch, dequantizing with the codec and an exact
softmax. Tests hold the kernel to the reference on CPU (``TRITON_INTERPRET=1``) and on the GPU.

The ``scalar`` family (this file)
---------------------------------
Per-token scalar codes with per-group metadata, :class:`ScalarLayout`: ``fmt="int"`` (uniform_int, quarot,
ratequant over those: value = code * scale + zero, codes of 1..8 bits packed as
:func:`methods.quantizers.pack_codes` does, a little-endian bit stream) and ``fmt="fp8"`` (e4m3 byte * scale,
one scale per vector), optionally after a randomized Hadamard rotation (QuaRot).

Layouts read (per kv head, slot-major, as CodecStore keeps them): codes ``(B, H_kv, S, D * bits / 8)`` uint8,
scale and zero ``(B, H_kv, S, D / group)`` in the model dtype. A tile of BLOCK_N slots is read as packed words
(one byte for 1/2/4/8 bits, kept as uint8; ``bits`` bytes = 8 codes for 3/5/6/7), split into code planes with
shifts and interleaved back into channel order with ``tl.join`` (no gather), as a 2-D ``(BLOCK_N, D)`` tile:

- one group per vector (fp8; QuaRot, whose group is the head): the codes themselves are the dot operand and the
  metadata is applied per slot, never per element: scores ``scale * (q . codes) + (zero - M * scale) * sum(q)``,
  values ``(p * scale) @ codes`` plus the per-row correction ``sum p * zero - M * sum(p * scale)``. A code
  becomes a dot operand by an OR into the mantissa of a 16-bit float M: bf16 128 + code (up to 7 bits), fp16
  1024 + code (8 bits); fp8 bytes are reinterpreted as e4m3 and widened to fp16. No integer-to-float
  conversion.
- several groups (uniform_int's 32 channels): the tile is dequantized per channel in registers, viewed as
  ``(BLOCK_N, groups, group)`` so each group's scale and zero point broadcast (code as fp32 by an OR into
  2^23's mantissa, one FMA), then rounded to the dot dtype.
- fp32 models (CPU tests) convert the codes and use IEEE dots, no offset (``TEST_MAGIC`` runs the offset
  algebra in fp32 too, since Triton's interpreter computes bf16 dots wrongly).

Prefill chunks (``prefill_layer``): the chunk is quantized into its slots (the append kernel), the stored past
is dequantized into a transient dense buffer (the ``dequant`` kernel: exactly the reference's ``_read``, in the
model dtype), the chunk's own k, v are copied after it, and the dense prefill kernel of ``full`` attends. The
buffer is one layer's past in the model dtype, as large as what the reference path materialises.

Speed: the first version (one batched 3-D dot per group) read 0.08-0.25 of the copy bandwidth on an H100
(results/bench/nvidia-h100-80gb-hbm3-2026-12-07-9f262d5.md). This 2-D version, tuned (``DECODE_CONFIG``: 8 programs
per SM, 3 stages; slot strides as constexprs so the metadata is copied asynchronously), reads at 8 x 32768 on an
H100: fp8 0.81 of copy bandwidth, INT4 g32 0.33, QuaRot INT4 0.30, INT2 0.19
(results/bench/nvidia-h100-80gb-hbm3-2026-12-07-e9d3ab8-quant-tune.md). fp8 and QuaRot handle their metadata the
same way, so the INT gap is the unpacking of sub-byte codes into channel order (``tl.join`` + ``tl.reshape``).
``decode_split_planar`` (``DECODE_CONFIG["planar"]``, INT4 only) never interleaves: the query is split into its even
and odd channels once, each byte's two codes are two planes, one dot and one accumulator per plane; off until a
GPU run of ``scripts/bench_quant_attention.py --tune`` measures it. Tunables are overridable with
``KVBENCH_QUANT_DECODE``. Those kernels are bound by the instructions they issue, not by the bytes they read (INT4
and INT2 took the same time): compiled for sm_90, the INT4 g32 loop issued about 9 SASS instructions an element,
most of them converting bytes to floats one at a time. ``DECODE_CONFIG["fast16"]`` (``KVBENCH_FAST16=1``) converts
4- and 2-bit codes four bytes at a time with inline PTX and dequantizes groups by one bf16 FMA an element (scalar
and KIVI kernels: 1125 -> 678 SASS instructions a tile, ``python -m tests.compile_check --quick --sass``); off by
default until a GPU run holds it to the reference and times it.

Rotation (QuaRot): the append kernel rotates the new key and the group's queries with R_K (and the value with
R_V) in fp32 (R = H diag(s) / sqrt(D), built once per store from the codec's counted signs), so the kernels
attend in the rotated space (q.k is unchanged) and the combine kernel un-rotates the output once (out @ R_V^T):
once per step, not per key. Prefill chunks rotate with torch matmuls.

Splits: ``decode_splits`` of the dense kernel (4 programs per SM), whole BLOCK_N tiles per range. The query
group is padded to 16 rows for the tensor cores (BLOCK_G).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import interpret_mode, interpreter_compat
from .attention import LOG2E, decode_splits, triton_next_pow2

FMTS = ("int", "fp8")
TEST_MAGIC = False  # tests set it: fp32 runs carry the code offset of the 16-bit paths (Triton's interpreter
# computes bf16 dots wrongly, so those paths are checked on the GPU; this checks their algebra on CPU)


# --------------------------------------------------------------------------------------------------
# Layouts


@dataclass(frozen=True)
class ScalarLayout:
    """How K or V is stored for the ``scalar`` kernels: ``fmt`` "int" (code * scale + zero, codes of ``bits``
    bits packed as a little-endian bit stream, one scale and zero point per ``group`` channels, range shrunk
    by ``clip`` when encoding) or "fp8" (e4m3 byte * scale, one scale per vector: group = head_dim)."""

    fmt: str
    bits: int
    group: int
    clip: float = 1.0

    @classmethod
    def from_decl(cls, decl: dict, dim: int) -> ScalarLayout:
        return cls(fmt=decl["fmt"], bits=int(decl["bits"]), group=int(decl.get("group") or dim),
                   clip=float(decl.get("clip", 1.0)))

    @property
    def zero(self) -> bool:
        return self.fmt == "int"

    @property
    def fields(self) -> tuple[str, ...]:
        return ("codes", "scale", "zero") if self.zero else ("codes", "scale")

    @property
    def codes_per_word(self) -> int:
        return 8 // self.bits if self.bits in (1, 2, 4, 8) else 8

    @property
    def word_bytes(self) -> int:
        return 1 if self.bits in (1, 2, 4, 8) else self.bits

    def reason(self, dim: int) -> str | None:
        """Why the kernels cannot read this layout at head_dim ``dim`` (None: they can)."""
        if self.fmt not in FMTS:
            return f"fmt {self.fmt!r} is not one of {FMTS}"
        if self.fmt == "fp8" and (self.bits != 8 or self.group != dim):
            return "fp8 stores one byte per channel and one scale per vector"
        if not 1 <= self.bits <= 8:
            return f"{self.bits}-bit codes (the kernels read 1..8)"
        g = self.group
        if g < 16 or g & (g - 1) or dim % g:
            return f"group {g} must be a power of two >= 16 dividing head_dim {dim} (a dot over a group needs 16)"
        if g % self.codes_per_word:
            return f"group {g} is not a whole number of {self.bits}-bit words"
        return None

    def dequantize(self, codes: Tensor, scale: Tensor, zero: Tensor | None) -> Tensor:
        """The reference decode: codes (..., n) uint8, scale / zero (..., D / group) -> (..., D) fp32."""
        from methods.quantizers import unpack_codes

        if self.fmt == "fp8":
            return codes.view(torch.float8_e4m3fn).float() * scale.float()
        q = unpack_codes(codes, self.bits).float()  # (..., D)
        *lead, D = q.shape
        x = q.reshape(*lead, D // self.group, self.group) * scale.float()[..., None] + zero.float()[..., None]
        return x.reshape(*lead, D)

    def consts(self, prefix: str, dim: int, dot: Any, magic: float, magic_bits: int, *, append: bool = False) -> dict:
        """The layout's constexpr arguments of the Triton kernels (``prefix`` "K" or "V")."""
        out = {f"{prefix}_GS": self.group, f"{prefix}_FMT": 0 if self.fmt == "int" else 1,
               f"{prefix}_BITS": self.bits, f"{prefix}_CPW": self.codes_per_word, f"{prefix}_WB": self.word_bytes,
               f"{prefix}_ZERO": self.zero, f"{prefix}_NG": dim // self.group}
        if append:
            out[f"{prefix}_WBP"] = triton_next_pow2(self.word_bytes)
            out[f"{prefix}_CLIP"] = float(self.clip)
        else:
            out.update({f"{prefix}_MAGIC": float(magic), f"{prefix}_MAGIC_BITS": int(magic_bits),
                        f"{prefix}DT": dot})
        return out


def _round_up(n: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is >= ``n``."""
    return -(-n // multiple) * multiple


def _dot_type(layout: ScalarLayout, dtype: torch.dtype) -> tuple[Any, float, int, bool]:
    """(Triton dot dtype, magic float, its 16-bit pattern, ieee) for reading ``layout`` in a ``dtype`` model."""
    import triton.language as tl

    if dtype == torch.float32:
        if TEST_MAGIC and layout.fmt == "int":  # tests: the 16-bit paths' offset algebra, on fp32 operands
            return tl.float32, 128.0, -1, True
        return tl.float32, 0.0, 0, True
    if layout.fmt == "fp8":
        return tl.float16, 0.0, 0, False
    interp = interpret_mode()  # the interpreter adds the offset (its bf16 bitcasts feed tl.dot wrong values)
    if layout.bits <= 7:
        return tl.bfloat16, 128.0, -1 if interp else 0x4300, False  # bf16 128 + code, code < 128
    return tl.float16, 1024.0, -1 if interp else 0x6400, False  # fp16 1024 + code, code < 1024


def _meta_code(dtype: torch.dtype) -> int:
    return {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}[dtype]


def rotation_matrix(signs: Tensor, *, device: Any = None) -> Tensor:
    """R (D, D) fp32 with x @ R = rotate(x, signs) (:func:`methods.quantizers.rotate`) and y @ R.T = unrotate(y)."""
    from methods.quantizers import rotate

    D = signs.shape[0]
    return rotate(torch.eye(D, dtype=torch.float32, device=signs.device), signs).to(device or signs.device).contiguous()


# --------------------------------------------------------------------------------------------------
# References


def scalar_decode_attention_reference(q: Tensor, k_codes: Tensor, k_scale: Tensor, k_zero: Tensor | None,
                                      v_codes: Tensor, v_scale: Tensor, v_zero: Tensor | None, lengths: Tensor,
                                      k_new: Tensor, v_new: Tensor, *, k_layout: ScalarLayout,
                                      v_layout: ScalarLayout, scaling: float) -> Tensor:
    """q (B, H_q, D); stored fields (B, H_kv, S, n); lengths (B,); k_new, v_new (B, H_kv, D) -> (B, H_q, D):
    exact softmax over the dequantized slots [0, lengths[b]) and the new token."""
    B, H_q, D = q.shape
    H_kv, S = k_codes.shape[1], k_codes.shape[2]
    G = H_q // H_kv
    k = torch.cat([k_layout.dequantize(k_codes, k_scale, k_zero), k_new.float()[:, :, None]], 2)  # (B, H_kv, S+1, D)
    v = torch.cat([v_layout.dequantize(v_codes, v_scale, v_zero), v_new.float()[:, :, None]], 2)
    qf = q.float().reshape(B, H_kv, G, D)
    s = torch.einsum("bhgd,bhsd->bhgs", qf, k) * scaling  # (B, H_kv, G, S+1)
    slots = torch.arange(S + 1, device=q.device)
    seen = (slots[None, :] < lengths[:, None]) | (slots[None, :] == S)  # (B, S+1): stored past + the new token
    s = s.masked_fill(~seen[:, None, None, :], float("-inf"))
    out = torch.einsum("bhgs,bhsd->bhgd", torch.softmax(s, dim=-1), v)
    return out.reshape(B, H_q, D).to(q.dtype)


def scalar_prefill_attention_reference(q: Tensor, k_codes: Tensor, k_scale: Tensor, k_zero: Tensor | None,
                                       v_codes: Tensor, v_scale: Tensor, v_zero: Tensor | None, k: Tensor, v: Tensor,
                                       *, start: int, k_layout: ScalarLayout, v_layout: ScalarLayout,
                                       scaling: float) -> Tensor:
    """q (B, H_q, T, D); stored fields of slots [0, start); the chunk's exact k, v (B, H_kv, T, D) ->
    (B, T, H_q, D): causal within the chunk, every stored slot visible."""
    B, H_q, T, D = q.shape
    H_kv = k.shape[1]
    past_k = past_v = k.new_zeros(B, H_kv, 0, D, dtype=torch.float32)
    if start:
        past_k = k_layout.dequantize(k_codes[:, :, :start], k_scale[:, :, :start],
                                     None if k_zero is None else k_zero[:, :, :start])
        past_v = v_layout.dequantize(v_codes[:, :, :start], v_scale[:, :, :start],
                                     None if v_zero is None else v_zero[:, :, :start])
    kk = torch.cat([past_k, k.float()], 2).repeat_interleave(H_q // H_kv, 1)  # (B, H_q, start+T, D)
    vv = torch.cat([past_v, v.float()], 2).repeat_interleave(H_q // H_kv, 1)
    s = torch.einsum("bhtd,bhsd->bhts", q.float(), kk) * scaling
    allowed = torch.arange(start + T, device=q.device)[None, :] <= (start + torch.arange(T, device=q.device))[:, None]
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhts,bhsd->bhtd", torch.softmax(s, -1), vv).transpose(1, 2).to(q.dtype)


# --------------------------------------------------------------------------------------------------
# Launchers


def _kernels():
    if interpret_mode():
        interpreter_compat()
    from . import _quant_attention_triton as K

    if not getattr(K, "_kvbench_env", False):
        _env_config()
        K._kvbench_env = True
    return K


def _launch(**options: int) -> dict[str, int]:
    return {} if interpret_mode() else options


def _strides3(t: Tensor | None, like: Tensor) -> tuple[int, int, int]:
    """(batch, head, slot) strides of a stored field (B, H, S, n) with unit stride along n."""
    t = like if t is None else t
    if t.stride(-1) != 1:
        raise ValueError(f"stored fields need unit stride along their last axis, got {t.stride()}")
    return t.stride(0), t.stride(1), t.stride(2)


BLOCK_N = 64
# Tuned on an H100 (scripts/bench_quant_attention.py --tune, INT4 g32 at 8 x 32768, commit e9d3ab8): 8 programs per
# SM and a 3-stage pipeline keep enough packed bytes in flight; results/bench/nvidia-h100-80gb-hbm3-2026-12-07-e9d3ab8*.md.
# ``planar``: INT4 layouts read by decode_split_planar (no interleave of the codes into channel order); off until
# measured on a GPU (the interleave is what bounds the INT4 kernel: fp8 streams at 0.81 of copy bandwidth, quarot4
# and uniform_int4 at 0.30-0.33 in the same call).
# ``fast16``: 4- and 2-bit codes become bf16 operands four bytes at a time (inline PTX) and groups are dequantized by
# one bf16 FMA an element (``_quant_attention_triton._codes16``; the KIVI kernels have the same switch in their own
# DECODE_CONFIG): sm_90 SASS of the INT4 g32 split loop 1125 -> 678 instructions a tile (``python -m
# tests.compile_check --quick --sass``). Off until a GPU run has held it to the reference and timed it (written
# without a GPU in session 13); ``KVBENCH_FAST16=1`` turns it on for both families, so does
# ``KVBENCH_QUANT_DECODE='{"fast16": true}'`` for these kernels. Never under the interpreter (no inline PTX).
DECODE_CONFIG = {"per_sm": 8, "num_warps": 4, "num_stages": 3, "block_n": BLOCK_N, "prefetch": False, "planar": False,
                 "fast16": False}


def _planar(k_layout: ScalarLayout, v_layout: ScalarLayout, dim: int) -> bool:
    """Whether the split runs :func:`decode_split_planar` (``DECODE_CONFIG["planar"]``, K and V both 4-bit ints two
    codes a byte, and half the head dim a valid dot size)."""
    if _kernels().TREE_MAX_CPW.value < 2:  # KVBENCH_UNPACK=direct: the planar kernel reads whole words only
        return False
    return (bool(DECODE_CONFIG.get("planar")) and all(lay.fmt == "int" and lay.bits == 4 for lay in (k_layout, v_layout))
            and dim // 2 >= 16)


def fast16_default(value: bool) -> bool:
    """``KVBENCH_FAST16`` (0 or 1) when set, else ``value``: the default of the scalar and KIVI kernels'
    ``DECODE_CONFIG["fast16"]``."""
    import os

    raw = os.environ.get("KVBENCH_FAST16")
    if raw is None or raw == "":
        return bool(value)
    if raw not in ("0", "1"):
        raise ValueError(f"KVBENCH_FAST16={raw!r}: use 1 (the bf16 conversion of 4- and 2-bit codes) or 0")
    return raw == "1"


def _env_config() -> None:
    """``KVBENCH_QUANT_DECODE='{"prefetch": true, "num_stages": 1, ...}'`` overrides DECODE_CONFIG (tuning runs
    of scripts/bench_quant_attention.py hand their choice to scripts/bench/ this way)."""
    import json
    import os

    DECODE_CONFIG["fast16"] = fast16_default(DECODE_CONFIG["fast16"])
    raw = os.environ.get("KVBENCH_QUANT_DECODE")
    if raw:
        DECODE_CONFIG.update(json.loads(raw))


def _fast16(k_scale: Tensor, v_scale: Tensor) -> bool:
    """Whether the split kernel runs ``DECODE_CONFIG["fast16"]``: asked for, compiled (the interpreter runs no inline
    PTX), and bf16 metadata (its groups are dequantized in bf16: an fp16 scale would be rounded to bf16 first)."""
    return (bool(DECODE_CONFIG.get("fast16")) and not interpret_mode()
            and k_scale.dtype == v_scale.dtype == torch.bfloat16)


def scalar_decode_split(q: Tensor, k_fields: tuple, v_fields: tuple, lengths: Tensor, mid_o: Tensor, mid_l: Tensor,
                        heads: Tensor, *, group: int, k_layout: ScalarLayout, v_layout: ScalarLayout, scaling: float,
                        n_splits: int, block_n: int | None = None, num_warps: int | None = None,
                        num_stages: int | None = None) -> None:
    """The split kernel over the kv heads ``heads`` (H_loc,) int32 (global indices; the stored fields
    (B, H_loc, S, n) hold those heads in order; ``group`` query heads per kv head): writes mid_o
    (B, H_q, n_splits, D) fp32 and mid_l (B, H_q, n_splits) of their query heads. ``k_fields`` /
    ``v_fields``: (codes, scale, zero or None); q (B, H_q, D) in any float dtype (the rotated fp32 queries
    for QuaRot)."""
    B, H_q, D = q.shape
    kc, ks, kz = k_fields
    vc, vs, vz = v_fields
    H_loc, S = kc.shape[1], kc.shape[2]
    K = _kernels()
    block_n = block_n or DECODE_CONFIG["block_n"]
    split = -(-S // n_splits)
    split = -(-split // block_n) * block_n
    kdt, kmag, kbits, ieee = _dot_type(k_layout, ks.dtype)  # metadata is kept in the model dtype
    vdt, vmag, vbits, _ = _dot_type(v_layout, vs.dtype)
    kernel = K.decode_split_planar if _planar(k_layout, v_layout, D) else K.decode_split
    kernel[(n_splits, B * H_loc)](
        q, kc, ks, kz if kz is not None else ks, vc, vs, vz if vz is not None else vs, lengths, heads, mid_o, mid_l,
        float(scaling) * LOG2E, H_loc, split, *q.stride(),
        *_strides3(kc, kc), *_strides3(ks, ks), *_strides3(kz, ks),
        *_strides3(vc, vc), *_strides3(vs, vs), *_strides3(vz, vs),
        *mid_o.stride(), *mid_l.stride(),
        G=group, BLOCK_G=max(16, triton_next_pow2(group)), BLOCK_N=block_n, D=D,
        **k_layout.consts("K", D, kdt, kmag, kbits), **v_layout.consts("V", D, vdt, vmag, vbits), IEEE=ieee,
        PREFETCH=bool(DECODE_CONFIG["prefetch"]), FAST16=_fast16(ks, vs),
        **_launch(num_warps=num_warps or DECODE_CONFIG["num_warps"],
                  num_stages=num_stages or DECODE_CONFIG["num_stages"]),
    )


def combine_new(mid_o: Tensor, mid_l: Tensor, q: Tensor, k_new: Tensor, v_new: Tensor, out: Tensor, *,
                scaling: float, rot_v_t: Tensor | None = None, advance: tuple[Tensor, Tensor, Tensor] | None = None
                ) -> Tensor:
    """Merge the splits (mid_o (B, H_q, ns, D) fp32, mid_l (B, H_q, ns) log2-sum-exp) with the new token's
    exact key and value (q (B, H_q, D), k_new, v_new (B, H_kv, D), any float dtype) into out (B, H_q, D).
    ``rot_v_t`` (D, D) fp32: out = merged @ rot_v_t (QuaRot's un-rotation). ``advance`` = (lengths, seen,
    valid): lengths and seen += valid, in place (the kernel's kv-head-0 program of each row)."""
    B, H_q, D = q.shape
    H_kv = k_new.shape[1]
    G = H_q // H_kv
    ns = mid_o.shape[2]
    lengths, seen, valid = advance if advance is not None else (mid_l, mid_l, mid_l)
    _kernels().decode_combine[(B * H_kv,)](
        mid_o, mid_l, q, k_new, v_new, out, rot_v_t if rot_v_t is not None else mid_o, lengths, seen, valid, ns,
        float(scaling) * LOG2E, H_kv, *mid_o.stride(), *mid_l.stride(), *q.stride(), *k_new.stride(),
        *v_new.stride(), *out.stride(), valid.stride(0) if advance is not None else 0,
        G=G, BLOCK_G=max(16, triton_next_pow2(G)), D=D, ROT=rot_v_t is not None, ADVANCE=advance is not None,
        IEEE=q.dtype == torch.float32, **_launch(num_warps=4),
    )
    return out


def scalar_decode_attention(q: Tensor, k_codes: Tensor, k_scale: Tensor, k_zero: Tensor | None, v_codes: Tensor,
                            v_scale: Tensor, v_zero: Tensor | None, lengths: Tensor, k_new: Tensor, v_new: Tensor, *,
                            k_layout: ScalarLayout, v_layout: ScalarLayout, scaling: float,
                            n_splits: int | None = None, block_n: int | None = None) -> Tensor:
    """Fused :func:`scalar_decode_attention_reference` (the kernel contract above): split kernel over the
    stored slots, then :func:`combine_new` with the new token. No host synchronisation."""
    B, H_q, D = q.shape
    H_kv, S = k_codes.shape[1], k_codes.shape[2]
    block_n = block_n or DECODE_CONFIG["block_n"]
    ns = n_splits or decode_splits(B, H_kv, S, q.device, block_n, DECODE_CONFIG["per_sm"])
    split = _round_up(-(-S // ns), block_n)
    ns = -(-S // split)
    mid_o = torch.empty(B, H_q, ns, D, dtype=torch.float32, device=q.device)
    mid_l = torch.empty(B, H_q, ns, dtype=torch.float32, device=q.device)
    heads = torch.arange(H_kv, dtype=torch.int32, device=q.device)
    scalar_decode_split(q, (k_codes, k_scale, k_zero), (v_codes, v_scale, v_zero), lengths, mid_o, mid_l, heads,
                        group=H_q // H_kv, k_layout=k_layout, v_layout=v_layout, scaling=scaling, n_splits=ns,
                        block_n=block_n)
    out = torch.empty(B, H_q, D, dtype=q.dtype, device=q.device)
    return combine_new(mid_o, mid_l, q, k_new, v_new, out, scaling=scaling)


def scalar_append(k: Tensor, v: Tensor, k_fields: tuple, v_fields: tuple, heads: Tensor, *, k_layout: ScalarLayout,
                  v_layout: ScalarLayout, lengths: Tensor | None = None, start: int = 0,
                  rotation: tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor] | None = None) -> None:
    """Quantize k, v (B, H_kv, T, D) (any float dtype; global kv heads ``heads`` (H_loc,) int32 go to the
    stored fields' local heads 0..H_loc-1) into slot ``lengths[b]`` (decode, T == 1) or start + t, as the
    codecs encode (:func:`scalar_encode_reference`). ``rotation`` (decode only) = (q (B, H_q, D), R_K, R_V,
    q_r, k_r, v_r): rotate the group's queries and the key by R_K, the value by R_V (fp32), write them to
    q_r (B, H_q, D), k_r, v_r (B, H_kv, D) and quantize the rotated key and value."""
    B, H_kv, T, D = k.shape
    kc, ks, kz = k_fields
    vc, vs, vz = v_fields
    H_loc = kc.shape[1]
    decode = lengths is not None
    if rotation is not None:
        q, rk, rv, qr, kr, vr = rotation
        G = q.shape[1] // H_kv
    else:
        q = qr = kr = vr = rk = rv = k
        G = 1
    z = ks
    _kernels().append[(B * H_loc, T)](
        k, v, q, lengths if decode else ks, heads, kc, ks, kz if kz is not None else z, vc, vs,
        vz if vz is not None else z, qr, kr, vr, rk, rv, int(start), H_loc,
        *k.stride(), *v.stride(), *(q.stride() if rotation is not None else (0, 0, 0)),
        *_strides3(kc, kc), *_strides3(ks, ks), *_strides3(kz, ks),
        *_strides3(vc, vc), *_strides3(vs, vs), *_strides3(vz, vs),
        *((qr.stride(0), qr.stride(1), kr.stride(0), kr.stride(1), vr.stride(0), vr.stride(1))
          if rotation is not None else (0,) * 6),
        G=G, BLOCK_R=max(16, triton_next_pow2(G + 1)), D=D, DECODE=decode, ROT=rotation is not None,
        **k_layout.consts("K", D, None, 0, 0, append=True), **v_layout.consts("V", D, None, 0, 0, append=True),
        META=_meta_code(ks.dtype), **_launch(num_warps=4, enable_fp_fusion=False),  # codes as the reference's
    )


def scalar_dequant(fields: tuple, heads: Tensor, out: Tensor, *, n_slots: int, layout: ScalarLayout) -> Tensor:
    """Stored slots [0, n_slots) of the fields (B, H_loc, S, n) (global kv heads ``heads``) dequantized into
    out (B, H_kv, >= n_slots, D) in out's dtype: what the codec's decode_fields gives in the model dtype."""
    c, sc, z = fields
    B, H_loc = c.shape[0], c.shape[1]
    D = out.shape[-1]
    if n_slots == 0:
        return out
    bn = 64
    _kernels().dequant[(-(-n_slots // bn), B * H_loc)](
        c, sc, z if z is not None else sc, heads, out, int(n_slots), H_loc, *_strides3(c, c), *_strides3(sc, sc),
        *_strides3(z, sc), *out.stride(), BLOCK_N=bn, D=D,
        **{k[2:]: v for k, v in layout.consts("X", D, None, 0, 0, append=True).items()
           if k[2:] in ("NG", "GS", "FMT", "BITS", "CPW", "WB", "ZERO")},
        **_launch(num_warps=4, enable_fp_fusion=False),  # code x scale + zero as two roundings, as the reference
    )
    return out


def scalar_encode_reference(x: Tensor, layout: ScalarLayout, *, meta_dtype: torch.dtype) -> dict[str, Tensor]:
    """What the codecs store for x (..., D) (the append kernel's reference): UniformQuantizer / Fp8TokenQuantizer."""
    from methods.quantizers import Fp8TokenQuantizer, UniformQuantizer

    if layout.fmt == "fp8":
        return Fp8TokenQuantizer().encode_fields(x, meta_dtype=meta_dtype)
    return UniformQuantizer(layout.bits, layout.group, layout.clip).encode_fields(x, meta_dtype=meta_dtype)


# --------------------------------------------------------------------------------------------------
# The scalar family's driver for CodecStore (and the registry of families)


class ScalarCodecKernel:
    """Fused decode and prefill of a :class:`~methods.stores.CodecStore` whose codecs declare
    ``{"kernel": "scalar", "fmt", "bits", "group", "clip", "signs" (optional: QuaRot's rotation)}``.

    Per decode step three launches (append, split, combine), as the dense store's. ``heads`` maps the store's kv
    heads to the layer's (a store may hold a subset of a layer's heads: RateQuant groups heads by width).
    Workspace (the rotated query, key and value of a step; rotation matrices rebuilt from the codecs' signs,
    which the store counts) is not KV and is excluded from the store's bytes."""

    name = "scalar"

    def __init__(self, layer: Any, k_decl: dict, v_decl: dict, *, batch: int, device: Any, dtype: torch.dtype,
                 heads: Tensor | None = None, workspace: tuple[Tensor, Tensor, Tensor] | None = None):
        D = layer.head_dim
        self.D = D
        self.k_layout, self.v_layout = ScalarLayout.from_decl(k_decl, D), ScalarLayout.from_decl(v_decl, D)
        self.group = layer.n_groups
        dev = torch.device(device)
        self.heads = (torch.arange(layer.n_kv_heads, dtype=torch.int32, device=dev) if heads is None
                      else heads.to(device=dev, dtype=torch.int32))
        self.rot_k = self.rot_v = self.rot_v_t = None
        if k_decl.get("signs") is not None:
            self.rot_k = rotation_matrix(k_decl["signs"], device=dev)  # (D, D) fp32
            self.rot_v = rotation_matrix(v_decl["signs"], device=dev)
            self.rot_v_t = self.rot_v.t().contiguous()
            if workspace is None:  # a store holding a subset of the layer's heads shares its layer's workspace
                workspace = rotation_workspace(batch, layer.n_q_heads, layer.n_kv_heads, D, dev)
            self.q_r, self.k_r, self.v_r = workspace

    @staticmethod
    def reason(layer: Any, k_decl: dict, v_decl: dict) -> str | None:
        D = layer.head_dim
        if D < 16 or D & (D - 1):
            return f"head_dim {D} is not a power of two >= 16"
        if layer.n_q_heads % layer.n_kv_heads:
            return f"{layer.n_q_heads} query heads are not a multiple of {layer.n_kv_heads} kv heads"
        if (k_decl.get("signs") is None) != (v_decl.get("signs") is None):
            return "K and V must both be rotated or both not"
        for name, decl in (("K", k_decl), ("V", v_decl)):
            why = ScalarLayout.from_decl(decl, D).reason(D)
            if why:
                return f"{name}: {why}"
        return None

    def fields(self, store: Any, name: str) -> tuple[Tensor, Tensor, Tensor | None]:
        return (getattr(store, f"{name}_codes"), getattr(store, f"{name}_scale"), getattr(store, f"{name}_zero", None))

    def n_splits(self, batch: int, n_heads: int, capacity: int, device: Any) -> int:
        bn = DECODE_CONFIG["block_n"]
        ns = decode_splits(batch, n_heads, capacity, device, bn, DECODE_CONFIG["per_sm"])
        split = _round_up(-(-capacity // ns), bn)
        return -(-capacity // split)

    # -- decode: the store's fields, one launch each of append / split / combine ----------------------
    def append_decode(self, store: Any, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Quantize the new token of kv heads ``self.heads`` into slot lengths[b]; returns the (rotated) q, k, v
        the split and combine kernels read."""
        kf, vf = self.fields(store, "k"), self.fields(store, "v")
        rot = None
        if self.rot_k is not None:
            rot = (q, self.rot_k, self.rot_v, self.q_r, self.k_r, self.v_r)
        scalar_append(k[:, :, None], v[:, :, None], kf, vf, self.heads, k_layout=self.k_layout,
                      v_layout=self.v_layout, lengths=store.lengths, rotation=rot)
        return (self.q_r, self.k_r, self.v_r) if rot is not None else (q, k, v)

    def split(self, store: Any, q: Tensor, mid_o: Tensor, mid_l: Tensor, *, scaling: float) -> None:
        scalar_decode_split(q, self.fields(store, "k"), self.fields(store, "v"), store.lengths, mid_o, mid_l,
                            self.heads, group=self.group, k_layout=self.k_layout, v_layout=self.v_layout,
                            scaling=scaling, n_splits=mid_o.shape[2])

    def decode(self, store: Any, q: Tensor, k: Tensor, v: Tensor, valid: Tensor, *, scaling: float) -> Tensor:
        B, H_q, D = q.shape
        qq, kk, vv = self.append_decode(store, q, k, v)
        ns = self.n_splits(B, len(self.heads), store.capacity, q.device)
        mid_o = torch.empty(B, H_q, ns, D, dtype=torch.float32, device=q.device)
        mid_l = torch.empty(B, H_q, ns, dtype=torch.float32, device=q.device)
        self.split(store, qq, mid_o, mid_l, scaling=scaling)
        out = torch.empty(B, H_q, D, dtype=q.dtype, device=q.device)
        return combine_new(mid_o, mid_l, qq, kk, vv, out, scaling=scaling, rot_v_t=self.rot_v_t,
                           advance=(store.lengths, store.seen, valid))

    # -- prefill chunk (every row holds `start` slots) ---------------------------------------------
    def rotate_chunk(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.rot_k is None:
            return q, k, v
        return q.float() @ self.rot_k, k.float() @ self.rot_k, v.float() @ self.rot_v

    def prefill_into(self, store: Any, k: Tensor, v: Tensor, kbuf: Tensor, vbuf: Tensor, *, start: int) -> None:
        """Quantize the chunk (already rotated) into slots start.. and dequantize this store's past [0, start)
        into kbuf, vbuf (B, H_kv, >= start, D) at its heads."""
        kf, vf = self.fields(store, "k"), self.fields(store, "v")
        scalar_append(k, v, kf, vf, self.heads, k_layout=self.k_layout, v_layout=self.v_layout, start=start)
        scalar_dequant(kf, self.heads, kbuf, n_slots=start, layout=self.k_layout)
        scalar_dequant(vf, self.heads, vbuf, n_slots=start, layout=self.v_layout)

    def prefill(self, store: Any, q: Tensor, k: Tensor, v: Tensor, *, start: int, scaling: float) -> Tensor:
        return prefill_layer([(store, self)], q, k, v, start=start, scaling=scaling)

    def unrotate(self, out: Tensor) -> Tensor:
        return out if self.rot_v_t is None else out @ self.rot_v_t


def prefill_layer(parts: list, q: Tensor, k: Tensor, v: Tensor, *, start: int, scaling: float) -> Tensor:
    """A prefill chunk of a layer whose kv heads are spread over (store, driver) ``parts`` (one for a CodecStore,
    one per width pair for RateQuant): every row holds ``start`` slots. Each part quantizes its heads of the
    chunk into its slots and dequantizes its past into one dense buffer (B, H_kv, start + T, D) in the model
    dtype, exactly what the reference path's ``_read`` gives; the chunk's own k, v go after it exactly; the
    dense prefill kernel (:func:`methods.kernels.attention.prefill_attention`) attends causally. The buffer is
    transient (one layer's past in the model dtype, as the reference path's read), so the stored cache stays
    packed. QuaRot: q, k, v are rotated by torch matmuls and the output un-rotated, once per chunk."""
    from .attention import prefill_attention

    drv = parts[0][1]
    B, H_q, T, D = q.shape
    qq, kk, vv = drv.rotate_chunk(q, k, v)
    dt = q.dtype
    kbuf = torch.empty(B, k.shape[1], start + T, D, dtype=dt, device=q.device)  # (B, H_kv, start + T, D)
    vbuf = torch.empty_like(kbuf)
    for store, d in parts:
        d.prefill_into(store, kk, vv, kbuf, vbuf, start=start)
    kbuf[:, :, start:].copy_(kk)
    vbuf[:, :, start:].copy_(vv)
    out = prefill_attention(qq.to(dt), kbuf, vbuf, start=start, scaling=scaling)  # (B, T, H_q, D)
    return drv.unrotate(out.float() if drv.rot_v_t is not None else out).to(dt)


def rotation_workspace(batch: int, n_q_heads: int, n_kv_heads: int, dim: int, device: Any
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """A decode step's rotated q (B, H_q, D), k, v (B, H_kv, D), fp32."""
    z = dict(dtype=torch.float32, device=device)
    return (torch.zeros(batch, n_q_heads, dim, **z), torch.zeros(batch, n_kv_heads, dim, **z),
            torch.zeros(batch, n_kv_heads, dim, **z))


from .turboquant_attention import TurboQuantCodecKernel  # noqa: E402 (no Triton import there)

# family name (a codec's kernel_layout()["kernel"]) -> driver
KERNELS: dict[str, Any] = {"scalar": ScalarCodecKernel, "turboquant": TurboQuantCodecKernel}


def codec_declarations(layer: Any, k_codec: Any, v_codec: Any) -> tuple[dict | None, dict | None]:
    D = layer.head_dim
    decl = [getattr(c, "kernel_layout", None) for c in (k_codec, v_codec)]
    return tuple(d(D) if callable(d) else None for d in decl)  # type: ignore[return-value]


def codec_kernel_reason(layer: Any, k_codec: Any, v_codec: Any) -> str | None:
    """Why no fused kernel serves these codecs on this layer (None: one does)."""
    kd, vd = codec_declarations(layer, k_codec, v_codec)
    if kd is None or vd is None:
        return "the codec declares no fused kernel (kernel_layout)"
    if kd.get("kernel") != vd.get("kernel"):
        return f"K and V codecs name different kernel families ({kd.get('kernel')!r}, {vd.get('kernel')!r})"
    family = KERNELS.get(kd.get("kernel"))
    if family is None:
        return f"no fused kernel family {kd.get('kernel')!r} (have {sorted(KERNELS)})"
    return family.reason(layer, kd, vd)


def codec_kernel(layer: Any, k_codec: Any, v_codec: Any, *, batch: int, device: Any, dtype: torch.dtype,
                 **kw: Any) -> Any:
    """The fused driver of a CodecStore with these codecs (raises ValueError with the reason if none)."""
    why = codec_kernel_reason(layer, k_codec, v_codec)
    if why:
        raise ValueError(f"no fused kernel for this store: {why}")
    kd, vd = codec_declarations(layer, k_codec, v_codec)
    return KERNELS[kd["kernel"]](layer, kd, vd, batch=batch, device=device, dtype=dtype, **kw)
