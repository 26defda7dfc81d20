"""``fp8``: FP8 e4m3 K/V, the 8-bit cache serving engines ship (vLLM ``kv_cache_dtype=fp8_e4m3``,
TensorRT-LLM FP8 KV cache).

Each element is stored as one e4m3 byte (physically: a uint8 view of ``float8_e4m3fn``); the value
is element / scale, saturating at +-448. Choices serving engines differ on, exposed as knobs:
- ``scale="token"``: one scale per token and kv head, absmax / 448, stored in the model dtype
  (16 bits per head vector of overhead), computed as each token is written.
- ``scale="head"``: one scale per sequence and kv head, fixed from the first chunk written
  (the prefill's first chunk): absmax over its valid tokens * ``head_margin`` / 448. Later tokens
  that exceed it saturate. Engines calibrate this static scale offline or from the first batch
  (vLLM's dynamic k_scale uses a headroom constant); ``head_margin`` (default 2.0, [I]) is ours.
Ratio: FP8 is 8 bits, so it honours ratio 0.5 only; any other ratio gives a skipped row.
Kernels (``fused``: auto = on CUDA, on, off): with ``scale="token"`` the store reads the e4m3 bytes in
Triton kernels (methods/kernels/quant_attention.py: bytes widened to fp16 in registers, the scale applied
per key to the score and per value to the softmax weight); ``scale="head"`` has the reference path only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from methods.api import LayerSpec, MethodBase
from methods.kernels import FUSED_CHOICES, use_fused
from methods.quantizers import FP8_MAX, Fp8TokenQuantizer, fp8_decode, fp8_encode
from methods.stores import CodecStore, SlotStore, scatter_slots

SCALES = ("token", "head")


@dataclass
class Fp8(MethodBase):
    """FP8 e4m3 K and V with a per-token or per-head scale; ratio 0.5 only."""

    ratio: float = 0.5
    scale: str = "token"
    head_margin: float = 2.0
    fused: str = "auto"

    family = "quantization"
    memory = "physical"
    kernel = "fused"  # scale=token has fused kernels; rows record the path that ran
    name = "fp8"

    def __post_init__(self) -> None:
        if self.fused not in FUSED_CHOICES:
            raise ValueError(f"fused must be one of {FUSED_CHOICES}, got {self.fused!r}")
        if self.fused == "on" and self.scale != "token":
            raise ValueError("fp8 has fused kernels for scale=token only; use fused=auto or off with scale=head")
        if self.scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, got {self.scale!r}")
        if float(self.head_margin) < 1.0:
            raise ValueError(f"head_margin must be >= 1, got {self.head_margin}")

    def ratio_reasons(self) -> list[str]:
        reasons = super().ratio_reasons()
        if not reasons and abs(float(self.ratio) - 0.5) > 1e-9:
            reasons.append(f"fp8 stores 8 bits per element and honours ratio 0.5 only, got ratio {self.ratio} "
                           f"({16 * (1 - float(self.ratio)):g} bits)")
        return reasons

    def new_layer(self, layer: LayerSpec, *, batch: int, capacity: int, device: Any, dtype: Any) -> SlotStore:
        if self.scale == "token":
            q = Fp8TokenQuantizer()
            fused = use_fused(self.fused, device, CodecStore.fused_reason(layer, q, q))
            return CodecStore(layer, q, q, batch=batch, capacity=capacity, device=device, dtype=dtype, fused=fused)
        return Fp8HeadStore(layer, margin=float(self.head_margin), batch=batch, capacity=capacity, device=device,
                            dtype=dtype)


class Fp8HeadStore(SlotStore):
    """e4m3 codes per token; one scale per (sequence, kv head) for K and one for V, set by the first
    chunk written."""

    token_fields = ("k_codes", "v_codes")

    def __init__(self, layer: LayerSpec, *, margin: float, batch: int, capacity: int, device: Any, dtype):
        super().__init__(layer, batch=batch, capacity=capacity, device=device, dtype=dtype)
        self.margin = margin
        shape = (batch, layer.n_kv_heads, self.capacity, layer.head_dim)
        self.k_codes = torch.zeros(shape, dtype=torch.uint8, device=self.device)  # (B, H_kv, S, D) e4m3 bytes
        self.v_codes = torch.zeros(shape, dtype=torch.uint8, device=self.device)
        self.k_scale = torch.ones(batch, layer.n_kv_heads, 1, 1, dtype=dtype, device=self.device)  # (B, H_kv, 1, 1)
        self.v_scale = torch.ones(batch, layer.n_kv_heads, 1, 1, dtype=dtype, device=self.device)

    def _write_valid(self, dest: Tensor, k: Tensor, v: Tensor, valid: Tensor) -> None:
        for name, x in (("k", k), ("v", v)):
            if self.hi == 0:  # the first chunk fixes the scale (over its valid tokens)
                mask = valid[:, None, :, None]  # (B, 1, T, 1)
                amax = (x.float().abs() * mask).amax(dim=(2, 3), keepdim=True)  # (B, H_kv, 1, 1)
                scale = (amax * self.margin / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
                setattr(self, f"{name}_scale", scale.to(self.dtype))
            scatter_slots(getattr(self, f"{name}_codes"), dest, fp8_encode(x, getattr(self, f"{name}_scale")))

    def _read(self, n_slots: int) -> tuple[Tensor, Tensor]:
        return (fp8_decode(self.k_codes[:, :, :n_slots], self.k_scale, dtype=self.dtype),
                fp8_decode(self.v_codes[:, :, :n_slots], self.v_scale, dtype=self.dtype))
