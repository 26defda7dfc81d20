"""Full-precision K/V in slots (:class:`DenseStore`) and its fused fast path (:class:`FusedDenseStore`): one
layout, two kernels."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from methods.api import LayerSpec
from methods.stores.slot import CounterGraphState, SlotStore

__all__ = ["DenseStore", "FusedDenseStore"]


class DenseStore(SlotStore):
    """Full-precision K and V in preallocated (B, H_kv, capacity, D) buffers."""

    token_fields = ("k", "v")
    overlay_new = False  # the buffer already holds the new tokens exactly

    def __init__(self, layer: LayerSpec, *, batch: int, capacity: int, device: Any, dtype: torch.dtype):
        super().__init__(layer, batch=batch, capacity=capacity, device=device, dtype=dtype)
        shape = (batch, layer.n_kv_heads, self.capacity, layer.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=self.device)  # (B, H_kv, S, D)
        self.v = torch.zeros(shape, dtype=dtype, device=self.device)  # (B, H_kv, S, D)

    def _write(self, dest: Tensor, k: Tensor, v: Tensor) -> None:
        B, H_kv, T, D = k.shape
        idx = dest[:, None, :, None].expand(B, H_kv, T, D)  # (B, H_kv, T, D)
        self.k.scatter_(2, idx, k.to(self.dtype))
        self.v.scatter_(2, idx, v.to(self.dtype))

    def _read(self, n_slots: int) -> tuple[Tensor, Tensor]:
        return self.k[:, :, :n_slots], self.v[:, :, :n_slots]


class FusedDenseStore(CounterGraphState, DenseStore):
    """:class:`DenseStore` with the fused fast path (docs/ARCHITECTURE.md §7): the layout and the numbers are the same,
    the kernels differ (``kernel = "fused"``).

    - Decode (T == 1): the new K/V go to slot ``lengths[b]`` and ``lengths`` and ``seen`` advance, in one
      kernel (:func:`methods.kernels.append.append_decode`); then
      :func:`methods.kernels.attention.decode_attention` (flash-decoding, each kv head read once for its
      query group) attends over the first ``lengths[b]`` slots. No host
      synchronisation, no allocation that depends on lengths, no attribute rebinding: the engine captures
      the step in a CUDA graph (``graph_safe``). A finished row (``valid`` False) writes its token past
      its valid slots without counting it and attends to its stored tokens only; its output is discarded.
    - Prefill chunks (T > 1) while every row has had only valid tokens (one prompt, or prompts of equal
      length, as in the throughput probe): K/V are copied into slots ``hi .. hi+T-1`` and
      :func:`~methods.kernels.attention.prefill_attention` attends causally over ``0 .. hi+T-1`` without a
      mask. Otherwise (right-padded ragged batches) the reference path of :class:`SlotStore` runs.
    """

    kernel = "fused"
    graph_safe = True

    def __init__(self, layer: LayerSpec, *, batch: int, capacity: int, device: Any, dtype: torch.dtype):
        super().__init__(layer, batch=batch, capacity=capacity, device=device, dtype=dtype)
        self.uniform = True  # host: every row holds exactly `hi` valid slots (no padding, no decode yet)

    def extend(self, q: Tensor, k: Tensor, v: Tensor, *, positions: Tensor, valid: Tensor, scaling: float) -> Tensor:
        from methods.kernels.append import append_decode
        from methods.kernels.attention import decode_attention, prefill_attention

        T = k.shape[2]
        self._check_capacity(T)
        if T == 1:
            # slot lengths[b] (after the row's valid tokens), then lengths and seen advance: one kernel
            append_decode(k[:, :, 0], v[:, :, 0], self.k, self.v, self.lengths, self.seen, valid[:, 0])
            self.uniform = False
            self.hi += 1  # host bound; a CUDA-graph replay skips this line and the engine calls graph_advance
            out = decode_attention(q[:, :, 0], self.k, self.v, self.lengths, scaling=scaling)  # (B, H_q, D)
            return out[:, None]
        if self.uniform and bool(valid.all()):  # one host sync per prefill chunk
            s = self.hi
            self.k[:, :, s : s + T].copy_(k)
            self.v[:, :, s : s + T].copy_(v)
            out = prefill_attention(q, self.k, self.v, start=s, scaling=scaling)  # (B, T, H_q, D)
            self.lengths.add_(T)
            self.seen.add_(T)
            self.hi += T
            return out
        self.uniform = False
        return super().extend(q, k, v, positions=positions, valid=valid, scaling=scaling)

    @staticmethod
    def supports(layer: LayerSpec) -> str | None:
        """Why the fused kernels cannot serve this layer, or None."""
        from methods.kernels.attention import HEAD_DIMS

        if layer.head_dim not in HEAD_DIMS:
            return f"head_dim {layer.head_dim} is not one of {HEAD_DIMS}"
        if layer.n_q_heads % layer.n_kv_heads:
            return f"{layer.n_q_heads} query heads are not a multiple of {layer.n_kv_heads} kv heads"
        return None
