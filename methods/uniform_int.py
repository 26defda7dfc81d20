"""``uniform_int``: per-token asymmetric INT-k for keys and values (what serving engines ship).

Each token's K and V vectors (per kv head) are split into groups of ``group_size`` channels; each
group gets its own min/max scale and zero point. Codes are physically bit-packed into uint8; scales
and zero points are kept in the model dtype. Groups never cross tokens, so padding never enters a
quantization group.

Ratio mapping (DESIGN §6): nominal code bits = 16 * (1 - ratio), which must be 8, 4 or 2 (ratio
0.5, 0.75, 0.875); any other ratio gives a skipped row, never a silent rounding. The achieved ratio
includes the scale/zero-point overhead: 2 * 16 / group_size extra bits per element in bf16.

Attention is the reference path (``kernel=reference``): stored tokens are dequantized, the new
chunk attends to itself exactly, then it is quantized and stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from methods.api import LayerSpec, MethodBase, ModelSpec
from methods.quantizers import UniformQuantizer
from methods.stores import CodecStore

SUPPORTED_BITS = (8, 4, 2)


def ratio_to_bits(ratio: float) -> float:
    """Nominal code bits for a target byte reduction against a 16-bit cache."""
    return 16.0 * (1.0 - float(ratio))


@dataclass
class UniformInt(MethodBase):
    """Per-token asymmetric INT-k (k in 8, 4, 2) with ``group_size`` channels per scale."""

    ratio: float = 0.75
    group_size: int = 32

    family = "quantization"
    memory = "physical"
    kernel = "reference"
    name = "uniform_int"

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.ratio) < 1.0:
            raise ValueError(f"ratio must be in [0, 1), got {self.ratio}")
        if int(self.group_size) < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")

    @property
    def bits(self) -> int | None:
        b = ratio_to_bits(self.ratio)
        return int(round(b)) if abs(b - round(b)) < 1e-9 and int(round(b)) in SUPPORTED_BITS else None

    def validate(self, model: ModelSpec) -> list[str]:
        reasons = super().validate(model)
        if self.bits is None:
            reasons.append(
                f"uniform_int cannot honour ratio {self.ratio}: it needs {ratio_to_bits(self.ratio):g} bits per "
                f"element and supports {SUPPORTED_BITS} (ratios 0.5, 0.75, 0.875)"
            )
            return reasons
        reasons += UniformQuantizer(self.bits, self.group_size).check_dim(model.head_dim)
        return reasons

    def new_layer(self, layer: LayerSpec, *, batch: int, capacity: int, device: Any, dtype: Any) -> QuantizedStore:
        if self.bits is None:
            raise ValueError(f"uniform_int cannot honour ratio {self.ratio}; call validate() first")
        quant = UniformQuantizer(self.bits, self.group_size)
        return QuantizedStore(layer, quant, batch=batch, capacity=capacity, device=device, dtype=dtype)


class QuantizedStore(CodecStore):
    """Packed per-token codes + per-group scale and zero point for K and V, in slot order
    (fields ``k_codes``, ``k_scale``, ``k_zero``, ``v_codes``, ``v_scale``, ``v_zero``)."""

    def __init__(self, layer: LayerSpec, quant: UniformQuantizer, *, batch: int, capacity: int, device: Any, dtype):
        reasons = quant.check_dim(layer.head_dim)
        if reasons:
            raise ValueError("; ".join(reasons))
        self.quant = quant
        super().__init__(layer, quant, quant, batch=batch, capacity=capacity, device=device, dtype=dtype)
