"""Decode attention straight from TurboQuant codes (paper 1's KV / KQV / QKQV schemes, arXiv:2605.08114;
TurboQuant, arXiv:2504.19874; QJL, arXiv:2406.03482), beside the plain-torch reference it is tested against.

What a :class:`methods.quantizers.TurboQuantizer` stores per token and kv head (CodecStore fields, each
(B, H_kv, S, n)): ``norm`` ||x||; ``codes``, the ``mse_bits``-bit Lloyd-Max indices of y = R u (u = x / ||x||,
R = H diag(s) / sqrt(D) the randomized Walsh-Hadamard rotation, packed as :func:`~methods.quantizers.pack_codes`);
with a QJL stage ``qjl``, the m sign bits of S r (r = y - centroid[codes], S the m x D Gaussian sketch) and
``gamma`` = ||r||. The reference store decodes x = ||x|| R^T (centroid[codes] + c gamma S^T sign), c =
sqrt(pi/2) / m, into a dense tensor and attends.

:func:`turboquant_decode_attention` never builds x. Flash-decoding as :func:`methods.kernels.attention.
decode_attention` (``n_splits`` a function of shapes only, so a CUDA graph replays at every length; each kv
head's codes read once for its whole query group), and per program:

- q is rotated once, q_r = R_K q (the Hadamard matrix is generated in registers from index bits, nothing is
  stored for it), so q . x = ||x|| (q_r . y) for every key;
- the key score is ||k|| (q_r . centroid[codes]) with the codebook looked up per element (a 2^b-entry table,
  L1-resident), and for a QJL key side (QKQV) plus ||k|| c gamma (S_K q_r) . sign: the projected query S_K q_r
  is computed once per program and the residual term is a dot product with the stored signs, QJL's unbiased
  estimator of <q_r, r> (paper 1 §(b)), not a dequantized copy of the key;
- values accumulate in the rotated space: sum p ||v|| centroid[codes] (D-dim) and, for a QJL value side
  (KQV, QKQV), sum p ||v|| gamma sign in the m-dim sketch space; at the end the sketch part is projected by
  S_V^T and the sum un-rotated (R_V^T), once per program, not per key;
- :func:`~methods.kernels._codes_triton.combine_new` merges the ranges with the new token, which attends
  exactly (the reference semantics: ``SlotStore.extend`` overlays the new token unquantized).

:func:`turboquant_append` encodes a decode step's new K and V into slot ``lengths[b]`` in one kernel (norm,
rotation, bucketize against the stored boundaries, codebook, residual sketch, bit packing), as
:meth:`~methods.quantizers.TurboQuantizer.encode_fields` does: codes equal the reference's except where a
rotated coordinate lies within float rounding of a codebook boundary (the norm and the rotation sum in another
order), and a sketch sign likewise at S r = 0.

Numerics: fp32 inputs use IEEE dot products (the CPU tests, ~1e-6 from the reference); bf16 / fp16 models use
tensor-core dots in the model dtype with fp32 accumulation (q_r, S q_r and the softmax weights are rounded to
the model dtype; the centroids and signs are exact in it). The rotations and projections run in fp32.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from . import interpret_mode, interpreter_compat
from .attention import HEAD_DIMS, LOG2E, decode_splits, triton_next_pow2

DECODE_CONFIG = {"per_sm": 4, "num_warps": 4, "num_stages": 2, "block_n": 32}


def _env_config() -> None:
    """``KVBENCH_TURBOQUANT_DECODE='{"per_sm": 2, "num_warps": 8}'`` overrides DECODE_CONFIG once, at the first launch (a tuning run
    of scripts/bench_kivi_turboquant.py --configs hands its choice to scripts/bench/ this way)."""
    import json
    import os

    global _ENV_DONE
    if not _ENV_DONE:
        _ENV_DONE = True
        raw = os.environ.get("KVBENCH_TURBOQUANT_DECODE")
        if raw:
            DECODE_CONFIG.update(json.loads(raw))


_ENV_DONE = False


# --------------------------------------------------------------------------------------------------
# References


def turboquant_decode_attention_reference(q: Tensor, k: dict[str, Tensor], v: dict[str, Tensor], lengths: Tensor,
                                          k_new: Tensor, v_new: Tensor, *, k_codec: Any, v_codec: Any,
                                          scaling: float) -> Tensor:
    """q (B, H_q, D); k, v: the codecs' stored fields {name: (B, H_kv, S, n)}; lengths (B,); k_new, v_new
    (B, H_kv, D) -> (B, H_q, D): exact softmax over the decoded slots [0, lengths[b]) and the new token."""
    B, H_q, D = q.shape
    kk = k_codec.decode_fields(k, dtype=torch.float32)  # (B, H_kv, S, D)
    vv = v_codec.decode_fields(v, dtype=torch.float32)
    H_kv, S = kk.shape[1], kk.shape[2]
    kk = torch.cat([kk, k_new.float()[:, :, None]], 2)  # (B, H_kv, S+1, D)
    vv = torch.cat([vv, v_new.float()[:, :, None]], 2)
    qf = q.float().reshape(B, H_kv, H_q // H_kv, D)
    s = torch.einsum("bhgd,bhsd->bhgs", qf, kk) * scaling  # (B, H_kv, G, S+1)
    slots = torch.arange(S + 1, device=q.device)
    seen = (slots[None, :] < lengths[:, None]) | (slots[None, :] == S)  # (B, S+1)
    s = s.masked_fill(~seen[:, None, None, :], float("-inf"))
    vv = vv.masked_fill(~seen[:, None, :, None], 0.0)  # slots past a row's length are never read
    out = torch.einsum("bhgs,bhsd->bhgd", torch.softmax(s, -1), vv)  # (B, H_kv, G, D)
    return out.reshape(B, H_q, D).to(q.dtype)


def turboquant_append_reference(k: Tensor, v: Tensor, k_fields: dict[str, Tensor], v_fields: dict[str, Tensor],
                                lengths: Tensor, *, k_codec: Any, v_codec: Any) -> None:
    """k, v (B, H_kv, D) encoded by the codecs into slot lengths[b] of the fields, in place."""
    b = torch.arange(k.shape[0], device=k.device)
    for x, fields, codec in ((k, k_fields, k_codec), (v, v_fields, v_codec)):
        meta = next(t.dtype for t in fields.values() if t.is_floating_point())
        for name, val in codec.encode_fields(x, meta_dtype=meta).items():  # (B, H_kv, n)
            fields[name][b, :, lengths] = val.to(fields[name].dtype)


# --------------------------------------------------------------------------------------------------
# Launchers


def _kernels():
    if interpret_mode():
        interpreter_compat()
    from . import _turboquant_triton as K

    return K


def _launch(**options: int) -> dict[str, int]:
    return {} if interpret_mode() else options


def _tl_dtype(dtype: torch.dtype):
    import triton.language as tl

    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


def reason(codec: Any, dim: int) -> str | None:
    """Why the kernels cannot serve a TurboQuantizer at head_dim ``dim`` (None: they can)."""
    if dim not in HEAD_DIMS or dim < 32:
        return f"head_dim {dim} is not one of {tuple(d for d in HEAD_DIMS if d >= 32)}"
    if codec.qjl_dim and (codec.qjl_dim < 32 or codec.qjl_dim & (codec.qjl_dim - 1)):
        return f"qjl_dim {codec.qjl_dim} is not a power of two >= 32 (the kernels read sketch bits in tiles of 32)"
    if codec.qjl_dim > 256:
        return f"qjl_dim {codec.qjl_dim} > 256 (the sketch is held in registers per program)"
    return None


def _fields(f: dict[str, Tensor], like: Tensor) -> list[Tensor]:
    return [f.get(n, like) for n in ("norm", "codes", "qjl", "gamma")]


def _strides(ts: list[Tensor], present: list[bool]) -> list[int]:
    out = []
    for t, p in zip(ts, present):
        if p and t.stride(-1) != 1:
            raise ValueError(f"stored fields need unit stride along their last axis, got {t.stride()}")
        out += [t.stride(0), t.stride(1), t.stride(2)] if p else [0, 0, 0]
    return out


def _present(codec: Any) -> list[bool]:
    return [True, bool(codec.mse_bits), bool(codec.qjl_dim), bool(codec.qjl_dim)]


def _consts(codec: Any, like: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(centroids, boundaries, sketch, signs), a dummy where the codec has none."""
    return tuple(t if t is not None else like for t in (codec.centroids, codec.boundaries, codec.sketch, codec.signs))


