"""The ragged eviction store and the eviction contract: per (batch row, kv head) token counts may differ, and kept
tokens are physically compacted into one flat buffer with offsets.

The contract (what a store and an eviction method say to each other, all of it; DEVELOPERS.md lists it too):

- ``method.policy(layer) -> EvictionPolicy``, once per store: what to observe during prefill (the last ``W``
  queries' attention, the attention mass every key receives), what to keep per token (positions, scores), what
  happens after compaction (decode-time eviction, re-scoring), the GQA reduction and the budget function. The
  store reads these fields, never the method's knobs.
- ``method.plan(ScoreInput) -> Selection``, at ``end_of_context``: the scorer sees keys, values, positions, the
  observed attention statistics and the layer, and returns which tokens each (row, kv head) keeps, the budgets,
  the protected recent window and (for methods that keep scores) the per-token scores decode starts with.
- ``method.write_scores(layer, k, v, positions)``: the score a token gets when written after compaction (LKV's
  query-agnostic scorer; zeros for the others). Called inside the decode step: it must stay on the device.
- ``method.reselect(RescoreInput) -> keep``: re-selection of kept + new tokens down to a budget (multi-token
  chunks of methods that evict after compaction, and the periodic re-scoring of ``value_aware``).

Life of a store (one layer):

1. Prefill (before ``end_of_context``): a dense slot buffer exactly like :class:`DenseStore`; the store records
   what the policy asks to observe (the last ``W`` queries of the context, the attention mass every key receives).
2. ``end_of_context``: the store computes the observed statistics (the window's attention), asks the method for
   its plan, and packs the kept tokens into flat buffers ``k, v (N, D)`` where segment ``s = b * H_kv + h``
   occupies ``[offsets[s], offsets[s] + sizes[s])``: its kept tokens, then ``reserve`` free slots for the question
   and decode tokens (allocated once), in one device pass. The prefill buffer is dropped, so memory during decode
   is the kept tokens plus the reserve, per head.
3. Decode (T == 1): the new token goes to the segment's hole (the slot the last eviction freed) or to its
   high-water mark, so the visible slots are always a prefix of the segment; attention over each segment's prefix
   (static shapes, no host sync). Methods that keep scores update them on the device; an evicting-in-decode
   method (H2O) then frees the lowest-score slot outside its protected sinks and recent window, on device.
4. Multi-token chunks after compaction (the question, a forked continuation, perplexity chunks) attend to a padded
   view of the kept tokens plus each other (causal), then the store repacks: kept + new tokens, evicted down to the
   method's budget if it evicts after compaction.

Two implementations share all of this: :class:`EvictionStore` (plain torch, the reference) and
:class:`FusedEvictionStore` (``kernel = "fused"``: Triton kernels for chunked prefill with the attention mass,
blockwise window scoring, and the ragged decode attention of :mod:`methods.kernels.ragged_attention`; its decode
step is captured in a CUDA graph). Per-token metadata a method keeps (positions, accumulated scores) lives in flat
buffers beside K and V and is counted in ``bytes_stored``. Segment ids are derived from the offsets when needed and
are not stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from methods.api import LayerSpec
from methods.kernels.ragged_attention import (
    BIG,
    ragged_append_reference,
    ragged_update_reference,
    segment_attend,
    segment_ids,
)
from methods.selectors import (
    GROUP_REDUCE,
    attention_mass,
    group_reduce,
    keep_count_t,
    ratio_fraction,
    window_attention,
)
from methods.stores import DenseStore, FusedDenseStore, attend, slot_destinations

__all__ = ["EvictionPolicy", "ScoreInput", "Selection", "RescoreInput", "Evictor", "EvictionStore",
           "FusedEvictionStore", "segment_attend", "segment_ids"]


# -- the contract ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvictionPolicy:
    """What a store needs to know about its method, fixed for the store's life.

    ``ratio`` sets the family's budget function :meth:`keep` (:func:`methods.selectors.keep_count_t`: a row keeps
    round-half-up of n x (1 - ratio) of n tokens); decode-time budgets grow by ``keep(seen) - keep(n_context)``."""

    ratio: float
    observe_window: int = 0  # the context's last W queries whose attention the scorer sees (0 = none)
    observe_mass: bool = False  # the attention every key receives from all context queries
    group_reduce: str = "mean"  # how a GQA group's query heads combine decode-time attention (mean | max | sum)
    n_sink: int = 0  # the first tokens decode-time eviction never frees
    keeps_positions: bool = False  # each kept token's absolute position (recency, blocks)
    keeps_scores: bool = False  # a per-token float32 score carried through decode
    accumulates_attention: bool = False  # kept scores grow with the attention each later query pays (H2O)
    evicts_in_decode: bool = False  # free the lowest-score token when over budget, at every decode step
    evicts_after_compaction: bool = False  # multi-token chunks and re-scorings re-select down to the budget
    rescore_every: int = 0  # decode steps between re-selections of the kept tokens (0 = never)
    scores_written: bool = False  # write_scores gives new tokens their own score (LKV); else they start at 0

    def __post_init__(self) -> None:
        if self.group_reduce not in GROUP_REDUCE:
            raise ValueError(f"unknown group_reduce {self.group_reduce!r}; use one of {GROUP_REDUCE}")
        if self.evicts_in_decode and not (self.keeps_scores and self.keeps_positions):
            raise ValueError("evicting during decode needs per-token scores and positions (keeps_scores, "
                             "keeps_positions)")
        ratio_fraction(self.ratio)  # a ratio in [0, 1), or a clear error

    def keep(self, n: Tensor) -> Tensor:
        """The budget function: tokens a row keeps of ``n`` (B,) int64 -> (B,) int64, on the device."""
        return keep_count_t(n, float(self.ratio))


@dataclass(frozen=True)
class ScoreInput:
    """What a scorer sees at ``end_of_context`` (one layer; S = prefill slots, slot = position)."""

    keys: Tensor  # (B, H_kv, S, D) post-RoPE, as stored
    values: Tensor  # (B, H_kv, S, D)
    n: Tensor  # (B,) int64 tokens per row; slots >= n[b] are empty
    positions: Tensor  # (B, S) int64 absolute position of each slot
    layer: LayerSpec
    window_attn: Tensor | None  # (B, H_q, S) float32: the observation window's softmax weights, averaged over it
    mass: Tensor | None  # (B, H_q, S) float32: attention each key received from every context query

    @property
    def empty(self) -> Tensor:
        """(B, 1, S) bool: slots that hold no token."""
        return torch.arange(self.keys.shape[2], device=self.n.device)[None, None] >= self.n[:, None, None]


@dataclass(frozen=True)
class Selection:
    """A method's plan for one layer: which tokens each (row, kv head) keeps, and what decode needs."""

    keep: Tensor  # (B, H_kv, S) bool
    budget: Tensor  # (B, H_kv) int64 tokens kept (the decode-time budget starts here)
    recent: Tensor  # (B, H_kv) int64 most recent tokens decode-time eviction protects
    scores: Tensor | None = None  # (B, H_kv, S) float32 per-token scores carried into decode (keeps_scores)


