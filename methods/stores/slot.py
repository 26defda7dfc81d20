"""The base of slot layouts: tokens in order in preallocated ``(B, H_kv, capacity, ...)`` buffers."""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
from torch import Tensor

from methods.api import KVStats, LayerSpec, torch_dtype
from methods.stores.common import attend, causal_slot_mask, slot_destinations, walk_tensors

__all__ = ["SlotStore"]


class SlotStore:
    """Tokens in order in the slots of preallocated buffers ``(B, H_kv, capacity, ...)``.

    Decode capacity is allocated once; a decode step (T == 1) writes one slot per row with a
    scatter and attends over the whole buffer under a mask: static shapes, no host sync. Prefill
    chunks (T > 1) attend over the slots used so far only (``self.hi``, a host-side bound).

    Subclasses name their buffers in ``token_fields`` and implement :meth:`_write` (store the new
    tokens) and :meth:`_read` (a dense (B, H_kv, S, D) view of the first S slots for attention).
    Per-row counters listed in ``bookkeeping`` are O(B) integers, not KV bytes.
    """

    token_fields: ClassVar[tuple[str, ...]] = ()
    bookkeeping: ClassVar[tuple[str, ...]] = ("lengths", "seen")
    kernel: ClassVar[str] = "reference"  # "fused" when the store runs fused kernels (the row's kernel column)
    graph_safe: ClassVar[bool] = False  # decode step capturable in a CUDA graph (see FusedDenseStore)
    overlay_new: ClassVar[bool] = True  # new tokens attend to each other exactly (not as stored)

    def __init__(self, layer: LayerSpec, *, batch: int, capacity: int, device: Any, dtype: torch.dtype):
        self.layer = layer
        self.batch = batch
        self.capacity = int(capacity)
        self.device = torch.device(device)
        self.dtype = dtype
        self.lengths = torch.zeros(batch, dtype=torch.long, device=self.device)  # (B,) valid slots
        self.seen = torch.zeros(batch, dtype=torch.long, device=self.device)  # (B,) tokens seen
        self.hi = 0  # host-side bound on slots written so far (padding included)

    # -- subclass hooks -------------------------------------------------------------------------
    def _write(self, dest: Tensor, k: Tensor, v: Tensor) -> None:
        """Store k, v (B, H_kv, T, D) at slots dest (B, T)."""
        raise NotImplementedError

    def _write_valid(self, dest: Tensor, k: Tensor, v: Tensor, valid: Tensor) -> None:
        """Like :meth:`_write`, for stores that need ``valid`` (B, T); ``self.lengths`` still
        holds the lengths before this call."""
        self._write(dest, k, v)

    def _read(self, n_slots: int) -> tuple[Tensor, Tensor]:
        """Dense K, V (B, H_kv, n_slots, D) of the first n_slots slots, as stored."""
        raise NotImplementedError

    def slots_stored(self, field: str, kept: Tensor) -> Tensor | None:
        """(B, H_kv) entries along axis 2 of buffer ``field`` that hold stored data, or None for
        a tensor counted whole. Default: ``kept`` for ``token_fields``."""
        return kept if field in self.token_fields else None

    # -- LayerKV --------------------------------------------------------------------------------
    def _check_capacity(self, T: int) -> None:
        if self.hi + T > self.capacity:
            raise RuntimeError(
                f"KV store capacity {self.capacity} exceeded ({self.hi} slots used + {T} new); "
                "the engine sizes capacity as context + question + max_new_tokens"
            )

    def extend(self, q: Tensor, k: Tensor, v: Tensor, *, positions: Tensor, valid: Tensor, scaling: float) -> Tensor:
        B, H_kv, T, D = k.shape
        self._check_capacity(T)
        dest = slot_destinations(self.lengths, valid)  # (B, T)
        n_slots = self.capacity if T == 1 else self.hi + T
        if self.overlay_new:
            kk, vv = self._read(n_slots)  # (B, H_kv, S, D) past as stored
            idx = dest[:, None, :, None].expand(B, H_kv, T, D)  # (B, H_kv, T, D)
            kk = kk.scatter(2, idx, k.to(kk.dtype))  # new tokens exact
            vv = vv.scatter(2, idx, v.to(vv.dtype))
            self._write_valid(dest, k, v, valid)
        else:
            self._write_valid(dest, k, v, valid)
            kk, vv = self._read(n_slots)
        lengths_new = self.lengths + valid.sum(1)  # (B,)
        mask = causal_slot_mask(lengths_new, dest, n_slots)  # (B, 1, T, S)
        out = attend(q, kk.to(q.dtype), vv.to(q.dtype), mask, scaling=scaling)  # (B, T, H_q, D)
        self.lengths = lengths_new
        self.seen = self.seen + valid.sum(1)
        self.hi += T
        return out

    def ingest(self, k: Tensor, v: Tensor, *, valid: Tensor, seen: Tensor) -> None:
        """Load tokens chosen elsewhere into this empty store, as :meth:`extend` would store them, without attending
        (no query, no output): the entry point of a selector in front of a quantizer (methods/compose.py), so only
        the tokens given here are ever encoded.

        k, v (B, H_kv, T, D) in the order they are to be stored (slot order); valid (B, T) bool, False = padding
        (written past the row's valid slots, never counted, overwritten by the next token, as in :meth:`extend`);
        seen (B,) int64 tokens each row has seen so far (the context the selection came from: ``bytes_full`` and
        ``ratio_achieved`` count them). Every kv head of a row holds the same number of tokens (``lengths`` is per
        row); a layer whose heads keep different counts is one store per head (methods/compose.py)."""
        if self.hi:
            raise RuntimeError(f"ingest loads an empty store; this one holds {self.hi} slots already")
        T = k.shape[2]
        self._check_capacity(T)
        dest = slot_destinations(self.lengths, valid)  # (B, T)
        self._write_valid(dest, k, v, valid)
        self.lengths = self.lengths + valid.sum(1)  # (B,)
        self.seen = seen.to(device=self.device, dtype=torch.long).clone()  # (B,)
        self.hi = T
        if getattr(self, "uniform", None) is not None:  # fused stores: every row holds exactly `hi` valid slots?
            self.uniform = bool(valid.all())

    def end_of_context(self) -> None:
        return None

    def fork(self) -> SlotStore:
        new = copy.copy(self)
        for name, value in vars(self).items():
            if isinstance(value, Tensor):
                setattr(new, name, value.clone())
        return new

    def tokens_kept(self) -> Tensor:
        """(B, H_kv) tokens each kv head holds."""
        return self.lengths[:, None].expand(self.batch, self.layer.n_kv_heads)

    def stats(self) -> KVStats:
        kept = self.tokens_kept().detach().to("cpu", torch.long)  # (B, H_kv)
        nominal = torch_dtype(self.layer.nominal_dtype)
        stored = allocated = 0
        for name, t in walk_tensors(self):
            root = name.split(".")[0]
            if root in self.bookkeeping or root == "layer":
                continue
            elem = t.element_size()
            if t.is_floating_point() and t.dtype == self.dtype:
                elem = torch.empty((), dtype=nominal).element_size()
            allocated += t.numel() * elem
            used = self._stored_bytes(root, t, elem, kept)
            stored += t.numel() * elem if used is None else used
        seen = self.seen.detach().to("cpu", torch.long)
        full = int(seen.sum()) * 2 * self.layer.n_kv_heads * self.layer.head_dim * torch.empty(
            (), dtype=nominal
        ).element_size()
        return KVStats(
            tokens_kept=kept,
            tokens_seen=seen,
            bytes_stored=stored,
            bytes_allocated=allocated,
            bytes_read_per_step=self._read_per_step(stored),
            bytes_full=full,
        )

    def _stored_bytes(self, root: str, t: Tensor, elem: int, kept: Tensor) -> int | None:
        """Bytes of ``t`` (the attribute named ``root``, ``elem`` bytes per entry) that hold data now;
        None counts the whole tensor. Default: a per-token buffer (B, H_kv, slots, ...) counts the
        entries :meth:`slots_stored` reports; stores with other layouts (a flat ragged buffer, an
        index's parents) override this."""
        n = self.slots_stored(root, kept)
        if n is None:
            return None
        per_slot = (t.numel() // max(1, t.shape[0] * t.shape[1] * t.shape[2])) * elem
        return int(n.sum()) * per_slot

    def _read_per_step(self, stored: int) -> int:
        """Bytes one decode step reads; a dense store reads everything it stores."""
        return stored


class PartsGraphState:
    """The CUDA-graph protocol of a store made of stores (RateQuant's width groups, compose's per-head stores):
    each part snapshots, restores and advances its own state. The store names its parts in ``graph_parts``."""

    def graph_parts(self) -> list:
        raise NotImplementedError

    def graph_snapshot(self) -> list:
        return [st.graph_snapshot() for st in self.graph_parts()]

    def graph_restore(self, snap: list) -> None:
        for st, s in zip(self.graph_parts(), snap):
            st.graph_restore(s)

    def graph_advance(self, steps: int) -> None:
        for st in self.graph_parts():
            st.graph_advance(steps)


class CounterGraphState:
    """The CUDA-graph protocol of a store whose decode step advances only ``lengths`` / ``seen`` (device) and
    ``hi`` / ``uniform`` (host): :class:`~methods.stores.FusedDenseStore` and the fused
    :class:`~methods.stores.CodecStore` (harness.engine captures graph_safe stores' decode steps)."""

    def graph_snapshot(self) -> tuple:
        """What a decode step advances: device counters (cloned) and host bounds."""
        return self.lengths.clone(), self.seen.clone(), self.hi, self.uniform

    def graph_restore(self, snap: tuple) -> None:
        lengths, seen, self.hi, self.uniform = snap
        self.lengths.copy_(lengths)  # in place: the captured graph holds these tensors
        self.seen.copy_(seen)

    def graph_advance(self, steps: int) -> None:
        """Host bookkeeping of ``steps`` replayed decode steps (the graph advanced the device state)."""
        self.hi += steps
        self.uniform = False
