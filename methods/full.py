"""``full``: the uncompressed baseline every method is compared against."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from methods.api import LayerSpec, MethodBase, ModelSpec
from methods.stores import DenseStore


@dataclass
class Full(MethodBase):
    """Dense K/V at the model's dtype. Decode capacity is allocated once (context + question +
    max_new_tokens slots); a decode step writes one slot with a scatter, no per-step allocation
    and no ``torch.cat``. ``ratio`` must be 0: a full cache removes nothing."""

    ratio: float = 0.0

    family = "none"
    memory = "physical"
    kernel = "reference"
    name = "full"

    def validate(self, model: ModelSpec) -> list[str]:
        reasons = super().validate(model)
        if self.ratio != 0:
            reasons.append(f"method 'full' keeps every byte; ratio must be 0, got {self.ratio}")
        return reasons

    def new_layer(self, layer: LayerSpec, *, batch: int, capacity: int, device: Any, dtype: Any) -> DenseStore:
        return DenseStore(layer, batch=batch, capacity=capacity, device=device, dtype=dtype)