@dataclass(frozen=True)
class RescoreInput:
    """Kept + new tokens of one layer, padded per (row, kv head), for a re-selection down to ``budget``."""

    keys: Tensor  # (B, H_kv, S, D)
    values: Tensor  # (B, H_kv, S, D)
    present: Tensor  # (B, H_kv, S) bool
    positions: Tensor | None  # (B, H_kv, S) int64 (keeps_positions)
    scores: Tensor | None  # (B, H_kv, S) float32 (keeps_scores)
    budget: Tensor  # (B, H_kv) int64
    layer: LayerSpec


class Evictor(Protocol):
    """The four hooks an eviction method gives its store (see the module docstring)."""

    def policy(self, layer: LayerSpec) -> EvictionPolicy: ...

    def plan(self, inp: ScoreInput) -> Selection: ...

    def write_scores(self, layer: LayerSpec, k: Tensor, v: Tensor, positions: Tensor) -> Tensor: ...

    def reselect(self, inp: RescoreInput) -> Tensor: ...


# -- the reference store --------------------------------------------------------------------------
class EvictionStore(DenseStore):
    """Dense slots during prefill; per-(row, kv head) ragged flat buffers after ``end_of_context``.

    ``method`` (an :class:`Evictor`) decides which tokens to keep; this class owns the layout, the observations and
    the attention. Plain torch throughout (the reference of :class:`FusedEvictionStore`)."""

    # not counted in bytes_stored: offsets and counters, the method object (hyperparameters; LKV's scorer
    # weights are model parameters, a fixed ~0.1 % of the model, not cache that grows with the tokens) and
    # per-step scratch of the fused kernels
    bookkeeping = ("lengths", "seen", "offsets", "sizes", "hwm", "hole", "base_budget", "n_context", "n_recent",
                   "win_slot", "method", "policy", "scratch")
    flat_fields = ("k", "v", "pos", "score")
    score_chunk = 256  # queries per attention-weight chunk of the reference mass (memory only; no effect on results)

    def __init__(self, layer: LayerSpec, method: Evictor, *, batch: int, capacity: int, device: Any, dtype):
        super().__init__(layer, batch=batch, capacity=capacity, device=device, dtype=dtype)
        self.method = method
        self.policy = method.policy(layer)
        self.packed = False
        self.scaling = layer.head_dim**-0.5  # the model's, once extend has seen it
        self.steps = 0  # decode steps since the last repack (host counter)
        W = int(self.policy.observe_window)
        self.win_q = None if W == 0 else torch.zeros(batch, layer.n_q_heads, 0, layer.head_dim, dtype=dtype,
                                                     device=self.device)  # (B, H_q, w, D)
        self.win_slot = None if W == 0 else torch.zeros(batch, 0, dtype=torch.long, device=self.device)  # (B, w)
        self.mass = None
        if self.policy.observe_mass:
            self.mass = torch.zeros(batch, layer.n_q_heads, self.capacity, dtype=torch.float32,
                                    device=self.device)  # (B, H_q, S) attention each key received
        self.pos = None  # (N,) int32 absolute positions, once packed (methods that need recency/blocks)
        self.score = None  # (N,) float32 decode-time score, once packed (methods that keep scores)
        self.scratch: dict[str, Tensor] = {}  # per-step work buffers of the fused decode (not KV)

    # -- prefill --------------------------------------------------------------------------------
    def extend(self, q: Tensor, k: Tensor, v: Tensor, *, positions: Tensor, valid: Tensor, scaling: float) -> Tensor:
        if self.packed:
            if k.shape[2] == 1:
                return self._decode(q, k, v, positions=positions, valid=valid, scaling=scaling)
            return self._repack_chunk((q, k, v, positions, valid), scaling=scaling)
        lengths = self.lengths.clone()  # (B,) before this chunk (the dense path may update in place)
        self.scaling = scaling
        out = self._prefill(q, k, v, positions=positions, valid=valid, scaling=scaling)
        if self.win_q is not None:
            self._observe_window(q, slot_destinations(lengths, valid), valid)
        return out

    def _prefill(self, q: Tensor, k: Tensor, v: Tensor, *, positions: Tensor, valid: Tensor, scaling: float) -> Tensor:
        """Attention of a context chunk over the dense slots, and the attention mass it pays (policy)."""
        lengths = self.lengths
        out = DenseStore.extend(self, q, k, v, positions=positions, valid=valid, scaling=scaling)
        if self.mass is not None:
            S = self.hi
            dest = slot_destinations(lengths, valid)  # (B, T)
            slots = torch.arange(S, device=self.device)
            vis = (slots[None, None] <= dest[:, :, None]) & (slots[None, None] < self.lengths[:, None, None])
            vis = (vis & valid[:, :, None])[:, None]  # (B, 1, T, S): padding queries add nothing
            self.mass[:, :, :S] += attention_mass(q, self.k[:, :, :S], vis, scaling=scaling, chunk=self.score_chunk)
        return out

    def _observe_window(self, q: Tensor, dest: Tensor, valid: Tensor) -> None:
        """Keep the last W valid queries of each row (and their slots)."""
        W = int(self.policy.observe_window)
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

    def _window_attention(self, k: Tensor, n: Tensor) -> Tensor:
        """(B, H_q, S) the observation window's attention over the prefill keys k (B, H_kv, S, D)."""
        return window_attention(self.win_q, self.win_slot, k, n, scaling=self.scaling)

    def _chunk_mass(self, q: Tensor, k: Tensor, vis: Tensor) -> Tensor:
        """(B, H_q, S) attention mass a multi-token chunk pays keys k (B, H_kv, S, D); vis (B, H_kv, T, S)."""
        return attention_mass(q, k, vis, scaling=self.scaling, chunk=self.score_chunk)

    # -- compaction -----------------------------------------------------------------------------
    def score_input(self) -> ScoreInput:
        """What the method's scorer sees now (before ``end_of_context``)."""
        S = self.hi
        n = self.lengths.clone()  # (B,)
        k, v = self.k[:, :, :S], self.v[:, :, :S]
        return ScoreInput(
            keys=k, values=v, n=n,
            positions=torch.arange(S, device=self.device)[None].expand(self.batch, S),
            layer=self.layer,
            window_attn=None if self.win_q is None else self._window_attention(k, n),
            mass=None if self.mass is None else self.mass[:, :, :S],
        )

    def end_of_context(self) -> None:
        if self.packed:
            return
        inp = self.score_input()
        sel = self.method.plan(inp)
        S = self.hi
        extras = {}
        if self.policy.keeps_positions:
            extras["pos"] = inp.positions[:, None].expand(*sel.keep.shape).to(torch.int32)  # (B, H_kv, S)
        if self.policy.keeps_scores:
            if sel.scores is None:
                raise ValueError(f"{type(self.method).__name__} keeps scores but its plan carries none")
            extras["score"] = sel.scores.float()  # (B, H_kv, S)
        self.n_context = inp.n
        self.base_budget = sel.budget.to(self.device).reshape(-1)  # (BH,)
        self.n_recent = sel.recent.to(self.device).reshape(-1)  # (BH,)
        del inp
        self.win_q = self.win_slot = self.mass = None  # observers are done: free them
        keep = torch.zeros(*sel.keep.shape[:2], self.k.shape[2], dtype=torch.bool, device=self.device)
        keep[:, :, :S] = sel.keep
        extras = {name: torch.nn.functional.pad(x, (0, self.k.shape[2] - S)) for name, x in extras.items()}
        self._pack(self.k, self.v, keep, extras)  # the whole dense buffer: a contiguous view, no copy
        self.packed = True

    def _pack(self, k: Tensor, v: Tensor, keep: Tensor, extras: dict[str, Tensor]) -> None:
        """Compact the tokens ``keep`` marks into fresh flat buffers with the decode reserve, in one device pass
        (every slot is copied to its destination, the dropped ones to a trash row past the end).

        k, v (B, H_kv, S, D); keep (B, H_kv, S) bool; extras name -> (B, H_kv, S) per-token values."""
        B, H, S, D = k.shape
        reserve = self.capacity - self.hi
        keep2 = keep.reshape(B * H, S)
        counts = keep2.sum(1)  # (BH,)
        sizes = counts + reserve
        offsets = torch.cumsum(sizes, 0) - sizes  # (BH,)
        N, max_size = (int(x) for x in torch.stack([sizes.sum(), sizes.max()]).tolist())  # host sync: once per pack
        dest = torch.where(keep2, offsets[:, None] + keep2.long().cumsum(1) - 1, N).reshape(-1)  # (BH S,) N = trash

        def flat(x: Tensor, width: int | None) -> Tensor:
            shape = (N + 1,) if width is None else (N + 1, width)
            buf = torch.zeros(shape, dtype=x.dtype if width is None else self.dtype, device=self.device)
            src = x.reshape(-1) if width is None else x.reshape(-1, width)
            return buf.index_copy_(0, dest, src.to(buf.dtype))[:N]

        self.k, self.v = flat(k, D), flat(v, D)  # (N, D)
        for name in ("pos", "score"):
            if name in extras:
                setattr(self, name, flat(extras[name], None))  # (N,)
        self.offsets, self.sizes = offsets, sizes
        self.hwm = counts.clone()  # (BH,) slots used so far in each segment
        self.hole = torch.full_like(counts, -1)  # (BH,) a freed slot the next token takes (-1: none)
        self.steps = 0
        self._packed(N, max_size)

    def _packed(self, n_slots: int, max_size: int) -> None:
        """Hook after each pack (the fused store sizes its decode grid and scratch here)."""

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
        grow = self.policy.keep(seen) - self.policy.keep(self.n_context)  # (B,)
        return self.base_budget + grow[:, None].expand(-1, self.layer.n_kv_heads).reshape(-1)

    def _decode(self, q: Tensor, k: Tensor, v: Tensor, *, positions: Tensor, valid: Tensor, scaling: float) -> Tensor:
        """One token per row: written to its segment's hole or high-water mark, attended (the segment's visible
        prefix), scores updated, one eviction per over-budget segment. Device state changes in place (a CUDA
        graph holds these tensors); no host sync."""
        B, H, _, D = k.shape
        if self.hi + 1 > self.capacity:
            raise RuntimeError(f"KV store capacity {self.capacity} exceeded; the engine sizes capacity as context + "
                               "question + max_new_tokens")
        P = self.policy
        score_new = None
        if self.score is not None and P.scores_written:  # the new token's own score (LKV's scorer); else 0
            score_new = self.method.write_scores(self.layer, k, v, positions).reshape(B * H)
        n_vis, pos_limit = self._append(k, v, positions, valid, score_new)  # (BH,) visible prefix, eviction limit
        out, found = self._attend_decode(q, n_vis, valid, pos_limit, scaling)
        self.hi += 1
        self.steps += 1
        if P.evicts_in_decode:
            self._evict(found, valid)
        elif P.rescore_every and self.steps % P.rescore_every == 0:
            self._repack_chunk(None, scaling=scaling)
        return out

    def _evict(self, found: Any, valid: Tensor) -> None:
        """Free each over-budget segment's first lowest-score candidate (``found``: what :meth:`_attend_decode`
        returned; here (BH,) slots, ``BIG`` where none) in rows still generating (``valid`` (B, 1))."""
        ok = valid[:, :1].expand(-1, self.layer.n_kv_heads).reshape(-1)  # (BH,)
        over = ok & (self.hwm - (self.hole >= 0).long() > self._budget_now(self.seen))  # (BH,)
        self.hole.copy_(torch.where(over & (found < BIG), found, self.hole))

    def _append(self, k: Tensor, v: Tensor, positions: Tensor, valid: Tensor,
                score_new: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Write the decode token and advance the counters (:func:`~methods.kernels.ragged_attention.ragged_append_reference`)."""
        return ragged_append_reference(k, v, self.k, self.v, self.offsets, self.hwm, self.hole, valid, self.seen,
                                       positions, pos=self.pos, score=self.score, score_new=score_new,
                                       n_recent=self.n_recent if self.policy.evicts_in_decode else None)

    def _attend_decode(self, q: Tensor, n_vis: Tensor, valid: Tensor, pos_limit: Tensor | None,
                       scaling: float) -> tuple[Tensor, Tensor | None]:
        """Attention of the decode queries over each segment's first ``n_vis`` slots -> (B, 1, H_q, D), and the
        score pass: accumulated attention in rows still generating (``valid`` (B, 1)) and, with ``pos_limit``,
        each segment's eviction candidate."""
        ok = valid[:, :1].expand(-1, self.layer.n_kv_heads).reshape(-1)  # (BH,)
        seg, rel = segment_ids(self.offsets, self.k.shape[0])
        visible = rel < n_vis[seg]  # (N,)
        out, probs = segment_attend(q, self.k, self.v, seg, self.sizes, visible, n_kv_heads=self.layer.n_kv_heads,
                                    scaling=scaling)
        accum = self.score is not None and self.policy.accumulates_attention
        first = ragged_update_reference(self.score, self.pos, seg, rel, visible, ok, probs=probs if accum else None,
                                        reduce=self.policy.group_reduce, pos_limit=pos_limit, n_sink=self.policy.n_sink)
        return out, first

    def _repack_chunk(self, new: tuple | None, *, scaling: float) -> Tensor | None:
        """Rebuild the flat buffers from the kept tokens plus ``new`` = (q, k, v, positions, valid)
        (or none: a decode-time re-scoring), evicted down to the budget if the method evicts after
        compaction; returns the new tokens' attention output."""
        B, H = self.batch, self.layer.n_kv_heads
        P = self.policy
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
                new_score = (self.method.write_scores(self.layer, k, v, positions).float() if P.scores_written
                             else torch.zeros(k.shape[:3], device=k.device))  # (B, H, T)
                score = torch.cat([score, new_score], dim=2)
                if P.accumulates_attention:
                    vis = mask & valid[:, None, :, None]  # (B, H, T, S_p + T): padding queries add nothing
                    score = score + group_reduce(self._chunk_mass(q, kc, vis), H, P.group_reduce)
            self.seen = self.seen + valid.sum(1)
            self.hi += T
        keep = present
        if P.evicts_after_compaction:
            keep = self.method.reselect(RescoreInput(keys=kk, values=vv, present=present, positions=pos, scores=score,
                                                     budget=self._budget_now(self.seen).view(B, H), layer=self.layer))
        extras = {}
        if pos is not None:
            extras["pos"] = pos.to(torch.int32)
        if score is not None:
            extras["score"] = torch.zeros_like(score) if P.rescore_every else score
        self._pack(kk.contiguous(), vv.contiguous(), keep, extras)
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


# -- the fused store ------------------------------------------------------------------------------
class FusedEvictionStore(EvictionStore):
    """:class:`EvictionStore` with the fused fast path (DESIGN §7; issue 21): same layout, same selections, same
    numbers up to float rounding; the kernels differ (``kernel = "fused"``).

    - Prefill chunks while every row has had only valid tokens (the throughput probe; one prompt): K/V are copied
      into slots ``hi .. hi+T-1`` and the causal kernel of :func:`methods.kernels.attention.prefill_attention`
      attends, as for ``full``; methods that observe the attention mass run
      :func:`methods.kernels.scoring.prefill_attention_lse` (output + each query's lse, one kernel) and
      :func:`~methods.kernels.scoring.accumulate_mass` (key tiles, no (T, S) matrix). Padded batches take the
      reference attention with the blockwise mass (:func:`~methods.kernels.scoring.attention_mass_blockwise`).
    - ``end_of_context``: the window's attention blockwise (:func:`~methods.kernels.scoring.window_attention_blockwise`),
      then the same plan and one-pass compaction. Peak memory stays the dense cache plus one layer's temporaries.
    - Decode: :func:`methods.kernels.ragged_attention.ragged_decode` over each segment's visible prefix (one read of
      each kv head's kept tokens for its query group), then :func:`~methods.kernels.ragged_attention.ragged_update`
      for methods that keep scores or evict (H2O's accumulated attention from the probabilities the kernel
      computed, the eviction arg-min), all on the device. ``graph_safe`` unless the method re-scores periodically
      (``value_aware`` with decode-query support repacks on the host every ``rescore_every`` steps: eager).
    """

    kernel = "fused"

    def __init__(self, layer: LayerSpec, method: Evictor, *, batch: int, capacity: int, device: Any, dtype):
        super().__init__(layer, method, batch=batch, capacity=capacity, device=device, dtype=dtype)
        self.uniform = True  # host: every row holds exactly `hi` valid slots (no padding)
        self.grid = (1, 1)  # (ranges per segment, slots per range) of the decode kernels, set at each pack

    @property
    def graph_safe(self) -> bool:  # type: ignore[override]
        return self.policy.rescore_every == 0

    @staticmethod
    def supports(layer: LayerSpec) -> str | None:
        """Why the fused kernels cannot serve this layer, or None."""
        return FusedDenseStore.supports(layer)

    def _prefill(self, q: Tensor, k: Tensor, v: Tensor, *, positions: Tensor, valid: Tensor, scaling: float) -> Tensor:
        from methods.kernels.attention import prefill_attention
        from methods.kernels.scoring import (
            accumulate_mass,
            attention_mass_blockwise,
            prefill_attention_lse,
            slot_visibility,
        )

        T = k.shape[2]
        self._check_capacity(T)
        if self.uniform and bool(valid.all()):  # one host sync per prefill chunk
            s = self.hi
            self.k[:, :, s : s + T].copy_(k)
            self.v[:, :, s : s + T].copy_(v)
            if self.mass is None:
                out = prefill_attention(q, self.k, self.v, start=s, scaling=scaling)  # (B, T, H_q, D)
            else:
                out, lse = prefill_attention_lse(q, self.k, self.v, start=s, scaling=scaling)
                accumulate_mass(q, self.k, lse, self.mass, start=s, scaling=scaling)
            self.lengths.add_(T)
            self.seen.add_(T)
            self.hi += T
            return out
        self.uniform = False
        lengths = self.lengths
        out = DenseStore.extend(self, q, k, v, positions=positions, valid=valid, scaling=scaling)
        if self.mass is not None:
            S = self.hi
            vis = slot_visibility(slot_destinations(lengths, valid), self.lengths, valid)
            self.mass[:, :, :S] += attention_mass_blockwise(q, self.k[:, :, :S], vis, scaling=scaling)
        return out

    def _window_attention(self, k: Tensor, n: Tensor) -> Tensor:
        from methods.kernels.scoring import window_attention_blockwise

        return window_attention_blockwise(self.win_q, self.win_slot, k, n, scaling=self.scaling)

    def _chunk_mass(self, q: Tensor, k: Tensor, vis: Tensor) -> Tensor:
        from methods.kernels.scoring import attention_mass_blockwise

        return attention_mass_blockwise(q, k, lambda t0, t1, s0, s1: vis[:, :, t0:t1, s0:s1], scaling=self.scaling)

    def _packed(self, n_slots: int, max_size: int) -> None:
        from methods.kernels.ragged_attention import ragged_grid

        self.grid = ragged_grid(max_size, self.offsets.shape[0], self.layer.head_dim, self.device)
        self.scratch = {}
        if self.policy.evicts_in_decode:  # (BH,) context budget minus keep(context): + keep(seen) = the budget now
            grow0 = self.policy.keep(self.n_context)[:, None].expand(-1, self.layer.n_kv_heads).reshape(-1)
            self.scratch["budget_base"] = self.base_budget - grow0
        if self.score is not None and self.policy.accumulates_attention:  # the kernel's scores per query head
            self.scratch["logits"] = torch.empty(n_slots, self.layer.n_groups, dtype=torch.float32,
                                                 device=self.device)  # (N, G)

    def _append(self, k: Tensor, v: Tensor, positions: Tensor, valid: Tensor,
                score_new: Tensor | None) -> tuple[Tensor, Tensor | None]:
        from methods.kernels.ragged_attention import ragged_append

        return ragged_append(k, v, self.k, self.v, self.offsets, self.hwm, self.hole, valid, self.seen, positions,
                             pos=self.pos, score=self.score, score_new=score_new,
                             n_recent=self.n_recent if self.policy.evicts_in_decode else None)

    def _attend_decode(self, q: Tensor, n_vis: Tensor, valid: Tensor, pos_limit: Tensor | None,
                       scaling: float) -> tuple[Tensor, Any]:
        from methods.kernels.ragged_attention import ragged_decode, ragged_update

        n_ranges, split = self.grid
        logits = self.scratch.get("logits")
        out, lse = ragged_decode(q[:, :, 0], self.k, self.v, self.offsets, n_vis, scaling=scaling, n_ranges=n_ranges,
                                 split=split, logits=logits)  # (B, H_q, D), (B, H_q)
        found = None  # with eviction: each range's lowest candidate, (BH, ranges) x 2, for _evict
        if logits is not None or pos_limit is not None:
            found = ragged_update(self.score, self.pos, self.offsets, n_vis, valid, n_kv_heads=self.layer.n_kv_heads,
                                  n_ranges=n_ranges, split=split, logits=logits, lse=lse if logits is not None else None,
                                  reduce=self.policy.group_reduce, pos_limit=pos_limit, n_sink=self.policy.n_sink)
        return out[:, None], found

    def _evict(self, found: Any, valid: Tensor) -> None:
        from methods.kernels.ragged_attention import ragged_evict

        mid_min, mid_idx = found  # (BH, ranges) each, from ragged_update
        ragged_evict(mid_min, mid_idx, valid, self.hwm, self.hole, self.seen, self.scratch["budget_base"],
                     ratio=self.policy.ratio)

    # -- CUDA-graph protocol (harness.engine captures the decode step of graph_safe stores) -------
    def graph_snapshot(self) -> tuple:
        """What a decode step advances: device counters and scores (cloned) and host counters."""
        score = None if self.score is None else self.score.clone()
        return self.hwm.clone(), self.hole.clone(), self.seen.clone(), score, self.hi, self.steps

    def graph_restore(self, snap: tuple) -> None:
        hwm, hole, seen, score, self.hi, self.steps = snap
        self.hwm.copy_(hwm)  # in place: the captured graph holds these tensors
        self.hole.copy_(hole)
        self.seen.copy_(seen)
        if score is not None:
            self.score.copy_(score)

    def graph_advance(self, steps: int) -> None:
        """Host bookkeeping of ``steps`` replayed decode steps (the graph advanced the device state)."""
        self.hi += steps
        self.steps += steps
