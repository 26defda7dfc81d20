"""The sparse-read store: every token kept, a query-dependent subset read per decode step (Louver, Quest)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from methods.api import LayerSpec, torch_dtype
from methods.stores.common import attend, slot_destinations
from methods.stores.dense import DenseStore

__all__ = ["SparseReadStore"]


class SparseReadStore(DenseStore):
    """Keeps every token and reads a query-dependent subset of the indexed ones per decode step.

    The family of Louver and Quest: nothing is evicted, so the axis is bytes *read* per step.
    - Prefill, and any multi-token chunk after it (the question), attends densely: these methods
      sparsify decode only.
    - ``end_of_context`` builds the subclass's index over the context keys (:meth:`_index_add`).
      Later tokens go to a dense *buffer* of recent tokens that every decode step attends to; every
      ``merge_every`` decode steps the buffer is merged into the index.
    - A decode step (T == 1) asks the subclass which indexed slots each query head reads
      (:meth:`_select`, (B, H_kv, G, S) bool), attends exactly (softmax) over those plus the buffer,
      and accumulates what it read: the index bytes its gate reads (:meth:`_index_read_bytes`), K and V
      of every indexed slot some query head of a kv head selected (a kernel loads a key once per kv
      head) and of the buffer. ``stats().bytes_read_per_step`` is that sum averaged over the decode
      steps each row took (a row without decode steps reads its whole dense K/V), so it is measured,
      not a formula.
    - ``dense_decode`` (ratio 0, or a layer a method leaves dense) reads every slot and no index.
    The reference path computes all scores and masks them; the byte accounting is what a gather
    kernel reading the selected slots would move. Hooks: ``_before_decode_step`` (index upkeep before the
    new token is written) and ``_after_chunk`` (after the question). The fused stores
    (methods/sparse_fused.py, issue 21) keep the same layout and index and read only the selected slots.
    """

    bookkeeping = ("lengths", "seen", "idx_end", "read_bytes", "read_steps", "read_keys", "indexed_keys")
    index_fields: ClassVar[tuple[str, ...]] = ()  # tensors whose used part _index_stored_bytes reports

    def __init__(self, layer: LayerSpec, *, batch: int, capacity: int, device: Any, dtype: torch.dtype,
                 merge_every: int):
        super().__init__(layer, batch=batch, capacity=capacity, device=device, dtype=dtype)
        self.merge_every = int(merge_every)
        self.built = False
        self.dense_decode = False
        self.buf_hi = 0  # host bound on buffer slots per row (tokens appended since the last merge)
        self.steps_since_merge = 0
        self.n_merges = 0
        z = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.idx_end = z.clone()  # (B,) slots [0, idx_end) are indexed, [idx_end, lengths) the buffer
        self.read_bytes = torch.zeros(batch, dtype=torch.float64, device=self.device)  # (B,) summed over steps
        self.read_steps = z.clone()  # (B,) decode steps taken
        self.read_keys = torch.zeros(batch, dtype=torch.float64, device=self.device)  # (B,) indexed keys read
        self.indexed_keys = torch.zeros(batch, dtype=torch.float64, device=self.device)  # (B,) indexed keys there

    # -- subclass hooks -------------------------------------------------------------------------
    def _index_reset(self) -> None:
        """Allocate the index (called once, at end_of_context, before the first _index_add)."""
        raise NotImplementedError

    def _index_add(self, keys: Tensor, valid: Tensor, slots: Tensor) -> None:
        """Index keys (B, H_kv, W, D) fp32 stored at slots (B, W); valid (B, W) bool."""
        raise NotImplementedError

    def _select(self, qg: Tensor) -> Tensor:
        """qg (B, H_kv, G, D) fp32 decode queries -> (B, H_kv, G, S) bool: indexed slots each reads."""
        raise NotImplementedError

    def _index_read_bytes(self) -> Tensor:
        """(B,) bytes of the index one decode step reads (all kv heads)."""
        raise NotImplementedError

    def _index_stored_bytes(self, root: str, t: Tensor, elem: int) -> int:
        """Bytes of index tensor ``root`` in use (called for names in ``index_fields``)."""
        return t.numel() * elem

    def _after_chunk(self) -> None:
        """Index upkeep after a multi-token chunk that followed ``end_of_context`` (the question)."""
        return None

    def _before_decode_step(self) -> None:
        """Index upkeep at the start of a decode step, before the new token is written (Quest closes the page
        its rows' tokens filled). Must not synchronise with the host."""
        return None

    # -- the store ------------------------------------------------------------------------------
    def _nominal_size(self) -> int:
        return torch.empty((), dtype=torch_dtype(self.layer.nominal_dtype)).element_size()

    def _merge(self, width: int) -> None:
        """Index the buffer: the ``width`` slots after each row's ``idx_end`` (valid below lengths)."""
        if width > 0 and not self.dense_decode:  # a store that reads everything keeps no index
            B, H, _, D = self.k.shape
            slots = self.idx_end[:, None] + torch.arange(width, device=self.device)  # (B, W)
            valid = slots < self.lengths[:, None]  # (B, W)
            slots = slots.clamp(max=self.capacity - 1)
            keys = self.k.gather(2, slots[:, None, :, None].expand(B, H, width, D)).float()  # (B, H_kv, W, D)
            self._index_add(keys, valid, slots)
        self.idx_end = self.lengths.clone()
        self.buf_hi = 0
        self.steps_since_merge = 0
        self.n_merges += 1

    def end_of_context(self) -> None:
        if self.built:
            return
        if not self.dense_decode:
            self._index_reset()
        self._merge(self.hi)
        self.built = True

    def extend(self, q: Tensor, k: Tensor, v: Tensor, *, positions: Tensor, valid: Tensor, scaling: float) -> Tensor:
        B, H, T, D = k.shape
        if not self.built or T > 1:
            out = super().extend(q, k, v, positions=positions, valid=valid, scaling=scaling)
            if self.built:
                self.buf_hi += T
                self._after_chunk()
            return out
        if self.hi + 1 > self.capacity:
            raise RuntimeError(f"KV store capacity {self.capacity} exceeded ({self.hi} slots used + 1 new); "
                               "the engine sizes capacity as context + question + max_new_tokens")
        dest = slot_destinations(self.lengths, valid)  # (B, 1)
        self._before_decode_step()
        self._write_valid(dest, k, v, valid)
        lengths_new = self.lengths + valid.sum(1)  # (B,)
        slots = torch.arange(self.capacity, device=self.device)  # (S,)
        indexed = slots[None] < self.idx_end[:, None]  # (B, S)
        buffer = ((slots[None] >= self.idx_end[:, None]) & (slots[None] < lengths_new[:, None])) | (
            slots[None] == dest
        )  # (B, S): recent tokens, and a padding row's own slot
        G = self.layer.n_groups
        if self.dense_decode:
            sel = indexed[:, None, None, :].expand(B, H, G, self.capacity)  # (B, H_kv, G, S)
            index_read = torch.zeros(B, dtype=torch.float64, device=self.device)
        else:
            qg = q[:, :, 0].float().reshape(B, H, G, D)  # (B, H_kv, G, D): query head h reads kv head h // G
            sel = self._select(qg) & indexed[:, None, None, :]  # (B, H_kv, G, S)
            index_read = self._index_read_bytes().to(torch.float64)  # (B,)
        mask = (sel | buffer[:, None, None, :]).reshape(B, H * G, 1, self.capacity)  # (B, H_q, 1, S)
        out = attend(q, self.k.to(q.dtype), self.v.to(q.dtype), mask, scaling=scaling)  # (B, 1, H_q, D)
        step = valid[:, 0]  # (B,) finished rows do not count
        n_read = sel.any(2).sum((1, 2)).to(torch.float64)  # (B,) indexed keys read, summed over kv heads
        n_buf = (buffer.sum(1) * H).to(torch.float64)  # (B,)
        kv_bytes = 2 * D * self._nominal_size()
        zero = torch.zeros_like(n_read)
        self.read_bytes = self.read_bytes + torch.where(step, (n_read + n_buf) * kv_bytes + index_read, zero)
        self.read_keys = self.read_keys + torch.where(step, n_read, zero)
        self.indexed_keys = self.indexed_keys + torch.where(step, (self.idx_end * H).to(torch.float64), zero)
        self.read_steps = self.read_steps + step.long()
        self.lengths = lengths_new
        self.seen = self.seen + valid.sum(1)
        self.hi += 1
        self.buf_hi += 1
        self.steps_since_merge += 1
        if self.steps_since_merge >= self.merge_every:
            self._merge(self.buf_hi)
        return out

    def scanned_fraction(self) -> float | None:
        """Indexed keys read / indexed keys there, over all decode steps so far (None: no step)."""
        total = float(self.indexed_keys.sum())
        return float(self.read_keys.sum()) / total if total else None

    def _stored_bytes(self, root: str, t: Tensor, elem: int, kept: Tensor) -> int | None:
        if root in self.index_fields:
            return self._index_stored_bytes(root, t, elem)
        return super()._stored_bytes(root, t, elem, kept)

    def _read_per_step(self, stored: int) -> int:
        dense = self.lengths.to(torch.float64) * self.layer.n_kv_heads * 2 * self.layer.head_dim * self._nominal_size()
        steps = self.read_steps.to(torch.float64)
        per_row = torch.where(steps > 0, self.read_bytes / steps.clamp(min=1), dense)  # (B,)
        return int(round(float(per_row.sum())))
