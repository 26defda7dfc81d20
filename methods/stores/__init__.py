"""Storage layouts shared by methods, one store per module, and the reference attention they call.

A store keeps each layer's tokens in *slots* of buffers whose layout is ``(B, H_kv, S, ...)``.
:class:`SlotStore` (:mod:`.slot`) handles the bookkeeping every slot layout shares (where new tokens go,
which slots a query may see, padding, capacity, byte accounting); subclasses decide what a slot holds:

- :mod:`.dense`: :class:`DenseStore` (full-precision K/V) and :class:`FusedDenseStore` (its fused kernels);
- :mod:`.codec`: :class:`CodecStore` (per-token codec fields: packed integer codes, scales, ...);
- :mod:`.sparse_read`: :class:`SparseReadStore` (every token kept, a query-dependent subset read);
- :mod:`.common`: the shared pieces (:func:`attend`, :func:`walk_tensors`, slot placement and masks).

Eviction stores that keep per-head ragged lengths (methods/ragged.py) build on the same pieces. Every name
below stays importable from ``methods.stores``.
"""

from __future__ import annotations

from methods.stores.codec import CodecStore
from methods.stores.common import attend, causal_slot_mask, scatter_slots, slot_destinations, walk_tensors
from methods.stores.dense import DenseStore, FusedDenseStore
from methods.stores.slot import PartsGraphState, SlotStore
from methods.stores.sparse_read import SparseReadStore

__all__ = ["attend", "walk_tensors", "slot_destinations", "causal_slot_mask", "scatter_slots", "SlotStore", "DenseStore",
           "FusedDenseStore", "CodecStore", "SparseReadStore", "PartsGraphState"]
