"""``streaming_llm``: attention sinks + a recent window (Xiao et al., ICLR 2024,
"Efficient Streaming Language Models with Attention Sinks").

Keeps the first ``n_sink`` tokens of each sequence and a window of the most recent tokens.

Choices the paper leaves open, and ours:
- Budget: ``ratio`` is the fraction of context tokens removed; each row keeps
  ``keep_count(n_context, ratio)`` tokens (:mod:`methods.selectors`: round half up in exact
  integers, at least 1): ``min(n_sink, kept)`` sinks, the rest
  window. The budget is per row, so a batch gives the same result as each prompt alone.
- Prefill: the store holds the whole context while it is being prefilled (every chunk attends to
  all earlier context tokens, as in kvpress' query-agnostic protocol and every other eviction
  method here), then at ``end_of_context`` compacts to sinks + window and frees the prefill
  buffer, so the store is physically that size from then on.
- Question and decode tokens enter the window and evict the oldest window token: the store holds
  exactly ``kept`` tokens per head through decode. Each new token attends to the kept tokens and
  to itself (and, in a multi-token chunk, to earlier tokens of the chunk) before the eviction.
- Positions stay absolute (keys are stored after RoPE with their original positions); the paper's
  re-indexing of positions inside the cache is not applied, so results match a model served
  with a standard RoPE cache.

Fast path (``fused``, :class:`FusedStreamingStore`): the compacted layout is dense and the new token always
goes to the ring's free slot, so the slots a decode step sees are a prefix of each row's buffer (sinks, the
ring) and the dense flash-decoding kernel of ``full`` (:func:`methods.kernels.attention.decode_attention`)
serves it with constant lengths: no ragged kernel is needed (every kv head of a row keeps the same tokens).
Prefill chunks take ``full``'s fused prefill kernel; the decode step is captured in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from methods.api import LayerSpec, MethodBase
from methods.kernels import FUSED_CHOICES, use_fused
from methods.selectors import keep_count
from methods.stores import DenseStore, FusedDenseStore, attend


@dataclass
class StreamingLLM(MethodBase):
    """Sinks + recent window; ``ratio`` in [0, 1) sets the kept fraction of the context. ``fused``: ``auto``
    takes :class:`FusedStreamingStore` on CUDA, ``on`` insists (CPU: under ``TRITON_INTERPRET=1``), ``off``
    keeps the reference store."""

    ratio: float = 0.5
    n_sink: int = 4
    fused: str = "auto"

    family = "eviction"
    memory = "physical"
    kernel = "fused"  # has a fused path; rows record the path that actually ran
    name = "streaming_llm"

    def __post_init__(self) -> None:
        if int(self.n_sink) < 0:
            raise ValueError(f"n_sink must be >= 0, got {self.n_sink}")
        if self.fused not in FUSED_CHOICES:
            raise ValueError(f"fused must be one of {FUSED_CHOICES}, got {self.fused!r}")

    def kept_tokens(self, n_context: int) -> int:
        """Tokens a row of ``n_context`` context tokens keeps (the family's budget function)."""
        return keep_count(n_context, self.ratio)

    def new_layer(self, layer: LayerSpec, *, batch: int, capacity: int, device: Any, dtype: Any) -> StreamingStore:
        cls = FusedStreamingStore if use_fused(self.fused, device, FusedDenseStore.supports(layer)) else StreamingStore
        return cls(layer, self, batch=batch, capacity=capacity, device=device, dtype=dtype)


class StreamingStore(DenseStore):
    """Dense slots during prefill; after ``end_of_context`` a per-row layout of
    ``[sinks | ring of window + 1 slots]`` where one ring slot is always free for the next token."""

    bookkeeping = ("lengths", "seen", "n_sink_row", "ring_size", "free_rel")

    def __init__(self, layer: LayerSpec, method: StreamingLLM, *, batch: int, capacity: int, device: Any, dtype):
        super().__init__(layer, batch=batch, capacity=capacity, device=device, dtype=dtype)
        self.method = method
        self.compacted = False

    # -- after end_of_context: ring mode ---------------------------------------------------------
    def _occupied(self) -> Tensor:
        """(B, S) bool: slots holding kept tokens."""
        slots = torch.arange(self.k.shape[2], device=self.device)  # (S,)
        free = self.n_sink_row + self.free_rel  # (B,)
        return (slots < (self.n_sink_row + self.ring_size)[:, None]) & (slots != free[:, None])

    def end_of_context(self) -> None:
        if self.compacted:
            return
        n = self.lengths.tolist()  # host sync: once per sample
        kept = [min(self.method.kept_tokens(x), x) if x > 0 else 0 for x in n]
        sinks = [min(self.method.n_sink, c) for c in kept]
        window = [c - s for c, s in zip(kept, sinks)]
        n_slots = max(s + w + 1 for s, w in zip(sinks, window))
        src = torch.zeros(self.batch, n_slots, dtype=torch.long)  # (B, S_new) old slot of each new slot
        for b in range(self.batch):
            s, w = sinks[b], window[b]
            src[b, :s] = torch.arange(s)
            src[b, s : s + w] = torch.arange(n[b] - w, n[b])
        src = src.to(self.device)
        B, H_kv, _, D = self.k.shape
        idx = src[:, None, :, None].expand(B, H_kv, n_slots, D)  # (B, H_kv, S_new, D)
        self.k = self.k.gather(2, idx)  # (B, H_kv, S_new, D): the prefill buffer is freed
        self.v = self.v.gather(2, idx)
        self.n_sink_row = torch.tensor(sinks, dtype=torch.long, device=self.device)  # (B,)
        self.ring_size = torch.tensor(window, dtype=torch.long, device=self.device) + 1  # (B,)
        self.free_rel = torch.tensor(window, dtype=torch.long, device=self.device)  # (B,) free ring slot
        self.lengths = torch.tensor(kept, dtype=torch.long, device=self.device)
        self.compacted = True

    def extend(self, q: Tensor, k: Tensor, v: Tensor, *, positions: Tensor, valid: Tensor, scaling: float) -> Tensor:
        if not self.compacted:
            return super().extend(q, k, v, positions=positions, valid=valid, scaling=scaling)
        B, H_kv, T, D = k.shape
        occupied = self._occupied()  # (B, S)
        S = occupied.shape[1]
        if T == 1:  # decode: write into the free slot, attend, evict the oldest window token
            dest = self.n_sink_row + self.free_rel  # (B,)
            idx = dest[:, None, None, None].expand(B, H_kv, 1, D)
            self.k.scatter_(2, idx, k.to(self.dtype))
            self.v.scatter_(2, idx, v.to(self.dtype))
            slots = torch.arange(S, device=self.device)
            mask = (occupied | (slots[None] == dest[:, None]))[:, None, None, :]  # (B, 1, 1, S)
            out = attend(q, self.k.to(q.dtype), self.v.to(q.dtype), mask, scaling=scaling)
            step = valid[:, 0].long()  # (B,) finished rows do not advance
            self.free_rel = (self.free_rel + step) % self.ring_size
        else:  # a multi-token chunk (the question): attend over kept + chunk, then insert
            kk = torch.cat([self.k.to(q.dtype), k], dim=2)  # (B, H_kv, S + T, D)
            vv = torch.cat([self.v.to(q.dtype), v], dim=2)
            t = torch.arange(T, device=self.device)
            rank = valid.long().cumsum(1) - 1  # (B, T)
            causal = (t[None, None, :] <= t[None, :, None]) & valid[:, None, :]  # (B, T, T)
            causal = causal | torch.eye(T, dtype=torch.bool, device=self.device)[None]  # padding sees itself
            mask = torch.cat([occupied[:, None, :].expand(B, T, S), causal], dim=2)[:, None]  # (B, 1, T, S + T)
            out = attend(q, kk, vv, mask, scaling=scaling)
            n_new = valid.long().sum(1)  # (B,)
            W = self.ring_size - 1  # (B,) window size
            new_free = (self.free_rel + n_new) % self.ring_size  # (B,)
            keep = valid & (rank >= (n_new - W)[:, None])  # (B, T): the last W new tokens survive
            rel = (self.free_rel[:, None] + rank) % self.ring_size[:, None]  # (B, T)
            rel = torch.where(keep, rel, new_free[:, None])  # dropped tokens land in the free slot
            dest = self.n_sink_row[:, None] + rel  # (B, T)
            idx = dest[:, None, :, None].expand(B, H_kv, T, D)
            self.k.scatter_(2, idx, k.to(self.dtype))
            self.v.scatter_(2, idx, v.to(self.dtype))
            self.free_rel = new_free
        self.seen = self.seen + valid.sum(1)
        return out

    def tokens_kept(self) -> Tensor:
        if not self.compacted:
            return super().tokens_kept()
        return self._occupied().sum(1)[:, None].expand(self.batch, self.layer.n_kv_heads)


class FusedStreamingStore(StreamingStore, FusedDenseStore):
    """:class:`StreamingStore` with the fused path of ``full``: prefill chunks through
    :class:`~methods.stores.FusedDenseStore` (the causal kernel while rows are unpadded), and decode steps through
    the dense flash-decoding kernel over each row's first ``n_sink + window + 1`` slots (the sinks and the ring, the
    new token written into the ring's free slot first). Decode changes device state in place and never syncs:
    ``graph_safe``. Multi-token chunks after compaction take the reference path."""

    kernel = "fused"
    graph_safe = True
    bookkeeping = (*StreamingStore.bookkeeping, "n_visible")

    def end_of_context(self) -> None:
        super().end_of_context()
        self.n_visible = self.n_sink_row + self.ring_size  # (B,) slots every decode step reads

    def extend(self, q: Tensor, k: Tensor, v: Tensor, *, positions: Tensor, valid: Tensor, scaling: float) -> Tensor:
        if not (self.compacted and k.shape[2] == 1):
            return super().extend(q, k, v, positions=positions, valid=valid, scaling=scaling)
        from methods.kernels.attention import decode_attention

        B, H_kv, _, D = k.shape
        dest = self.n_sink_row + self.free_rel  # (B,) the ring's free slot
        idx = dest[:, None, None, None].expand(B, H_kv, 1, D)
        self.k.scatter_(2, idx, k.to(self.dtype))
        self.v.scatter_(2, idx, v.to(self.dtype))
        out = decode_attention(q[:, :, 0], self.k, self.v, self.n_visible, scaling=scaling)  # (B, H_q, D)
        self.free_rel.copy_((self.free_rel + valid[:, 0].long()) % self.ring_size)  # finished rows do not advance
        self.seen.add_(valid.sum(1))
        return out[:, None]

    # -- CUDA-graph protocol (harness.engine captures the decode step of graph_safe stores) -------
    def graph_snapshot(self) -> tuple:
        return self.free_rel.clone(), self.seen.clone()

    def graph_restore(self, snap: tuple) -> None:
        free_rel, seen = snap
        self.free_rel.copy_(free_rel)
        self.seen.copy_(seen)

    def graph_advance(self, steps: int) -> None:
        """Nothing on the host: the compacted ring keeps no host bound."""
