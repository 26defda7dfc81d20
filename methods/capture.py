"""A full cache that records what each layer's attention receives: the one recorder for calibration
(:mod:`harness.calibration`, RateQuant's fit) and the diagnostic scripts (``scripts/experiments/index_recall.py``,
``scripts/bench_sparse.py``).

It is not a compression method (not in conf/method, never a row of its own): it keeps every token as
``full`` does and records, per layer,

- with ``qkv=True`` (the default), ``captured[layer_idx]``: the post-RoPE ``(q, k, v)`` of every ``extend``
  call of the layer's latest state, joined along the tokens (q (B, H_q, T, D), k, v (B, H_kv, T, D),
  detached): a sample prefilled in chunks (calibration honours the run's ``prefill_chunk``) is recorded
  whole, and a new state (the next sample) starts afresh;
- with ``queries_after_context=True``, each layer's store (``stores``, the latest state's, in layer order)
  keeps the queries arriving after ``end_of_context`` (the question and the decode steps) in ``queries``
  (each (B, H_q, T, D), cloned) and the number of context slots in ``n_context``.

``fused=True`` stores the tokens in :class:`~methods.stores.FusedDenseStore` on CUDA (so a timed prefill is
``full``'s fused one); the recording stores are never graph safe, so decode steps run eagerly and are
recorded. It imports only the api and the stores, so the harness may import it without importing a method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from methods.api import LayerSpec, MethodBase
from methods.stores import DenseStore, FusedDenseStore, SlotStore

__all__ = ["Capture"]


class _Recording:
    """Mixin over a dense store: records into its :class:`Capture` (kept out of the byte accounting)."""

    graph_safe = False
    bookkeeping = (*SlotStore.bookkeeping, "recorder", "queries", "n_context", "recorded")

    def __init__(self, *args: Any, recorder: Capture, **kw: Any):
        super().__init__(*args, **kw)
        self.recorder = recorder
        self.n_context = 0
        self.recorded = False  # this store (this state's layer) has recorded a call
        self.queries: list[Tensor] = []  # each (B, H_q, T, D)

    def end_of_context(self) -> None:
        self.n_context = self.hi
        return super().end_of_context()

    def extend(self, q: Tensor, k: Tensor, v: Tensor, **kw: Any) -> Tensor:
        rec, idx = self.recorder, self.layer.layer_idx
        if rec.qkv:
            while len(rec.captured) <= idx:
                rec.captured.append(None)  # type: ignore[arg-type]
            new = (q.detach(), k.detach(), v.detach())  # (B, H_q | H_kv, T, D)
            prev = rec.captured[idx] if self.recorded else None
            # a prefill in chunks extends once per chunk: keep this state's whole sequence
            rec.captured[idx] = new if prev is None else tuple(torch.cat([a, b], dim=2) for a, b in zip(prev, new))
            self.recorded = True
        if rec.queries_after_context and self.n_context:
            self.queries.append(q.detach().clone())  # (B, H_q, T, D)
        return super().extend(q, k, v, **kw)


class _DenseCapture(_Recording, DenseStore):
    pass


class _FusedCapture(_Recording, FusedDenseStore):
    pass


@dataclass
class Capture(MethodBase):
    """A full cache that records each layer's post-RoPE q, k, v (and, on request, the queries after the
    context); calibration and diagnostics only, see the module docstring."""

    ratio: float = 0.0
    qkv: bool = True
    queries_after_context: bool = False
    fused: bool = False
    name = "capture"

    def __post_init__(self) -> None:
        self.captured: list[tuple[Tensor, Tensor, Tensor]] = []  # per layer, the latest call's
        self.stores: list[DenseStore] = []  # the latest state's stores, in layer order

    def new_layer(self, layer: LayerSpec, *, batch: int, capacity: int, device: Any, dtype: Any) -> DenseStore:
        cls = _FusedCapture if self.fused and torch.device(device).type == "cuda" else _DenseCapture
        store = cls(layer, batch=batch, capacity=capacity, device=device, dtype=dtype, recorder=self)
        if layer.layer_idx == 0:
            self.stores = []
        self.stores.append(store)
        return store
