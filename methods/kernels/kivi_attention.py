"""Decode attention straight from a KIVI cache (Liu, Yuan et al., ICML 2024; :mod:`methods.kivi`), beside
the plain-torch reference it is tested against, and the graph-safe append of a decode step.

The layout read (:class:`methods.kivi.KiviStore`, per kv head): keys per channel in groups of GS tokens,
``k_codes`` (B, H, S/GS, D * GS * bits / 8) (a channel's GS codes packed along the tokens), ``k_scale`` /
``k_zero`` (B, H, S/GS, D); values per token in groups of GS channels, ``v_codes`` (B, H, S, D * bits / 8),
``v_scale`` / ``v_zero`` (B, H, S, D/GS); the full-precision rings ``k_res``, ``v_res`` (B, H, R, D), slot s
at ring slot s % R. With L stored tokens, keys below nq_k = floor(L / R) R are codes, values below
nq_v = max(L - R, 0); the rest are in the rings.

:func:`kivi_decode_attention`: flash-decoding as :func:`methods.kernels.attention.decode_attention` (``n_splits``
a function of shapes only, so a CUDA graph replays at every length; each kv head's codes read once for its
whole query group). Ranges 0 .. n-1 cover [0, nq_v), where both sides are packed, one key group of GS slots
per step, two steps per loop iteration with each group's packed bytes loaded one group ahead of its use (the
loads stay in flight while the previous group computes: a decode kernel is latency-bound otherwise). Keys
(D, GS) and values (GS, D) are dequantized in registers (code * scale + zero in fp32, the code made a float by
an OR into the exponent field; no integer conversion), rounded to the model dtype as the reference store
rounds them, and enter one 2D tensor-core dot each (batched 3D dots measured 0.08 of the copy bandwidth on an
H100 for the scalar kernels; results/bench/nvidia-h100-80gb-hbm3-2026-12-07-9f262d5.md). One more range per
(row, kv head) reads the tail [nq_v, L), at most R + GS slots: key groups below nq_k dequantized, the rest and
every value from the rings. :func:`~methods.kernels._codes_triton.combine_new` merges the ranges and the new
token, exact (the reference semantics: ``SlotStore.extend`` overlays the new token unquantized), by
log-sum-exp, and advances the counters in a store's step.

:func:`kivi_append`: a decode step's writes, on the device with no host decision (graph-safe): the value
leaving the window (slot L - R) quantized per token, k and v into ring slot L % R, and, when the key window
fills (L + 1 a multiple of R), its R keys quantized per channel into R / GS groups, under a device-side
branch. The arithmetic is UniformQuantizer's (IEEE division, round half to even, scale and zero point
rounded to the model dtype), so the codes are bitwise the reference store's.

Numerics: fp32 inputs use IEEE dots (the CPU tests, ~1e-7 from the reference); bf16 / fp16 models use
tensor-core dots in 16 bits with fp32 accumulation on the keys and values the reference reads (rounded to the
model dtype) and the softmax weights rounded to 16 bits, as the dense kernel does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import interpret_mode, interpreter_compat
from .attention import HEAD_DIMS, LOG2E, decode_splits, triton_next_pow2

# ``fast16``: the bf16 conversion of 4- and 2-bit codes (methods/kernels/quant_attention.py ``DECODE_CONFIG``): sm_90
# SASS of the k4v4 split loop 1321 -> 961 instructions; off until measured on a GPU (``KVBENCH_FAST16=1`` turns it on)
DECODE_CONFIG = {"per_sm": 4, "num_warps": 4, "num_stages": 2, "fast16": False}


def _env_config() -> None:
    """``KVBENCH_KIVI_DECODE='{"per_sm": 2, "num_warps": 8}'`` overrides DECODE_CONFIG once, at the first launch (a tuning run
    of scripts/bench_kivi_turboquant.py --configs hands its choice to scripts/bench/ this way)."""
    import json
    import os

    global _ENV_DONE
    if not _ENV_DONE:
        _ENV_DONE = True
        from .quant_attention import fast16_default

        DECODE_CONFIG["fast16"] = fast16_default(DECODE_CONFIG["fast16"])
        raw = os.environ.get("KVBENCH_KIVI_DECODE")
        if raw:
            DECODE_CONFIG.update(json.loads(raw))


_ENV_DONE = False

FIELDS = ("k_codes", "k_scale", "k_zero", "k_res", "v_codes", "v_scale", "v_zero", "v_res")


# --------------------------------------------------------------------------------------------------
# References


def kivi_decode_attention_reference(q: Tensor, k_codes: Tensor, k_scale: Tensor, k_zero: Tensor, k_res: Tensor,
                                    v_codes: Tensor, v_scale: Tensor, v_zero: Tensor, v_res: Tensor, lengths: Tensor,
                                    k_new: Tensor, v_new: Tensor, *, k_bits: int, v_bits: int, group_size: int,
                                    residual_length: int, scaling: float) -> Tensor:
    """q (B, H_q, D); the store's fields; lengths (B,); k_new, v_new (B, H_kv, D) -> (B, H_q, D): exact softmax
    over the slots [0, lengths[b]) as the store reads them (:func:`methods.kivi_layout.read_dense`) and the new token."""
    from methods.kivi_layout import read_dense
    from methods.quantizers import UniformQuantizer

    B, H_q, D = q.shape
    S = int(lengths.max()) if lengths.numel() else 0
    kk, vv = read_dense(k_codes, k_scale, k_zero, k_res, v_codes, v_scale, v_zero, v_res, lengths, S,
                        kq=UniformQuantizer(k_bits, group_size), vq=UniformQuantizer(v_bits, group_size),
                        residual=residual_length, dtype=k_res.dtype)  # (B, H_kv, S, D)
    H_kv = kk.shape[1]
    kk = torch.cat([kk.float(), k_new.float()[:, :, None]], 2)  # (B, H_kv, S+1, D)
    vv = torch.cat([vv.float(), v_new.float()[:, :, None]], 2)
    qf = q.float().reshape(B, H_kv, H_q // H_kv, D)
    s = torch.einsum("bhgd,bhsd->bhgs", qf, kk) * scaling  # (B, H_kv, G, S+1)
    slots = torch.arange(S + 1, device=q.device)
    seen = (slots[None, :] < lengths[:, None]) | (slots[None, :] == S)  # (B, S+1)
    s = s.masked_fill(~seen[:, None, None, :], float("-inf"))
    vv = vv.masked_fill(~seen[:, None, :, None], 0.0)  # slots past a row's length are never read
    out = torch.einsum("bhgs,bhsd->bhgd", torch.softmax(s, -1), vv)
    return out.reshape(B, H_q, D).to(q.dtype)


def kivi_append_reference(k_new: Tensor, v_new: Tensor, fields: dict[str, Tensor], lengths: Tensor, valid: Tensor, *,
                          k_bits: int, v_bits: int, group_size: int, residual_length: int) -> None:
    """The writes of one decode step (what :meth:`methods.kivi.KiviStore._write_valid` does for one token),
    row by row, in place; the counters are not advanced."""
    from methods.kivi_layout import key_encode
    from methods.quantizers import UniformQuantizer

    R, G = residual_length, group_size
    kq, vq = UniformQuantizer(k_bits, G), UniformQuantizer(v_bits, G)
    meta = fields["k_scale"].dtype
    for b in range(k_new.shape[0]):
        if not bool(valid[b]):
            continue
        L = int(lengths[b])
        if L >= R:
            codes, scale, zero = vq.encode(fields["v_res"][b, :, L % R], meta_dtype=meta)  # (H, *)
            fields["v_codes"][b, :, L - R], fields["v_scale"][b, :, L - R], fields["v_zero"][b, :, L - R] = (
                codes, scale, zero)
        fields["v_res"][b, :, L % R] = v_new[b].to(fields["v_res"].dtype)
        fields["k_res"][b, :, L % R] = k_new[b].to(fields["k_res"].dtype)
        if (L + 1) % R == 0:
            g0 = (L + 1 - R) // G
            codes, scale, zero = key_encode(kq, fields["k_res"][b:b + 1], meta_dtype=meta)  # (1, H, R/G, *)
            fields["k_codes"][b, :, g0:g0 + R // G] = codes[0]
            fields["k_scale"][b, :, g0:g0 + R // G] = scale[0]
            fields["k_zero"][b, :, g0:g0 + R // G] = zero[0]


# --------------------------------------------------------------------------------------------------
# Launchers


def _kernels():
    if interpret_mode():
        interpreter_compat()
    from . import _codes_triton as C
    from . import _kivi_triton as K

    return K, C


def _launch(**options: int) -> dict[str, int]:
    return {} if interpret_mode() else options


def reason(*, head_dim: int, n_q_heads: int, n_kv_heads: int, k_bits: int, v_bits: int, group_size: int,
           residual_length: int) -> str | None:
    """Why the kernels cannot serve a KIVI layer (None: they can)."""
    D, G, R = head_dim, group_size, residual_length
    if D not in HEAD_DIMS:
        return f"head_dim {D} is not one of {HEAD_DIMS}"
    if n_q_heads % n_kv_heads:
        return f"{n_q_heads} query heads are not a multiple of {n_kv_heads} kv heads"
    if G < 16 or G & (G - 1) or G > D:
        return f"group_size {G} is not a power of two in 16..head_dim (a key group is one tile of a dot)"
    if R % G:
        return f"residual_length {R} is not a multiple of group_size {G}"
    for b in (k_bits, v_bits):
        if not 1 <= b <= 8:
            return f"{b}-bit codes (the kernels read 1..8)"
    return None


def _meta(dtype: torch.dtype) -> int:
    return {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}[dtype]


def _tl_dtype(dtype: torch.dtype):
    import triton.language as tl

    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


def _strides(fields: dict[str, Tensor]) -> list[int]:
    out = []
    for name in FIELDS:
        t = fields[name]
        if t.stride(-1) != 1:
            raise ValueError(f"{name} needs unit stride along its last axis, got {t.stride()}")
        out += [t.stride(0), t.stride(1), t.stride(2)]
    return out


def _layouts(k_bits: int, v_bits: int, group_size: int, dtype: torch.dtype) -> dict[str, Any]:
    """The constexprs of the code widths (packed words as the scalar kernels read them) and the dot dtype."""
    from .quant_attention import ScalarLayout

    kl, vl = ScalarLayout("int", k_bits, group_size), ScalarLayout("int", v_bits, group_size)
    return dict(K_BITS=k_bits, K_CPW=kl.codes_per_word, K_WB=kl.word_bytes, K_WBP=triton_next_pow2(kl.word_bytes),
                V_BITS=v_bits, V_CPW=vl.codes_per_word, V_WB=vl.word_bytes, V_WBP=triton_next_pow2(vl.word_bytes),
                DT=_tl_dtype(dtype), IEEE=dtype == torch.float32)


def _attend(q: Tensor, fields: dict[str, Tensor], lengths: Tensor, k_new: Tensor, v_new: Tensor, *, k_bits: int,
            v_bits: int, group_size: int, residual_length: int, scaling: float, n_splits: int | None,
            advance: tuple[Tensor, Tensor, Tensor] | None, between: Any = None, num_warps: int | None = None,
            num_stages: int | None = None) -> Tensor:
    """Split kernel, ``between()`` (a step's writes), combine kernel (with ``advance``: counters += valid)."""
    _env_config()
    B, H_q, D = q.shape
    H_kv, S = fields["v_codes"].shape[1], fields["v_codes"].shape[2]
    G, R = group_size, residual_length
    if q.stride(-1) != 1 or k_new.stride(-1) != 1 or v_new.stride(-1) != 1:
        raise ValueError("q, k_new and v_new need unit stride along D")
    ns = n_splits or decode_splits(B, H_kv, S, q.device, G, DECODE_CONFIG["per_sm"])
    per = -(-S // ns)
    split = -(-per // G) * G  # whole key groups per range
    ns = -(-S // split)
    mid_o = torch.empty(B, H_q, ns + 1, D, dtype=torch.float32, device=q.device)  # + the tail range
    mid_l = torch.empty(B, H_q, ns + 1, dtype=torch.float32, device=q.device)
    out = torch.empty(B, H_q, D, dtype=q.dtype, device=q.device)
    K, C = _kernels()
    Gq = H_q // H_kv
    dtype = fields["k_res"].dtype
    K.decode_split[(ns + 1, B * H_kv)](
        q, *(fields[n] for n in FIELDS), lengths, mid_o, mid_l, float(scaling) * LOG2E, H_kv, ns, split, q.stride(0),
        q.stride(1), *_strides(fields), *mid_o.stride()[:3], *mid_l.stride(),
        G=Gq, BLOCK_G=max(16, triton_next_pow2(Gq)), D=D, GS=G, R=R,
        **_layouts(k_bits, v_bits, G, dtype), FAST16=bool(DECODE_CONFIG.get("fast16")) and not interpret_mode(),
        **_launch(num_warps=num_warps or DECODE_CONFIG["num_warps"],
                  num_stages=num_stages or DECODE_CONFIG["num_stages"]),
    )
    if between is not None:
        between()
    lens, seen, valid = advance if advance is not None else (lengths, lengths, lengths)
    C.combine_new[(B * H_q,)](
        mid_o, mid_l, q, k_new, v_new, out, lens, seen, valid, ns + 1, float(scaling) * LOG2E, H_kv,
        *mid_o.stride()[:3], *mid_l.stride(), q.stride(0), q.stride(1), k_new.stride(0), k_new.stride(1),
        v_new.stride(0), v_new.stride(1), out.stride(0), out.stride(1),
        G=Gq, NS=max(2, triton_next_pow2(ns + 1)), D=D, ADVANCE=advance is not None, **_launch(num_warps=4),
    )
    return out


def kivi_decode_attention(q: Tensor, k_codes: Tensor, k_scale: Tensor, k_zero: Tensor, k_res: Tensor,
                          v_codes: Tensor, v_scale: Tensor, v_zero: Tensor, v_res: Tensor, lengths: Tensor,
                          k_new: Tensor, v_new: Tensor, *, k_bits: int, v_bits: int, group_size: int,
                          residual_length: int, scaling: float, n_splits: int | None = None,
                          num_warps: int | None = None, num_stages: int | None = None) -> Tensor:
    """Fused :func:`kivi_decode_attention_reference`: split kernel (n ranges over the packed prefix, one over
    the tail), then the combine with the new token; no host synchronisation. Tunables default to
    ``DECODE_CONFIG``."""
    fields = dict(zip(FIELDS, (k_codes, k_scale, k_zero, k_res, v_codes, v_scale, v_zero, v_res)))
    return _attend(q, fields, lengths, k_new, v_new, k_bits=k_bits, v_bits=v_bits, group_size=group_size,
                   residual_length=residual_length, scaling=scaling, n_splits=n_splits, advance=None,
                   num_warps=num_warps, num_stages=num_stages)


def kivi_append(k_new: Tensor, v_new: Tensor, fields: dict[str, Tensor], lengths: Tensor, valid: Tensor, *,
                k_bits: int, v_bits: int, group_size: int, residual_length: int) -> None:
    """Fused :func:`kivi_append_reference`: one program per (row, kv head), no host synchronisation."""
    from .quant_attention import ScalarLayout

    B, H_kv, D = k_new.shape
    if k_new.stride(-1) != 1 or v_new.stride(-1) != 1:
        raise ValueError("k_new and v_new need unit stride along D")
    vl = ScalarLayout("int", v_bits, group_size)
    K, _ = _kernels()
    K.append[(B, H_kv)](
        k_new, v_new, lengths, valid, *(fields[n] for n in FIELDS), k_new.stride(0), k_new.stride(1),
        v_new.stride(0), v_new.stride(1), *_strides(fields),
        D=D, GS=group_size, R=residual_length, K_BITS=k_bits, V_BITS=v_bits, V_CPW=vl.codes_per_word,
        V_WB=vl.word_bytes, V_WBP=triton_next_pow2(vl.word_bytes), META=_meta(fields["k_scale"].dtype),
        **_launch(num_warps=4, enable_fp_fusion=False),  # no FMA contraction: codes as the reference's
    )


def kivi_decode_step(q: Tensor, k_new: Tensor, v_new: Tensor, fields: dict[str, Tensor], lengths: Tensor,
                     seen: Tensor, valid: Tensor, *, k_bits: int, v_bits: int, group_size: int, residual_length: int,
                     scaling: float) -> Tensor:
    """A KIVI store's decode step in three launches: attention over the stored slots (split kernel), the
    step's writes (:func:`kivi_append`, after the split: the value leaving the window is overwritten in its
    ring slot), then the combine with the new token, which advances lengths and seen by valid."""
    kw = dict(k_bits=k_bits, v_bits=v_bits, group_size=group_size, residual_length=residual_length)
    return _attend(q, fields, lengths, k_new, v_new, scaling=scaling, n_splits=None, advance=(lengths, seen, valid),
                   between=lambda: kivi_append(k_new, v_new, fields, lengths, valid, **kw), **kw)
