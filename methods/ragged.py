"""The ragged eviction store: per (batch row, kv head) token counts may differ, and kept tokens are
physically compacted into one flat buffer with offsets.

Life of a store (one layer):

1. Prefill (before ``end_of_context``): a dense slot buffer exactly like :class:`DenseStore`; the
   method's observers record what its scorer needs (the last ``W`` queries of the context, the
   attention mass every key received, computed in chunks).
2. ``end_of_context``: the method plans which tokens each (row, kv head) keeps; the store packs
   them into flat buffers ``k, v (N, D)`` where segment ``s = b * H_kv + h`` occupies
   ``[offsets[s], offsets[s] + sizes[s])``: its kept tokens, then ``reserve`` free slots for the
   question and decode tokens (allocated once). The prefill buffer is dropped, so memory during
   decode is the kept tokens plus the reserve, per head.
3. Decode (T == 1): the new token goes to the segment's hole (the slot the last eviction freed) or
   to its high-water mark; attention is a segment softmax over the flat buffer (static shapes, no
   host sync). An evicting-in-decode method (H2O) then frees the lowest-score slot outside its
   protected sinks and recent window, on device.
4. Multi-token chunks after compaction (the question, a forked continuation, perplexity chunks)
   attend to a padded view of the kept tokens plus each other (causal), then the store repacks:
   kept + new tokens, evicted down to the method's budget if it evicts during decode.

Per-token metadata a method keeps (positions for recency and blocks, accumulated scores) lives in
flat buffers beside K and V and is counted in ``bytes_stored``. Segment ids are derived from the
offsets at each step, as a kernel walking segments would, and are not stored.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from methods.api import LayerSpec
from methods.selectors import attention_mass, keep_count_t
from methods.stores import DenseStore, attend, slot_destinations

if TYPE_CHECKING:  # pragma: no cover
    from methods.eviction import EvictionMethod

__all__ = ["EvictionStore", "segment_attend", "segment_ids"]

_BIG = 2**62


def segment_ids(offsets: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Segment of each of ``n`` flat slots and the slot's index inside it: offsets (BH,) -> (n,), (n,)."""
    slots = torch.arange(n, device=offsets.device)
    seg = torch.searchsorted(offsets, slots, right=True) - 1  # (N,)
    return seg, slots - offsets[seg]


def segment_attend(
    q: Tensor, k: Tensor, v: Tensor, seg: Tensor, sizes: Tensor, visible: Tensor, *, n_kv_heads: int, scaling: float
) -> tuple[Tensor, Tensor]:
    """Decode attention over a flat ragged buffer: one query per (row, query head).

    q (B, H_q, 1, D); k, v (N, D) flat, segment after segment; seg (N,) segment b * H_kv + h of each
    slot; sizes (BH,) slots per segment; visible (N,) bool. Every segment must see at least one slot. Returns the output (B, 1, H_q, D) in q's dtype
    and the attention probabilities (N, G) float32 (G query heads per kv head; 0 where invisible).
    Equals dense softmax attention over each segment's visible slots; temporaries are the size of K.
    """
    B, H_q, _, D = q.shape
    BH, G = B * n_kv_heads, H_q // n_kv_heads
    qg = q.reshape(BH, G, D).float()  # (BH, G, D): query heads of a group are consecutive
    kf, vf = k.float(), v.float()
    probs = torch.empty(k.shape[0], G, dtype=torch.float32, device=k.device)  # (N, G)
    out = torch.empty(BH, G, D, dtype=torch.float32, device=k.device)
    neg = torch.tensor(float("-inf"), device=k.device)
    for g in range(G):
        logits = (kf * qg[seg, g]).sum(-1) * scaling  # (N,)
        logits = torch.where(visible, logits, neg)
        m = torch.full((BH,), float("-inf"), device=k.device).scatter_reduce(0, seg, logits, "amax")  # (BH,)
        e = torch.exp(logits - m[seg])  # (N,) 0 where invisible
        den = torch.zeros(BH, device=k.device).index_add_(0, seg, e)  # (BH,)
        p = e / den[seg]
        probs[:, g] = p
        out[:, g] = torch.segment_reduce(p[:, None] * vf, "sum", lengths=sizes, axis=0)  # (BH, D)
    return out.reshape(B, n_kv_heads * G, D)[:, None].to(q.dtype), probs  # (B, 1, H_q, D)


