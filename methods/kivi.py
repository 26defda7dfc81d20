"""``kivi``: KIVI (Liu, Yuan et al., ICML 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization
for KV Cache"; docs/PAPERS.md §6).

Asymmetric min/max INT-k: keys per channel (each channel's group of ``group_size`` consecutive
tokens shares a scale and zero point), values per token (groups of ``group_size`` channels). The
most recent tokens stay in full precision (model dtype):
- keys: tokens after the last multiple of ``residual_length``; when the full-precision key
  window reaches ``residual_length`` tokens the whole block is quantized (per channel, in groups
  of ``group_size`` tokens) and the window empties (KIVI's reference implementation);
- values: always the last ``residual_length`` tokens; a value leaving the window is quantized.
Codes are bit-packed into uint8 (keys packed along the tokens of a group); scales and zero points
are kept in the model dtype; both windows are ring buffers of ``residual_length`` slots.

Choices the paper leaves open, and ours:
- Ratio: bits = 16 * (1 - ratio), any whole number in 1..8 (KIVI reports 2 and 4; 16 =
  unquantized). The residual windows and metadata are overhead outside the nominal bits;
  ``ratio_achieved`` includes them.
- Chunked prefill: every full block of the prompt is quantized as it arrives, exactly as if the
  tokens came one by one (the store's result does not depend on the chunking); the tokens of one
  chunk attend to each other exactly.
- Zero point kept in floating point (the group minimum), as in KIVI's reference kernels.

Kernels (``fused``: auto = on CUDA, on, off; :mod:`methods.kernels.kivi_attention`): a decode step reads the
packed keys and values and both rings in one flash-decoding kernel (the per-channel key scale goes into the
query once per group, codes become dot operands without per-element dequantization; the ring tail and the new
token merged by log-sum-exp), and writes the step's token on the device (the value leaving the window
quantized, the key block quantized when the window fills, under a device-side branch): the reference store's
numbers, static shapes, no host sync, so the engine captures the step in a CUDA graph. Prefill chunks take the
reference path (they quantize as they go).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from methods.api import LayerSpec, ModelSpec
from methods.kivi_layout import key_decode, key_encode, read_dense  # noqa: F401 - methods.kivi.read_dense stays
from methods.quant_base import QuantMethod
from methods.quantizers import UniformQuantizer
from methods.stores import SlotStore, scatter_slots


@dataclass
class Kivi(QuantMethod):
    """Keys per-channel, values per-token INT-k in groups of 32, full-precision window of 128."""

    ratio: float = 0.75
    group_size: int = 32
    residual_length: int = 128

    name = "kivi"
    kernel = "fused"  # fused decode kernels (fused=auto: on CUDA); rows record the path that ran

    def __post_init__(self) -> None:
        super().__post_init__()
        G, R = int(self.group_size), int(self.residual_length)
        if G < 1 or R < G or R % G:
            raise ValueError(f"residual_length ({R}) must be a positive multiple of group_size ({G})")

    def extra_reasons(self, model: ModelSpec, k_bits: int, v_bits: int) -> list[str]:
        reasons = []
        if model.head_dim % self.group_size:
            reasons.append(f"head_dim {model.head_dim} is not a multiple of group_size {self.group_size} "
                           "(values are quantized per token in groups of channels)")
        for b in sorted({k_bits, v_bits}):
            reasons += [r for r in UniformQuantizer(b, self.group_size).check_dim(model.head_dim) if "group" not in r]
        return reasons

    def store(self, layer: LayerSpec, *, k_bits: int, v_bits: int, batch: int, capacity: int, device: Any,
              dtype: Any) -> KiviStore:
        from methods.kernels import use_fused

        G, R = int(self.group_size), int(self.residual_length)
        fused = use_fused(self.fused, device, KiviStore.fused_reason(layer, k_bits=k_bits, v_bits=v_bits, group_size=G,
                                                                     residual_length=R))
        return KiviStore(layer, k_bits=k_bits, v_bits=v_bits, group_size=G, residual_length=R, batch=batch,
                         capacity=capacity, device=device, dtype=dtype, fused=fused)

    def roundtrip(self, x: Tensor, *, bits: int, kind: str, layer_idx: int) -> Tensor:
        """Quantize all of x (B, H, T, D) (no residual window; T a multiple of group_size for keys)."""
        q = UniformQuantizer(bits, int(self.group_size))
        if kind == "v":
            return q.decode(*q.encode(x, meta_dtype=x.dtype), dtype=x.dtype)
        return key_decode(q, *key_encode(q, x, meta_dtype=x.dtype), dtype=x.dtype)


class KiviStore(SlotStore):
    """Slots in token order. Keys: ``k_codes`` / ``k_scale`` / ``k_zero`` per group of G tokens
    (axis 2 counts groups) for the quantized prefix, ``k_res`` ring of R full-precision slots.
    Values: ``v_codes`` / ``v_scale`` / ``v_zero`` per token, ``v_res`` ring of R slots.
    Token at slot s lives in ring slot s % R while it is in a window.

    ``fused=True``: decode steps (T == 1) run :func:`methods.kernels.kivi_attention.kivi_decode_step` (three
    launches: attention, the step's writes, the combine that advances ``lengths`` / ``seen``), graph-safe
    (the snapshot / restore / advance protocol of :class:`~methods.stores.FusedDenseStore`); prefill chunks
    and everything else take the reference path, which reads and writes the same fields."""

    token_fields = ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero", "k_res", "v_res")

    def __init__(self, layer: LayerSpec, *, k_bits: int, v_bits: int, group_size: int, residual_length: int,
                 batch: int, capacity: int, device: Any, dtype, fused: bool = False):
        super().__init__(layer, batch=batch, capacity=capacity, device=device, dtype=dtype)
        self.k_bits, self.v_bits = k_bits, v_bits
        self.fused = bool(fused)
        if self.fused:
            self.kernel = "fused"
            self.graph_safe = True
        self.kq, self.vq = UniformQuantizer(k_bits, group_size), UniformQuantizer(v_bits, group_size)
        self.G, self.R = group_size, residual_length
        H, D, G, R = layer.n_kv_heads, layer.head_dim, group_size, residual_length
        # one spare block past the capacity: incomplete key blocks and windowed values are written
        # (then overwritten) without a host-side branch; the last slot takes writes with no slot
        n = (math.ceil(self.capacity / R) + 1) * R
        self.trash = n - 1
        z = dict(device=self.device)
        self.k_codes = torch.zeros(batch, H, n // G, D * G * k_bits // 8, dtype=torch.uint8, **z)  # (B, H, S/G, *)
        self.k_scale = torch.zeros(batch, H, n // G, D, dtype=dtype, **z)  # (B, H, S/G, D)
        self.k_zero = torch.zeros(batch, H, n // G, D, dtype=dtype, **z)
        self.v_codes = torch.zeros(batch, H, n, D * v_bits // 8, dtype=torch.uint8, **z)  # (B, H, S, D*bits/8)
        self.v_scale = torch.zeros(batch, H, n, D // G, dtype=dtype, **z)  # (B, H, S, D/G)
        self.v_zero = torch.zeros(batch, H, n, D // G, dtype=dtype, **z)
        self.k_res = torch.zeros(batch, H, R, D, dtype=dtype, **z)  # (B, H, R, D) ring
        self.v_res = torch.zeros(batch, H, R, D, dtype=dtype, **z)

    # -- bookkeeping ------------------------------------------------------------------------------
    def _nq_k(self, lengths: Tensor) -> Tensor:
        """(B,) keys held as codes: the tokens before the last multiple of R."""
        return torch.div(lengths, self.R, rounding_mode="floor") * self.R

    def _nq_v(self, lengths: Tensor) -> Tensor:
        """(B,) values held as codes: all but the last R tokens."""
        return (lengths - self.R).clamp_min(0)

    def slots_stored(self, field: str, kept: Tensor) -> Tensor | None:
        L = kept  # (B, H_kv) tokens per head
        nq_k, nq_v = self._nq_k(L), self._nq_v(L)
        return {"k_codes": nq_k // self.G, "k_scale": nq_k // self.G, "k_zero": nq_k // self.G,
                "v_codes": nq_v, "v_scale": nq_v, "v_zero": nq_v,
                "k_res": L - nq_k, "v_res": L - nq_v}.get(field)

    # -- write ------------------------------------------------------------------------------------
    def _window_ext(self, ring: Tensor, x: Tensor, dest: Tensor) -> Tensor:
        """(B, H, R + T, D): position j holds slot L - R + j (L = lengths before this call): the last
        R slots from the ring (stale where not in a window), then the new tokens in slot order."""
        B, H, T, D = x.shape
        R, L = self.R, self.lengths
        j = torch.arange(R, device=x.device)
        old = ring.gather(2, ((L[:, None] - R + j) % R)[:, None, :, None].expand(B, H, R, D))  # (B, H, R, D)
        rel = (dest - L[:, None])[:, None, :, None].expand(B, H, T, D)  # (B, H, T, D)
        new = torch.zeros_like(x, dtype=ring.dtype).scatter_(2, rel, x.to(ring.dtype))
        return torch.cat([old, new], 2)

    def _refill_ring(self, ring: Tensor, ext: Tensor, n_valid: Tensor) -> None:
        """Ring <- the last R slots after this call (ext positions n_valid .. n_valid + R)."""
        B, H, _, D = ext.shape
        R = self.R
        i = torch.arange(R, device=ext.device)
        vals = ext.gather(2, (n_valid[:, None] + i)[:, None, :, None].expand(B, H, R, D))  # (B, H, R, D)
        ring_idx = ((self.lengths + n_valid)[:, None] - R + i) % R  # (B, R)
        ring.scatter_(2, ring_idx[:, None, :, None].expand(B, H, R, D), vals)

    def _write_valid(self, dest: Tensor, k: Tensor, v: Tensor, valid: Tensor) -> None:
        B, H, T, D = k.shape
        R, G, L = self.R, self.G, self.lengths
        n_valid = valid.sum(1)  # (B,)
        # values: slots L - R + j (j < T) leave the window now (for j < n_valid; others are rewritten later)
        ext_v = self._window_ext(self.v_res, v, dest)  # (B, H, R + T, D)
        s = L[:, None] - R + torch.arange(T, device=k.device)  # (B, T)
        s = torch.where(s >= 0, s, torch.full_like(s, self.trash))
        codes, scale, zero = self.vq.encode(ext_v[:, :, :T], meta_dtype=self.dtype)  # (B, H, T, *)
        for buf, val in ((self.v_codes, codes), (self.v_scale, scale), (self.v_zero, zero)):
            scatter_slots(buf, s, val)
        self._refill_ring(self.v_res, ext_v, n_valid)
        # keys: quantize every block of R that starts at the old boundary (complete ones are kept)
        ext_k = self._window_ext(self.k_res, k, dest)  # (B, H, R + T, D)
        nb = (R - 1 + T) // R
        j0 = R - (L - self._nq_k(L))  # (B,) ext position of the first unquantized key
        pos = (j0[:, None] + torch.arange(nb * R, device=k.device)).clamp_max(R + T - 1)  # (B, nb*R)
        blk = ext_k.gather(2, pos[:, None, :, None].expand(B, H, nb * R, D))  # (B, H, nb*R, D)
        codes, scale, zero = key_encode(self.kq, blk, meta_dtype=self.dtype)  # (B, H, nb*R/G, *)
        g = self._nq_k(L)[:, None] // G + torch.arange(nb * R // G, device=k.device)  # (B, nb*R/G)
        for buf, val in ((self.k_codes, codes), (self.k_scale, scale), (self.k_zero, zero)):
            scatter_slots(buf, g, val)
        self._refill_ring(self.k_res, ext_k, n_valid)

    # -- fused decode -----------------------------------------------------------------------------
    @staticmethod
    def fused_reason(layer: LayerSpec, *, k_bits: int, v_bits: int, group_size: int, residual_length: int) -> str | None:
        """Why the fused kernels cannot serve this layer (None: they can)."""
        from methods.kernels.kivi_attention import reason

        return reason(head_dim=layer.head_dim, n_q_heads=layer.n_q_heads, n_kv_heads=layer.n_kv_heads, k_bits=k_bits,
                      v_bits=v_bits, group_size=group_size, residual_length=residual_length)

    def extend(self, q: Tensor, k: Tensor, v: Tensor, *, positions: Tensor, valid: Tensor, scaling: float) -> Tensor:
        if not self.fused or k.shape[2] != 1:
            return super().extend(q, k, v, positions=positions, valid=valid, scaling=scaling)
        from methods.kernels.kivi_attention import FIELDS, kivi_decode_step

        self._check_capacity(1)
        out = kivi_decode_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], {n: getattr(self, n) for n in FIELDS},
                               self.lengths, self.seen, valid[:, 0], k_bits=self.k_bits, v_bits=self.v_bits,
                               group_size=self.G, residual_length=self.R, scaling=scaling)  # (B, H_q, D)
        self.hi += 1  # host bound; a CUDA-graph replay skips this line and the engine calls graph_advance
        return out[:, None]

    def graph_snapshot(self) -> tuple:
        """What a decode step advances: device counters (cloned) and the host bound."""
        return self.lengths.clone(), self.seen.clone(), self.hi

    def graph_restore(self, snap: tuple) -> None:
        lengths, seen, self.hi = snap
        self.lengths.copy_(lengths)  # in place: the captured graph holds these tensors
        self.seen.copy_(seen)

    def graph_advance(self, steps: int) -> None:
        self.hi += steps

    # -- read -------------------------------------------------------------------------------------
    def _read(self, n_slots: int) -> tuple[Tensor, Tensor]:
        return read_dense(self.k_codes, self.k_scale, self.k_zero, self.k_res, self.v_codes, self.v_scale,
                          self.v_zero, self.v_res, self.lengths, n_slots, kq=self.kq, vq=self.vq, residual=self.R,
                          dtype=self.dtype)
