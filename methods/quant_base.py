"""Shared pieces of the quantization family: ratio -> bits, the 16-bit pass-through, and the
per-unit interface RateQuant drives (``store(layer, k_bits=, v_bits=)`` and ``roundtrip``).

Ratio mapping (DESIGN §6): nominal code bits = 16 * (1 - ratio). Overheads (scales, zero points,
norms, residual windows) are not part of the nominal bits; the row's ``ratio_achieved`` includes them.
At 16 bits (ratio 0) every quantizer stores K/V unquantized in a dense store, so it reproduces ``full``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from methods.api import LayerSpec, MethodBase, ModelSpec
from methods.kernels import FUSED_CHOICES, use_fused
from methods.stores import CodecStore, DenseStore

INT_BITS = (1, 2, 3, 4, 5, 6, 7, 8)


def ratio_to_bits(ratio: float) -> float:
    """Nominal code bits for a target byte reduction against a 16-bit cache."""
    return 16.0 * (1.0 - float(ratio))


def integer_bits(ratio: float) -> int | None:
    """16 * (1 - ratio) when it is a whole number of bits, else None."""
    b = ratio_to_bits(ratio)
    return int(round(b)) if abs(b - round(b)) < 1e-9 else None


def unit_seed(seed: int, layer_idx: int, kind: str) -> int:
    """Seed of one (layer, K|V) quantizer's random constants (rotation signs, sketch); every kv
    head of a layer shares them."""
    return int(seed) * 1_000_003 + layer_idx * 1009 + (0 if kind == "k" else 1)


@dataclass
class QuantMethod(MethodBase):
    """Base of the per-token quantizers: one integer width for K and V from ``ratio``.

    Subclasses set ``widths`` (the code widths they store physically), implement
    :meth:`store` (a store at given K and V widths) and :meth:`roundtrip` (encode + decode of
    one head's K or V, for calibration), and may add reasons in :meth:`extra_reasons`.

    ``fused`` (auto | on | off) picks the kernels of stores built on :class:`~methods.stores.CodecStore`
    (:meth:`use_fused`): auto = the fused decode (and prefill) kernels on CUDA where the codecs declare one,
    the reference path elsewhere (CPU: ``on`` runs them under ``TRITON_INTERPRET=1``, the tests)."""

    ratio: float = 0.75
    fused: str = "auto"

    family = "quantization"
    memory = "physical"
    kernel = "reference"  # "fused" in subclasses whose stores have fused kernels; rows record the path that ran
    widths: ClassVar[tuple[int, ...]] = INT_BITS

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.ratio) < 1.0:
            raise ValueError(f"ratio must be in [0, 1), got {self.ratio}")
        if self.fused not in FUSED_CHOICES:
            raise ValueError(f"fused must be one of {FUSED_CHOICES}, got {self.fused!r}")

    def use_fused(self, layer: LayerSpec, k_codec: Any, v_codec: Any, device: Any) -> bool:
        """``fused`` -> whether a CodecStore of these codecs takes the fused kernels (auto: on CUDA where the
        codecs declare a kernel that serves this layer; on: wherever the kernels run, else an error saying
        why; off: never)."""
        return use_fused(self.fused, device, CodecStore.fused_reason(layer, k_codec, v_codec))

    @property
    def bits(self) -> int | None:
        b = integer_bits(self.ratio)
        return b if b == 16 or b in self.widths else None

    def validate(self, model: ModelSpec) -> list[str]:
        reasons = super().validate(model)
        if self.bits is None:
            ok = ", ".join(f"{1 - w / 16:g}" for w in self.widths)
            reasons.append(f"{self.name} cannot honour ratio {self.ratio}: it needs {ratio_to_bits(self.ratio):g} bits "
                           f"per element and stores {self.widths} bits (ratios {ok}) or 16 (ratio 0)")
            return reasons
        if self.bits != 16:
            reasons += self.extra_reasons(model, self.bits, self.bits)
        return reasons

    def extra_reasons(self, model: ModelSpec, k_bits: int, v_bits: int) -> list[str]:
        return []

    def store(self, layer: LayerSpec, *, k_bits: int, v_bits: int, batch: int, capacity: int, device: Any,
              dtype: Any) -> Any:
        raise NotImplementedError

    def roundtrip(self, x: Tensor, *, bits: int, kind: str, layer_idx: int) -> Tensor:
        """x (B, 1, T, D) of one kv head -> what the store would give back at ``bits``."""
        raise NotImplementedError

    def codecs(self, layer: LayerSpec, *, k_bits: int, v_bits: int, device: Any) -> tuple[Any, Any] | None:
        """(K codec, V codec) of a per-token :class:`~methods.stores.CodecStore` at these widths, or None when
        the method's store is another layout. RateQuant groups a layer's heads by width into CodecStores with
        them (one kernel launch per width pair, not per head)."""
        return None

    def new_layer(self, layer: LayerSpec, *, batch: int, capacity: int, device: Any, dtype: Any) -> Any:
        if self.bits is None:
            raise ValueError(f"{self.name} cannot honour ratio {self.ratio}; call validate() first")
        if self.bits == 16:
            return DenseStore(layer, batch=batch, capacity=capacity, device=device, dtype=dtype)
        return self.store(layer, k_bits=self.bits, v_bits=self.bits, batch=batch, capacity=capacity, device=device,
                          dtype=dtype)


def codec_roundtrip(codec: Any, x: Tensor) -> Tensor:
    """Encode then decode with a CodecStore codec; x (..., D) -> (..., D) in x's dtype."""
    return codec.decode_fields(codec.encode_fields(x, meta_dtype=x.dtype), dtype=x.dtype)