def _prepare(q: Tensor | None, k: Tensor | None, v: Tensor | None, k_fields: dict[str, Tensor],
             v_fields: dict[str, Tensor], lengths: Tensor, *, k_codec: Any, v_codec: Any, start: int | None = None
             ) -> tuple[Tensor | None, Tensor | None]:
    """One launch: with q (B, H_q, D), the rotated (and for a QJL key side projected) queries (B, H_q, D),
    (B, H_q, m_K) fp32; with k, v, their encoding: (B, H_kv, D) into slot lengths[b] (decode), or a chunk
    (B, H_kv, T, D) into slots start .. start+T-1."""
    kn = k_fields["norm"]
    B, H_kv = kn.shape[0], kn.shape[1]
    D = k_codec.dim
    append = k is not None
    decode = append and k.dim() == 3
    if k_codec.rotate != v_codec.rotate:
        raise ValueError("K and V codecs must both rotate or both not")
    for t in (q, k, v):
        if t is not None and t.stride(-1) != 1:
            raise ValueError("q, k and v need unit stride along D")
    qr = sq = None
    H_q = q.shape[1] if q is not None else H_kv
    if q is not None:
        qr = torch.empty(B, H_q, D, dtype=torch.float32, device=kn.device)
        sq = torch.empty(B, H_q, max(1, k_codec.qjl_dim), dtype=torch.float32, device=kn.device)
    T = 1 if decode or not append else k.shape[2]
    qq, qrr, sqq = (q, qr, sq) if q is not None else (kn, kn, kn)
    kk = k if append else kn
    vv = v if append else kn
    kt = (kk.stride(0), kk.stride(1), 0 if decode or not append else kk.stride(2))
    vt = (vv.stride(0), vv.stride(1), 0 if decode or not append else vv.stride(2))
    ck, bk, sk, pk = _consts(k_codec, kn)
    cv, bv, sv, pv = _consts(v_codec, kn)
    kf, vf = _fields(k_fields, kn), _fields(v_fields, kn)
    K = _kernels()
    G = H_q // H_kv
    K.prepare[(B, H_kv, 2 * T if append else 1)](
        qq, qrr, sqq, kk, vv, *kf, *vf, ck, bk, cv, bv, sk, sv, pk, pv, lengths, int(start or 0),
        qq.stride(0), qq.stride(1), qrr.stride(0), qrr.stride(1), sqq.stride(0), sqq.stride(1), *kt, *vt,
        *_strides(kf, _present(k_codec)), *_strides(vf, _present(v_codec)),
        G=G, BLOCK_G=max(16, triton_next_pow2(G)), D=D,
        KB=k_codec.mse_bits, KM=k_codec.qjl_dim, KNB=triton_next_pow2(max(2, (1 << k_codec.mse_bits) - 1)),
        VB=v_codec.mse_bits, VM=v_codec.qjl_dim, VNB=triton_next_pow2(max(2, (1 << v_codec.mse_bits) - 1)),
        ROT=bool(k_codec.rotate), QUERIES=q is not None, APPEND=append, DECODE=decode, MDT=_tl_dtype(kn.dtype),
        CH=min(32, D), LOG_D=D.bit_length() - 1, INV_SQRT_D=1.0 / math.sqrt(D),
        **_launch(num_warps=4, enable_fp_fusion=False),  # no FMA contraction: codes as the reference's
    )
    return qr, sq


