"""Per-token quantized K/V: a codec per K and V encodes each token's vectors into named slot fields."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from methods.api import LayerSpec
from methods.stores.common import scatter_slots
from methods.stores.slot import CounterGraphState, SlotStore

__all__ = ["CodecStore"]


class CodecStore(CounterGraphState, SlotStore):
    """Per-token quantized K and V: each kv head's vector of each token is encoded by a codec
    (``k_codec``, ``v_codec``) into named fields (packed codes, scales, zero points, norms, ...),
    kept in slot buffers ``k_<field>``, ``v_<field>`` of shape (B, H_kv, S, n).

    A codec has ``fields(dim) -> {name: (n, dtype or None = the compute dtype)}``,
    ``encode_fields(x (..., D), meta_dtype) -> {name: (..., n)}`` and
    ``decode_fields(parts, dtype) -> (..., D)``. Constants a codec holds (rotation signs, a
    codebook, a sketch matrix) are reachable from the store, so ``stats`` counts them once.

    Two paths (the row's ``kernel`` column says which the store took):
    - reference (default): :class:`SlotStore`'s, dequantizing the stored slots into a dense tensor.
    - fused (``fused=True``; the codecs declare ``kernel_layout(dim)``, see
      :mod:`methods.kernels.quant_attention` for the dispatch and the kernel contract): a decode step
      (T == 1) runs the codec family's append kernel (the new token quantized in registers into slot
      ``lengths[b]``), split kernel (the stored slots read packed, dequantized in registers) and combine
      kernel (the splits and the new token, exact, merged by log-sum-exp; ``lengths`` / ``seen`` advance
      there): the reference semantics, static shapes, no host sync, no attribute rebinding, so the engine
      captures it in a CUDA graph (``graph_safe``, the snapshot / restore / advance protocol of
      :class:`FusedDenseStore`). Prefill chunks while every row holds only valid tokens quantize the chunk
      into its slots and attend over the stored past plus the chunk exactly in one kernel, so the peak
      stays at the packed cache; ragged (padded) batches take the reference path. The driver's workspace
      (``fused_kernel``: a step's rotated q/k/v, matrices rebuilt from the counted rotation signs) is not KV
      and is not counted.
    """

    def __init__(self, layer: LayerSpec, k_codec: Any, v_codec: Any, *, batch: int, capacity: int, device: Any,
                 dtype: torch.dtype, fused: bool = False):
        super().__init__(layer, batch=batch, capacity=capacity, device=device, dtype=dtype)
        self.k_codec, self.v_codec = k_codec, v_codec
        lead = (batch, layer.n_kv_heads, self.capacity)
        fields = []
        for name, codec in (("k", k_codec), ("v", v_codec)):
            for f, (n, dt) in codec.fields(layer.head_dim).items():
                setattr(self, f"{name}_{f}", torch.zeros(*lead, n, dtype=dt or dtype, device=self.device))
                fields.append(f"{name}_{f}")
        self.token_fields = tuple(fields)
        self.fused_kernel = None
        if fused:
            from methods.kernels.quant_attention import codec_kernel

            self.fused_kernel = codec_kernel(layer, k_codec, v_codec, batch=batch, device=self.device, dtype=dtype)
            self.kernel = "fused"
            self.graph_safe = True
            self.bookkeeping = (*SlotStore.bookkeeping, "fused_kernel")
        self.uniform = True  # host: every row holds exactly `hi` valid slots (no padding, no decode yet)

    @staticmethod
    def fused_reason(layer: LayerSpec, k_codec: Any, v_codec: Any) -> str | None:
        """Why no fused kernel serves these codecs on this layer (None: one does)."""
        from methods.kernels.quant_attention import codec_kernel_reason

        return codec_kernel_reason(layer, k_codec, v_codec)

    def _names(self, name: str) -> list[str]:
        return [f[len(name) + 1:] for f in self.token_fields if f.startswith(name + "_")]

    def _write(self, dest: Tensor, k: Tensor, v: Tensor) -> None:
        for name, x, codec in (("k", k, self.k_codec), ("v", v, self.v_codec)):
            for f, val in codec.encode_fields(x, meta_dtype=self.dtype).items():  # (B, H_kv, T, n)
                scatter_slots(getattr(self, f"{name}_{f}"), dest, val)

    def _read(self, n_slots: int) -> tuple[Tensor, Tensor]:
        out = []
        for name, codec in (("k", self.k_codec), ("v", self.v_codec)):
            parts = {f: getattr(self, f"{name}_{f}")[:, :, :n_slots] for f in self._names(name)}  # (B, H_kv, S, n)
            out.append(codec.decode_fields(parts, dtype=self.dtype))  # (B, H_kv, S, D)
        return out[0], out[1]

    def extend(self, q: Tensor, k: Tensor, v: Tensor, *, positions: Tensor, valid: Tensor, scaling: float) -> Tensor:
        if self.fused_kernel is None:
            return super().extend(q, k, v, positions=positions, valid=valid, scaling=scaling)
        T = k.shape[2]
        self._check_capacity(T)
        if T == 1:
            out = self.fused_kernel.decode(self, q[:, :, 0], k[:, :, 0], v[:, :, 0], valid[:, 0],
                                           scaling=scaling)  # (B, H_q, D); lengths and seen advanced
            self.uniform = False
            self.hi += 1  # host bound; a CUDA-graph replay skips this line and the engine calls graph_advance
            return out[:, None]
        if self.uniform and bool(valid.all()):  # one host sync per prefill chunk
            out = self.fused_kernel.prefill(self, q, k, v, start=self.hi, scaling=scaling)  # (B, T, H_q, D)
            self.lengths.add_(T)
            self.seen.add_(T)
            self.hi += T
            return out
        self.uniform = False
        return super().extend(q, k, v, positions=positions, valid=valid, scaling=scaling)

