"""``uniform_int``: per-token asymmetric INT-k for keys and values (what serving engines ship).

Each token's K and V vectors (per kv head) are split into groups of ``group_size`` channels; each
group gets its own min/max scale and zero point. Codes are physically bit-packed into uint8; scales
and zero points are kept in the model dtype. Groups never cross tokens, so padding never enters a
quantization group.

Ratio mapping (DESIGN §6): nominal code bits = 16 * (1 - ratio), which must be 8, 4 or 2 (ratio
0.5, 0.75, 0.875), or 16 (ratio 0: stored unquantized, i.e. ``full``); any other ratio gives a
skipped row, never a silent rounding. The achieved ratio
includes the scale/zero-point overhead: 2 * 16 / group_size extra bits per element in bf16.

Attention: the reference path dequantizes the stored tokens, the new chunk attends to itself
exactly, then it is quantized and stored. With ``fused`` (auto: on CUDA) the store reads the packed
codes in Triton kernels instead (methods/kernels/quant_attention.py), same semantics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from methods.api import LayerSpec, ModelSpec
from methods.quant_base import QuantMethod, codec_roundtrip
from methods.quantizers import UniformQuantizer
from methods.stores import CodecStore

SUPPORTED_BITS = (8, 4, 2)


@dataclass
class UniformInt(QuantMethod):
    """Per-token asymmetric INT-k (k in 8, 4, 2; 16 = unquantized) with ``group_size`` channels per scale."""

    ratio: float = 0.75
    group_size: int = 32

    name = "uniform_int"
    kernel = "fused"  # fused decode kernels (fused=auto: on CUDA); rows record the path that ran
    widths = SUPPORTED_BITS

    def __post_init__(self) -> None:
        super().__post_init__()
        if int(self.group_size) < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")

    def extra_reasons(self, model: ModelSpec, k_bits: int, v_bits: int) -> list[str]:
        reasons: list[str] = []
        for b in sorted({k_bits, v_bits}):
            reasons += UniformQuantizer(b, self.group_size).check_dim(model.head_dim)
        return list(dict.fromkeys(reasons))

    def store(self, layer: LayerSpec, *, k_bits: int, v_bits: int, batch: int, capacity: int, device: Any,
              dtype: Any) -> CodecStore:
        kq, vq = UniformQuantizer(k_bits, self.group_size), UniformQuantizer(v_bits, self.group_size)
        fused = self.use_fused(layer, kq, vq, device)
        if k_bits == v_bits:
            return QuantizedStore(layer, kq, batch=batch, capacity=capacity, device=device, dtype=dtype, fused=fused)
        return CodecStore(layer, kq, vq, batch=batch, capacity=capacity, device=device, dtype=dtype, fused=fused)

    def roundtrip(self, x: Tensor, *, bits: int, kind: str, layer_idx: int) -> Tensor:
        return codec_roundtrip(UniformQuantizer(bits, self.group_size), x)

    def codecs(self, layer: LayerSpec, *, k_bits: int, v_bits: int, device: Any) -> tuple[Any, Any]:
        return UniformQuantizer(k_bits, self.group_size), UniformQuantizer(v_bits, self.group_size)


class QuantizedStore(CodecStore):
    """Packed per-token codes + per-group scale and zero point for K and V, in slot order
    (fields ``k_codes``, ``k_scale``, ``k_zero``, ``v_codes``, ``v_scale``, ``v_zero``)."""

    def __init__(self, layer: LayerSpec, quant: UniformQuantizer, *, batch: int, capacity: int, device: Any, dtype,
                 fused: bool = False):
        reasons = quant.check_dim(layer.head_dim)
        if reasons:
            raise ValueError("; ".join(reasons))
        self.quant = quant
        super().__init__(layer, quant, quant, batch=batch, capacity=capacity, device=device, dtype=dtype, fused=fused)