def _attend(q: Tensor, qr: Tensor, sq: Tensor, k: dict[str, Tensor], v: dict[str, Tensor], lengths: Tensor,
            k_new: Tensor, v_new: Tensor, *, k_codec: Any, v_codec: Any, scaling: float, n_splits: int | None,
            block_n: int | None, advance: tuple[Tensor, Tensor, Tensor] | None, num_warps: int | None,
            num_stages: int | None) -> Tensor:
    """Split kernel over the stored slots, then the combine (un-rotation, new token, counters)."""
    _env_config()
    B, H_q, D = q.shape
    kn = k["norm"]
    H_kv, S = kn.shape[1], kn.shape[2]
    G = H_q // H_kv
    block_n = block_n or DECODE_CONFIG["block_n"]
    ns = n_splits or decode_splits(B, H_kv, S, q.device, block_n, DECODE_CONFIG["per_sm"])
    per = -(-S // ns)
    split = -(-per // block_n) * block_n
    ns = -(-S // split)
    vm = v_codec.qjl_dim
    mid_o = torch.empty(B, H_q, ns, D, dtype=torch.float32, device=q.device)
    mid_q = torch.empty(B, H_q, ns, max(1, vm), dtype=torch.float32, device=q.device)
    mid_l = torch.empty(B, H_q, ns, dtype=torch.float32, device=q.device)
    out = torch.empty(B, H_q, D, dtype=q.dtype, device=q.device)
    if k_new.stride(-1) != 1 or v_new.stride(-1) != 1:
        raise ValueError("k_new and v_new need unit stride along D")
    ck, _, _, _ = _consts(k_codec, kn)
    cv, _, sv, pv = _consts(v_codec, kn)
    kf, vf = _fields(k, kn), _fields(v, kn)
    dt = q.dtype if q.dtype in (torch.bfloat16, torch.float16) else torch.float32
    BLOCK_G = max(16, triton_next_pow2(G))
    K = _kernels()
    K.decode_split[(ns, B * H_kv)](
        qr, sq, *kf, *vf, ck, cv, lengths, mid_o, mid_q, mid_l,
        float(scaling) * LOG2E, math.sqrt(math.pi / 2) / max(1, k_codec.qjl_dim), H_kv, split,
        qr.stride(0), qr.stride(1), sq.stride(0), sq.stride(1),
        *_strides(kf, _present(k_codec)), *_strides(vf, _present(v_codec)),
        *mid_o.stride()[:3], *mid_q.stride()[:3], *mid_l.stride(),
        G=G, BLOCK_G=BLOCK_G, D=D, BLOCK_N=block_n,
        KB=k_codec.mse_bits, KM=k_codec.qjl_dim, VB=v_codec.mse_bits, VM=vm, DT=_tl_dtype(dt),
        IEEE=dt == torch.float32,
        **_launch(num_warps=num_warps or DECODE_CONFIG["num_warps"],
                  num_stages=num_stages or DECODE_CONFIG["num_stages"]),
    )
    lens, seen, valid = advance if advance is not None else (lengths, lengths, lengths)
    K.combine[(B * H_q,)](
        mid_o, mid_q, mid_l, q, k_new, v_new, out, sv, pv, lens, seen, valid, ns, float(scaling) * LOG2E,
        math.sqrt(math.pi / 2) / max(1, vm), H_kv,
        *mid_o.stride()[:3], *mid_q.stride()[:3], *mid_l.stride(), q.stride(0), q.stride(1),
        k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1), out.stride(0), out.stride(1),
        G=G, NS=max(2, triton_next_pow2(ns)), D=D, VM=vm, ROT=bool(v_codec.rotate), ADVANCE=advance is not None,
        CH=min(32, D), INV_SQRT_D=1.0 / math.sqrt(D),
        **_launch(num_warps=4),
    )
    return out


def turboquant_decode_attention(q: Tensor, k: dict[str, Tensor], v: dict[str, Tensor], lengths: Tensor,
                                k_new: Tensor, v_new: Tensor, *, k_codec: Any, v_codec: Any, scaling: float,
                                n_splits: int | None = None, block_n: int | None = None,
                                num_warps: int | None = None, num_stages: int | None = None) -> Tensor:
    """Fused :func:`turboquant_decode_attention_reference` (three launches: query rotation, split, combine);
    no host synchronisation. The keyword tunables default to ``DECODE_CONFIG``."""
    qr, sq = _prepare(q, None, None, k, v, lengths, k_codec=k_codec, v_codec=v_codec)
    return _attend(q, qr, sq, k, v, lengths, k_new, v_new, k_codec=k_codec, v_codec=v_codec, scaling=scaling,
                   n_splits=n_splits, block_n=block_n, advance=None, num_warps=num_warps, num_stages=num_stages)


def turboquant_decode_step(q: Tensor, k_new: Tensor, v_new: Tensor, k: dict[str, Tensor], v: dict[str, Tensor],
                           lengths: Tensor, seen: Tensor, valid: Tensor, *, k_codec: Any, v_codec: Any,
                           scaling: float) -> Tensor:
    """A store's whole decode step in three launches: encode the new token into slot lengths[b] (with the query
    rotation), attend over the stored slots [0, lengths[b]) and the new token exactly, then lengths and seen +=
    valid (in place; a finished row's token is written past its valid slots and not counted)."""
    qr, sq = _prepare(q, k_new, v_new, k, v, lengths, k_codec=k_codec, v_codec=v_codec)
    return _attend(q, qr, sq, k, v, lengths, k_new, v_new, k_codec=k_codec, v_codec=v_codec, scaling=scaling,
                   n_splits=None, block_n=None, advance=(lengths, seen, valid), num_warps=None, num_stages=None)


def turboquant_append(k: Tensor, v: Tensor, k_fields: dict[str, Tensor], v_fields: dict[str, Tensor],
                      lengths: Tensor, *, k_codec: Any, v_codec: Any, start: int | None = None) -> None:
    """Fused :func:`turboquant_append_reference`: k, v (B, H_kv, D) into slot lengths[b] (not advanced), or a
    chunk (B, H_kv, T, D) into slots start .. start+T-1 (``start`` given)."""
    if (start is None) != (k.dim() == 3):
        raise ValueError("pass k, v (B, H_kv, D) without start (decode) or (B, H_kv, T, D) with start (a chunk)")
    _prepare(None, k, v, k_fields, v_fields, lengths, k_codec=k_codec, v_codec=v_codec, start=start)


def turboquant_dequantize(k: dict[str, Tensor], v: dict[str, Tensor], n_slots: int, out_k: Tensor, out_v: Tensor,
                          *, k_codec: Any, v_codec: Any, block_n: int = 16) -> None:
    """Decode the stored slots [0, n_slots) into out_k, out_v (B, H_kv, >= n_slots, D), as
    ``decode_fields`` does (a prefill chunk's past): one launch, fp32 arithmetic, rounded to out's dtype."""
    kn = k["norm"]
    B, H_kv = kn.shape[0], kn.shape[1]
    D = k_codec.dim
    if n_slots <= 0:
        return
    for t in (out_k, out_v):
        if t.stride(-1) != 1:
            raise ValueError("the dense outputs need unit stride along D")
    ck, _, sk, pk = _consts(k_codec, kn)
    cv, _, sv, pv = _consts(v_codec, kn)
    kf, vf = _fields(k, kn), _fields(v, kn)
    K = _kernels()
    K.dequant[(-(-n_slots // block_n), B * H_kv, 2)](
        *kf, *vf, ck, cv, sk, sv, pk, pv, out_k, out_v, int(n_slots), H_kv,
        math.sqrt(math.pi / 2) / max(1, k_codec.qjl_dim), math.sqrt(math.pi / 2) / max(1, v_codec.qjl_dim),
        *_strides(kf, _present(k_codec)), *_strides(vf, _present(v_codec)),
        *out_k.stride()[:3], *out_v.stride()[:3],
        D=D, BLOCK_N=block_n, KB=k_codec.mse_bits, KM=k_codec.qjl_dim, VB=v_codec.mse_bits, VM=v_codec.qjl_dim,
        ROT=bool(k_codec.rotate), CH=min(32, D), MDT=_tl_dtype(out_k.dtype), INV_SQRT_D=1.0 / math.sqrt(D),
        **_launch(num_warps=4, enable_fp_fusion=False),  # no FMA contraction: the reference's roundings
    )


def turboquant_prefill(q: Tensor, k: Tensor, v: Tensor, k_fields: dict[str, Tensor], v_fields: dict[str, Tensor],
                       lengths: Tensor, *, start: int, k_codec: Any, v_codec: Any, scaling: float) -> Tensor:
    """A prefill chunk of rows that all hold ``start`` stored slots: q (B, H_q, T, D), k, v (B, H_kv, T, D) ->
    (B, T, H_q, D). The chunk is encoded into slots start .. start+T-1 (one launch); the chunk attends causally
    to itself exactly and to the stored past as the reference path decodes it: the past is decoded into a
    transient dense buffer (one launch; what the reference path materialises too, so the peak does not grow)
    and :func:`methods.kernels.attention.prefill_attention` attends over it. The counters are not advanced."""
    from .attention import prefill_attention

    B, H_kv, T, D = k.shape
    turboquant_append(k, v, k_fields, v_fields, lengths, k_codec=k_codec, v_codec=v_codec, start=start)
    dk = torch.empty(B, H_kv, start + T, D, dtype=k.dtype, device=k.device)  # (B, H_kv, start+T, D)
    dv = torch.empty_like(dk)
    turboquant_dequantize(k_fields, v_fields, start, dk, dv, k_codec=k_codec, v_codec=v_codec)
    dk[:, :, start:].copy_(k)
    dv[:, :, start:].copy_(v)
    return prefill_attention(q, dk, dv, start=start, scaling=scaling)


class TurboQuantCodecKernel:
    """The fused driver of a :class:`~methods.stores.CodecStore` of two TurboQuantizers (codecs declaring
    ``{"kernel": "turboquant", "codec": ...}``; the dispatch of :mod:`methods.kernels.quant_attention`):
    :meth:`decode` = :func:`turboquant_decode_step` (three launches), :meth:`prefill` =
    :func:`turboquant_prefill`. Its workspace (a step's rotated queries, split partials) is not KV."""

    name = "turboquant"

    def __init__(self, layer: Any, k_decl: dict, v_decl: dict, *, batch: int, device: Any, dtype: torch.dtype,
                 heads: Tensor | None = None, workspace: Any = None):
        if heads is not None and not torch.equal(heads.cpu(), torch.arange(layer.n_kv_heads, dtype=heads.dtype)):
            raise ValueError("the turboquant kernels serve every kv head of a layer (no head subsets)")
        self.k_codec, self.v_codec = k_decl["codec"], v_decl["codec"]

    @staticmethod
    def reason(layer: Any, k_decl: dict, v_decl: dict) -> str | None:
        if layer.n_q_heads % layer.n_kv_heads:
            return f"{layer.n_q_heads} query heads are not a multiple of {layer.n_kv_heads} kv heads"
        kc, vc = k_decl["codec"], v_decl["codec"]
        if kc.rotate != vc.rotate:
            return "K and V must both be rotated or both not"
        for name, c in (("K", kc), ("V", vc)):
            why = reason(c, layer.head_dim)
            if why:
                return f"{name}: {why}"
        return None

    def _fields(self, store: Any, name: str) -> dict[str, Tensor]:
        return {f: getattr(store, f"{name}_{f}") for f in ("norm", "codes", "qjl", "gamma")
                if hasattr(store, f"{name}_{f}")}

    def decode(self, store: Any, q: Tensor, k: Tensor, v: Tensor, valid: Tensor, *, scaling: float) -> Tensor:
        return turboquant_decode_step(q, k, v, self._fields(store, "k"), self._fields(store, "v"), store.lengths,
                                      store.seen, valid, k_codec=self.k_codec, v_codec=self.v_codec, scaling=scaling)

    def prefill(self, store: Any, q: Tensor, k: Tensor, v: Tensor, *, start: int, scaling: float) -> Tensor:
        return turboquant_prefill(q, k, v, self._fields(store, "k"), self._fields(store, "v"), store.lengths,
                                  start=start, k_codec=self.k_codec, v_codec=self.v_codec, scaling=scaling)