class EvictionStore(DenseStore):
    """Dense slots during prefill; per-(row, kv head) ragged flat buffers after ``end_of_context``.

    ``method`` (an :class:`~methods.eviction.EvictionMethod`) decides what to observe, which tokens
    to keep, and whether to evict during decode; this class owns the layout and the attention.
    """

    # not counted in bytes_stored: offsets and counters, and the method object (hyperparameters; LKV's scorer
    # weights are model parameters, a fixed ~0.1 % of the model, not cache that grows with the tokens)
    bookkeeping = ("lengths", "seen", "offsets", "sizes", "hwm", "hole", "base_budget", "n_context", "n_recent",
                   "win_slot", "method")
    flat_fields = ("k", "v", "pos", "score")

    def __init__(self, layer: LayerSpec, method: EvictionMethod, *, batch: int, capacity: int, device: Any, dtype):
        super().__init__(layer, batch=batch, capacity=capacity, device=device, dtype=dtype)
        self.method = method
        self.packed = False
        self.scaling = layer.head_dim**-0.5  # the model's, once extend has seen it
        self.steps = 0  # decode steps since the last repack (host counter)
        W = int(method.observe_window())
        self.win_q = None if W == 0 else torch.zeros(batch, layer.n_q_heads, 0, layer.head_dim, dtype=dtype,
                                                     device=self.device)  # (B, H_q, w, D)
        self.win_slot = None if W == 0 else torch.zeros(batch, 0, dtype=torch.long, device=self.device)  # (B, w)
        self.mass = None
        if method.observe_mass():
            self.mass = torch.zeros(batch, layer.n_q_heads, self.capacity, dtype=torch.float32,
                                    device=self.device)  # (B, H_q, S) attention each key received
        self.pos = None  # (N,) int32 absolute positions, once packed (methods that need recency/blocks)
        self.score = None  # (N,) float32 decode-time score, once packed (methods that accumulate)

    # -- prefill --------------------------------------------------------------------------------
    def extend(self, q: Tensor, k: Tensor, v: Tensor, *, positions: Tensor, valid: Tensor, scaling: float) -> Tensor:
        if self.packed:
            if k.shape[2] == 1:
                return self._decode(q, k, v, positions=positions, valid=valid, scaling=scaling)
            return self._chunk(q, k, v, positions=positions, valid=valid, scaling=scaling)
        lengths = self.lengths
        self.scaling = scaling
        out = super().extend(q, k, v, positions=positions, valid=valid, scaling=scaling)
        dest = slot_destinations(lengths, valid)  # (B, T)
        if self.win_q is not None:
            self._observe_window(q, dest, valid)
        if self.mass is not None:
            S = self.hi
            slots = torch.arange(S, device=self.device)
            vis = (slots[None, None] <= dest[:, :, None]) & (slots[None, None] < self.lengths[:, None, None])
            vis = (vis & valid[:, :, None])[:, None]  # (B, 1, T, S): padding queries add nothing
            self.mass[:, :, :S] += attention_mass(q, self.k[:, :, :S], vis, scaling=scaling,
                                                  chunk=self.method.score_chunk)
        return out

    def _observe_window(self, q: Tensor, dest: Tensor, valid: Tensor) -> None:
        """Keep the last W valid queries of each row (and their slots)."""
        W = int(self.method.observe_window())
        qq = torch.cat([self.win_q, q.to(self.win_q.dtype)], dim=2)  # (B, H_q, w + T, D)
        ss = torch.cat([self.win_slot, torch.where(valid, dest, -1)], dim=1)  # (B, w + T)
        has = ss >= 0
        n_new = int(has.sum(1).clamp(max=W).max())
        # the last n_new valid entries of each row, in order (rows with fewer keep what they have)
        rank_from_end = has.long().flip(1).cumsum(1).flip(1)  # (B, w + T): 1 for the last valid
        take = has & (rank_from_end <= n_new)
        idx = torch.where(take, rank_from_end, 0)
        col = (n_new - idx).clamp(min=0)  # target column of each taken entry
        B, H_q, _, D = qq.shape
        new_q = torch.zeros(B, H_q, n_new + 1, D, dtype=qq.dtype, device=qq.device)
        new_s = torch.full((B, n_new + 1), -1, dtype=torch.long, device=qq.device)
        col = torch.where(take, col, n_new)  # untaken entries go to a trash column
        new_q.scatter_(2, col[:, None, :, None].expand(B, H_q, -1, D), qq)
        new_s.scatter_(1, col, torch.where(take, ss, -1))
        self.win_q, self.win_slot = new_q[:, :, :n_new], new_s[:, :n_new]

    # -- compaction -----------------------------------------------------------------------------
    def end_of_context(self) -> None:
        if self.packed:
            return
        n = self.lengths.clone()  # (B,)
        S = self.hi
        keep, budget = self.method.plan(self, n)  # (B, H_kv, S) bool, (B, H_kv) int64
        extras = {}
        if self.method.keeps_positions:
            extras["pos"] = torch.arange(S, device=self.device, dtype=torch.int32).expand(*keep.shape)
        if self.method.keeps_scores:
            extras["score"] = self.method.carried_scores(self, n).float()  # (B, H_kv, S)
        self.n_context = n
        self.base_budget = budget.to(self.device).reshape(-1)  # (BH,)
        self.n_recent = self.method.recent_window(budget).to(self.device).reshape(-1)  # (BH,)
        k, v = self.k[:, :, :S], self.v[:, :, :S]
        self.win_q = self.win_slot = self.mass = None  # observers are done: free them
        self._pack(k, v, keep, extras)
        self.packed = True

    def _pack(self, k: Tensor, v: Tensor, keep: Tensor, extras: dict[str, Tensor]) -> None:
        """Compact the tokens ``keep`` marks into fresh flat buffers with the decode reserve.

        k, v (B, H_kv, S, D); keep (B, H_kv, S) bool; extras name -> (B, H_kv, S) per-token values.
        """
        B, H, S, D = k.shape
        reserve = self.capacity - self.hi
        counts = keep.reshape(B * H, S).sum(1)  # (BH,)
        sizes = counts + reserve
        offsets = torch.cumsum(sizes, 0) - sizes  # (BH,)
        N = int(sizes.sum())  # host sync: once per repack
        src = keep.reshape(-1).nonzero().squeeze(1)  # (M,) flat (b, h, s) indices in segment order
        seg = torch.div(src, S, rounding_mode="floor")
        first = torch.cumsum(counts, 0) - counts  # (BH,) rank of each segment's first kept token
        dest = offsets[seg] + torch.arange(src.numel(), device=src.device) - first[seg]  # (M,)
        self.k = torch.zeros(N, D, dtype=self.dtype, device=self.device)  # (N, D)
        self.v = torch.zeros(N, D, dtype=self.dtype, device=self.device)
        self.k[dest] = k.reshape(-1, D)[src].to(self.dtype)
        self.v[dest] = v.reshape(-1, D)[src].to(self.dtype)
        for name in ("pos", "score"):
            if name in extras:
                buf = torch.zeros(N, dtype=extras[name].dtype, device=self.device)  # (N,)
                buf[dest] = extras[name].reshape(-1)[src]
                setattr(self, name, buf)
        self.offsets, self.sizes = offsets, sizes
        self.hwm = counts.clone()  # (BH,) slots used so far in each segment
        self.hole = torch.full_like(counts, -1)  # (BH,) a freed slot the next token takes (-1: none)
        self.steps = 0

    def _occupied(self) -> tuple[Tensor, Tensor, Tensor]:
        """(N,) bool slots holding kept tokens, with each slot's segment and index inside it."""
        seg, rel = segment_ids(self.offsets, self.k.shape[0])
        return (rel < self.hwm[seg]) & (rel != self.hole[seg]), seg, rel

    def _padded(self) -> tuple[Tensor, Tensor]:
        """A padded view of the kept tokens: flat index (B, H_kv, S_max) and presence mask."""
        occ, seg, _ = self._occupied()
        BH = self.offsets.shape[0]
        rank = occ.long().cumsum(0)  # (N,) kept tokens up to and including each slot
        counts = torch.zeros(BH, dtype=torch.long, device=seg.device).index_add_(0, seg, occ.long())  # (BH,)
        first = torch.cumsum(counts, 0) - counts
        S_max = max(1, int(counts.max()))
        idx = torch.zeros(BH, S_max, dtype=torch.long, device=seg.device)
        sel = occ.nonzero().squeeze(1)
        idx[seg[sel], rank[sel] - 1 - first[seg[sel]]] = sel
        present = torch.arange(S_max, device=seg.device)[None] < counts[:, None]
        B, H = self.batch, self.layer.n_kv_heads
        return idx.view(B, H, S_max), present.view(B, H, S_max)

    # -- after compaction -----------------------------------------------------------------------
    def _budget_now(self, seen: Tensor) -> Tensor:
        """(BH,) tokens each segment may hold once a row has seen ``seen`` (B,) tokens: its context
        budget plus the budget function's share of the tokens since."""
        r = float(self.method.ratio)
        grow = keep_count_t(seen, r) - keep_count_t(self.n_context, r)  # (B,)
        return self.base_budget + grow.repeat_interleave(self.layer.n_kv_heads)

    def _decode(self, q: Tensor, k: Tensor, v: Tensor, *, positions: Tensor, valid: Tensor, scaling: float) -> Tensor:
        B, H, _, D = k.shape
        if self.hi + 1 > self.capacity:
            raise RuntimeError(f"KV store capacity {self.capacity} exceeded; the engine sizes capacity as context + "
                               "question + max_new_tokens")
        rel_dest = torch.where(self.hole >= 0, self.hole, self.hwm)  # (BH,)
        dest = self.offsets + rel_dest  # (BH,)
        self.k[dest] = k.reshape(B * H, D).to(self.dtype)
        self.v[dest] = v.reshape(B * H, D).to(self.dtype)
        occ, seg, rel = self._occupied()
        visible = occ | (rel == rel_dest[seg])  # (N,)
        out, probs = segment_attend(q, self.k, self.v, seg, self.sizes, visible, n_kv_heads=H, scaling=scaling)
        ok = valid[:, 0].repeat_interleave(H)  # (BH,) rows still generating
        pos_now = positions[:, 0].repeat_interleave(H)  # (BH,)
        if self.pos is not None:
            self.pos[dest] = pos_now.to(self.pos.dtype)
        if self.score is not None:
            self.score[dest] = self.method.write_scores(self, k, v, positions).reshape(B * H).float()
            if self.method.accumulates_attention:
                gained = self.method.reduce_probs(probs)  # (N,)
                self.score += torch.where(visible & ok[seg], gained, 0.0)
        self.hwm = self.hwm + ((self.hole < 0) & ok)
        self.hole = torch.where(ok, -1, self.hole)
        self.seen = self.seen + valid.sum(1)
        self.hi += 1
        self.steps += 1
        if self.method.evicts_in_decode:
            self._evict_one(ok, seg, rel, pos_now)
        elif self.method.rescore_period() and self.steps % self.method.rescore_period() == 0:
            self._repack_chunk(None, scaling=scaling)
        return out

    def _evict_one(self, ok: Tensor, seg: Tensor, rel: Tensor, pos_now: Tensor) -> None:
        """Free each over-budget segment's lowest-score slot outside its sinks and recent window
        (on device, static shapes)."""
        occ = (rel < self.hwm[seg]) & (rel != self.hole[seg])  # (N,)
        n_occ = self.hwm - (self.hole >= 0).long()  # (BH,)
        over = ok & (n_occ > self._budget_now(self.seen))  # (BH,)
        cand = occ & (self.pos.long() <= (pos_now - self.n_recent)[seg]) & (self.pos.long() >= int(self.method.n_sink))
        key = torch.where(cand, self.score, torch.tensor(float("inf"), device=self.score.device))
        BH = self.hwm.shape[0]
        low = torch.full((BH,), float("inf"), device=key.device).scatter_reduce(0, seg, key, "amin")  # (BH,)
        at_low = cand & (key == low[seg])
        first = torch.full((BH,), _BIG, dtype=torch.long, device=key.device).scatter_reduce(
            0, seg, torch.where(at_low, rel, _BIG), "amin")  # (BH,) earliest slot with the lowest score
        self.hole = torch.where(over & (first < _BIG), first, self.hole)

    def _chunk(self, q: Tensor, k: Tensor, v: Tensor, *, positions: Tensor, valid: Tensor, scaling: float) -> Tensor:
        """T > 1 new tokens after compaction: attend over the kept tokens + the chunk (causal)."""
        return self._repack_chunk((q, k, v, positions, valid), scaling=scaling)

    def _repack_chunk(self, new: tuple | None, *, scaling: float) -> Tensor | None:
        """Rebuild the flat buffers from the kept tokens plus ``new`` = (q, k, v, positions, valid)
        (or none: a decode-time re-scoring), evicted down to the budget if the method evicts after
        compaction; returns the new tokens' attention output."""
        B, H = self.batch, self.layer.n_kv_heads
        idx, present = self._padded()  # (B, H, S_p)
        kk, vv = self.k[idx], self.v[idx]  # (B, H, S_p, D)
        pos = self.pos[idx].long() if self.pos is not None else None
        score = self.score[idx] if self.score is not None else None
        out = None
        if new is not None:
            q, k, v, positions, valid = new
            T = k.shape[2]
            if self.hi + T > self.capacity:
                raise RuntimeError(f"KV store capacity {self.capacity} exceeded ({self.hi} slots used + {T} new)")
            t = torch.arange(T, device=self.device)
            causal = (t[None, None, :] <= t[None, :, None]) & valid[:, None, :]  # (B, T, T)
            causal = causal | torch.eye(T, dtype=torch.bool, device=self.device)[None]  # padding sees itself
            mask = torch.cat([present[:, :, None].expand(B, H, T, -1), causal[:, None].expand(B, H, T, T)], dim=3)
            kc = torch.cat([kk.to(q.dtype), k], dim=2)  # (B, H, S_p + T, D)
            vc = torch.cat([vv.to(q.dtype), v], dim=2)
            out = attend(q, kc, vc, mask, scaling=scaling)  # (B, T, H_q, D)
            kk, vv = kc, vc
            present = torch.cat([present, valid[:, None].expand(B, H, T)], dim=2)
            if pos is not None:
                pos = torch.cat([pos, positions[:, None].expand(B, H, T)], dim=2)
            if score is not None:
                score = torch.cat([score, self.method.write_scores(self, k, v, positions).float()], dim=2)
                if self.method.accumulates_attention:
                    vis = mask & valid[:, None, :, None]  # (B, H, T, S_p + T): padding queries add nothing
                    score = score + self.method.reduce_mass(attention_mass(q, kc, vis, scaling=scaling,
                                                                           chunk=self.method.score_chunk), H)
            self.seen = self.seen + valid.sum(1)
            self.hi += T
        keep = present
        if self.method.evicts_after_compaction:
            keep = self.method.reselect(self, kk, vv, present, pos, score,
                                        self._budget_now(self.seen).view(B, H))
        extras = {}
        if pos is not None:
            extras["pos"] = pos.to(torch.int32)
        if score is not None:
            extras["score"] = torch.zeros_like(score) if self.method.rescore_period() else score
        self._pack(kk, vv, keep, extras)
        return out

    def tokens_kept(self) -> Tensor:
        if not self.packed:
            return super().tokens_kept()
        return (self.hwm - (self.hole >= 0).long()).view(self.batch, self.layer.n_kv_heads)

    def _stored_bytes(self, root: str, t: Tensor, elem: int, kept: Tensor) -> int | None:
        if not self.packed:
            return super()._stored_bytes(root, t, elem, kept)
        if root in self.flat_fields:  # (N, ...) flat: kept tokens count, free reserve slots do not
            return int(kept.sum()) * (t.numel() // max(1, t.shape[0])) * elem
        return None
