"""``full``: the uncompressed baseline every method is compared against."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from methods.api import LayerSpec, MethodBase
from methods.kernels import FUSED_CHOICES, use_fused
from methods.stores import DenseStore, FusedDenseStore


@dataclass
class Full(MethodBase):
    """Dense K/V at the model's dtype. Decode capacity is allocated once (context + question +
    max_new_tokens slots); a decode step writes one slot with a scatter, no per-step allocation
    and no ``torch.cat``. ``ratio`` must be 0: a full cache removes nothing.

    ``fused`` picks the kernels: ``auto`` serves layers with :class:`~methods.stores.FusedDenseStore` on
    CUDA with Triton (head_dim a power of two from 16 to 256): flash-decoding for the decode step, which
    the engine captures in a CUDA graph, and a mask-free causal kernel for prefill chunks; elsewhere the
    plain-torch reference path. ``on`` insists (an error where the kernels cannot run; on CPU they run
    under Triton's interpreter when the process starts with ``TRITON_INTERPRET=1``: the tests), ``off``
    always takes the reference path. The row's ``kernel`` column says which ran."""

    ratio: float = 0.0
    fused: str = "auto"

    def __post_init__(self) -> None:
        if self.fused not in FUSED_CHOICES:
            raise ValueError(f"fused must be one of {FUSED_CHOICES}, got {self.fused!r}")

    family = "none"
    memory = "physical"
    kernel = "fused"  # has a fused path; rows record the path that actually ran
    name = "full"

    def ratio_reasons(self) -> list[str]:
        return [] if self.ratio == 0 else [f"method 'full' keeps every byte; ratio must be 0, got {self.ratio}"]

    def new_layer(self, layer: LayerSpec, *, batch: int, capacity: int, device: Any, dtype: Any) -> DenseStore:
        if use_fused(self.fused, device, FusedDenseStore.supports(layer)):
            return FusedDenseStore(layer, batch=batch, capacity=capacity, device=device, dtype=dtype)
        return DenseStore(layer, batch=batch, capacity=capacity, device=device, dtype=dtype)
