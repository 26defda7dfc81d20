"""The fused fast path of sparse-read stores (issue 21): what Quest's and Louver's fused stores share.

:class:`FusedSparseRead` goes in front of a :class:`methods.stores.SparseReadStore` subclass (``class
FusedQuestStore(FusedSparseRead, QuestStore)``) and keeps its layout, index and semantics; only the kernels differ
(``kernel = "fused"``):

- Prefill chunks while every row has had only valid tokens: the chunk's K/V are written to slots ``hi .. hi+T-1``
  (through the store's ``_write_valid``, so an index that encodes keys as they arrive sees them) and
  :func:`methods.kernels.attention.prefill_attention` attends causally without a mask; otherwise the reference
  path. The question (a chunk after ``end_of_context``) attends densely, as on the reference path.
- Decode (T == 1): the subclass's ``_fused_decode`` runs its append (which also keeps the index up to date) and
  :func:`methods.kernels.sparse_attention.sparse_decode_attention`; no host sync, no allocation that depends on
  lengths, no attribute rebinding, so the engine captures the step in a CUDA graph (``graph_safe``).
- Reads are booked on the device per row (``acc``: indexed slots read, buffer slots read, indexed slots there,
  steps); ``stats`` turns them into the same ``bytes_read_per_step`` the reference path measures, index bytes
  included (the subclass's ``_index_bytes_booked``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from methods.stores import SlotStore


class FusedSparseRead:
    """Mixin: the fused fast path of a SparseReadStore subclass (module docstring)."""

    kernel = "fused"
    graph_safe = True
    graph_state: tuple[str, ...] = ("lengths", "seen", "idx_end", "acc")  # device tensors a decode step advances

    def _fused_init(self) -> None:
        self.uniform = True  # host: every row holds exactly `hi` valid slots (no padding, no decode yet)
        self.acc = torch.zeros(self.batch, 4, dtype=torch.long, device=self.device)  # (B, 4) booked reads

    # -- hooks of the concrete store ------------------------------------------------------------------
    def _fused_decode(self, q: Tensor, k: Tensor, v: Tensor, valid: Tensor, scaling: float) -> Tensor:
        """q (B, H_q, D), k, v (B, H_kv, D), valid (B,) -> (B, H_q, D): append, index upkeep, attention."""
        raise NotImplementedError

    def _index_bytes_booked(self, indexed: Tensor, steps: Tensor) -> Tensor:
        """(B,) index bytes read over the booked steps, from the sums of (indexed slots x kv heads) and steps."""
        raise NotImplementedError

    # -- the store ------------------------------------------------------------------------------------------
    def _prefill(self, q: Tensor, k: Tensor, v: Tensor, *, positions: Tensor, valid: Tensor, scaling: float) -> Tensor:
        from methods.kernels.attention import prefill_attention

        T = k.shape[2]
        self._check_capacity(T)
        if self.uniform and bool(valid.all()):  # one host sync per chunk
            s = self.hi
            dest = (s + torch.arange(T, device=self.device))[None].expand(self.batch, T)  # (B, T)
            self._write_valid(dest, k, v, valid)
            out = prefill_attention(q, self.k, self.v, start=s, scaling=scaling)  # (B, T, H_q, D)
            self.lengths.add_(T)
            self.seen.add_(T)
            self.hi += T
            return out
        self.uniform = False
        return SlotStore.extend(self, q, k, v, positions=positions, valid=valid, scaling=scaling)

    def extend(self, q: Tensor, k: Tensor, v: Tensor, *, positions: Tensor, valid: Tensor, scaling: float) -> Tensor:
        T = k.shape[2]
        if T > 1 or not self.built:
            out = self._prefill(q, k, v, positions=positions, valid=valid, scaling=scaling)
            if self.built:
                self.buf_hi += T
                self._after_chunk()
            return out
        self._check_capacity(1)
        out = self._fused_decode(q[:, :, 0], k[:, :, 0], v[:, :, 0], valid[:, 0], scaling)  # (B, H_q, D)
        self.uniform = False
        self.hi += 1  # host bounds; a CUDA-graph replay skips these lines and the engine calls graph_advance
        self.buf_hi += 1
        return out[:, None]

    def _read_per_step(self, stored: int) -> int:
        L = self.layer
        acc = self.acc.to(torch.float64)  # (B, 4)
        kv_bytes = 2 * L.head_dim * self._nominal_size()
        read = (acc[:, 0] + acc[:, 1]) * kv_bytes + self._index_bytes_booked(acc[:, 2], acc[:, 3])  # (B,)
        dense = self.lengths.to(torch.float64) * L.n_kv_heads * kv_bytes
        per_row = torch.where(acc[:, 3] > 0, read / acc[:, 3].clamp(min=1), dense)
        return int(round(float(per_row.sum())))

    def scanned_fraction(self) -> float | None:
        total = float(self.acc[:, 2].sum())
        return float(self.acc[:, 0].sum()) / total if total else None

    # -- CUDA-graph protocol (harness.engine captures the decode step of graph_safe stores) -------------------
    def graph_snapshot(self) -> tuple[dict[str, Tensor], tuple[Any, ...]]:
        return {n: getattr(self, n).clone() for n in self.graph_state}, (self.hi, self.buf_hi, self.uniform)

    def graph_restore(self, snap: tuple[dict[str, Tensor], tuple[Any, ...]]) -> None:
        dev, (self.hi, self.buf_hi, self.uniform) = snap
        for n, t in dev.items():
            getattr(self, n).copy_(t)  # in place: the captured graph holds these tensors

    def graph_advance(self, steps: int) -> None:
        self.hi += steps
        self.buf_hi += steps
        self.uniform = False
