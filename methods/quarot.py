"""``quarot``: Hadamard-rotated per-head asymmetric INT-k K/V (Ashkboos et al. 2024, "QuaRot:
Outlier-Free 4-Bit Inference in Rotated LLMs"; papers.md §6).

Each token's K and V vector (per kv head) is rotated by a randomized Walsh-Hadamard transform
H diag(s) / sqrt(D) over head_dim, then quantized with one asymmetric min/max scale and zero point
per head vector (``group_size`` 0 = head_dim, QuaRot's ``--k_per_head``/``--v_per_head``), the range
shrunk by ``clip_ratio``. Codes are bit-packed; scale and zero point are kept in the model dtype.

Choices QuaRot leaves to the deployment, and ours:
- Keys: QuaRot rotates q and k online after RoPE so q.k is unchanged; we decode the stored rotated
  key and rotate it back (H^T), which gives the same scores.
- Values: QuaRot folds the Hadamard into W_v / W_o offline; rotating each value vector before
  quantization and back after decoding is the same linear map, done online here.
- Random signs: one sign vector per (layer, K|V) from ``seed`` (QuaRot uses a random Hadamard
  too); its D int8 signs are counted in ``bytes_stored``.
- ``clip_ratio`` default 0.95: QuaRot's KV4 scripts use 0.95 (its flag default is 1.0).
- Zero point: kept in floating point (QuaRot rounds it to an integer); scale and zero point are
  computed from the rotated vector.
- Widths: any integer 1-8 bits (16 = unquantized); ratio -> bits = 16 * (1 - ratio).
- Kernels (``fused``, auto = on CUDA): the decode kernels read the rotated codes and attend in the rotated
  space: q is rotated once per step (with the new key, in the append kernel) and the output un-rotated
  once (in the combine kernel), never per key (methods/kernels/quant_attention.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from methods.api import LayerSpec, ModelSpec
from methods.quant_base import QuantMethod, codec_roundtrip, unit_seed
from methods.quantizers import RotatedQuantizer, UniformQuantizer, is_power_of_two
from methods.stores import CodecStore


@dataclass
class QuaRot(QuantMethod):
    """Randomized Hadamard over head_dim, then per-head asymmetric INT-k with a clip ratio."""

    ratio: float = 0.75
    clip_ratio: float = 0.95
    group_size: int = 0
    seed: int = 0

    name = "quarot"
    kernel = "fused"  # fused decode kernels (fused=auto: on CUDA); rows record the path that ran

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < float(self.clip_ratio) <= 1.0:
            raise ValueError(f"clip_ratio must be in (0, 1], got {self.clip_ratio}")
        if int(self.group_size) < 0:
            raise ValueError(f"group_size must be >= 0 (0 = head_dim), got {self.group_size}")

    def extra_reasons(self, model: ModelSpec, k_bits: int, v_bits: int) -> list[str]:
        reasons = [] if is_power_of_two(model.head_dim) else [
            f"quarot's Walsh-Hadamard rotation needs a power-of-two head_dim, got {model.head_dim}"]
        for b in sorted({k_bits, v_bits}):
            reasons += self._quant(model.head_dim, b).check_dim(model.head_dim)
        return reasons

    def _quant(self, dim: int, bits: int) -> UniformQuantizer:
        return UniformQuantizer(bits, int(self.group_size) or dim, float(self.clip_ratio))

    def codec(self, dim: int, bits: int, *, layer_idx: int, kind: str, device: Any = None):
        return RotatedQuantizer(self._quant(dim, bits), dim=dim, seed=unit_seed(self.seed, layer_idx, kind),
                                device=device)

    def store(self, layer: LayerSpec, *, k_bits: int, v_bits: int, batch: int, capacity: int, device: Any,
              dtype: Any) -> CodecStore:
        D = layer.head_dim
        kc = self.codec(D, k_bits, layer_idx=layer.layer_idx, kind="k", device=device)
        vc = self.codec(D, v_bits, layer_idx=layer.layer_idx, kind="v", device=device)
        return CodecStore(layer, kc, vc, batch=batch, capacity=capacity, device=device, dtype=dtype,
                          fused=self.use_fused(layer, kc, vc, device))

    def codecs(self, layer: LayerSpec, *, k_bits: int, v_bits: int, device: Any) -> tuple[Any, Any]:
        D = layer.head_dim
        return (self.codec(D, k_bits, layer_idx=layer.layer_idx, kind="k", device=device),
                self.codec(D, v_bits, layer_idx=layer.layer_idx, kind="v", device=device))

    def roundtrip(self, x: Tensor, *, bits: int, kind: str, layer_idx: int) -> Tensor:
        return codec_roundtrip(self.codec(x.shape[-1], bits, layer_idx=layer_idx, kind=kind, device=x.device), x)
