"""Decode attention over the ragged store of the eviction family (:class:`methods.ragged.EvictionStore`), and the
per-slot score pass that follows it, each beside its plain-torch reference (DESIGN §7).

Layout: one flat buffer ``k, v (N, D)``; segment ``s = b * H_kv + h`` (batch row b, kv head h) occupies slots
``[offsets[s], offsets[s] + sizes[s])``; a decode step sees the first ``n_vis[s]`` slots of its segment (kept
tokens, then the new token; the store keeps that prefix dense). ``offsets`` and ``n_vis`` are device tensors,
never read on the host.

- :func:`ragged_decode`: flash-decoding (Dao et al., 2023) over the segments. Grid ``(n_ranges, B * H_kv)``: one
  program per (range of ``split`` slots, segment) loads its slots' keys and values once for the kv head's whole
  query group (GQA: each segment is read once per step, not once per query head), keeps an online softmax in fp32
  and writes a partial output and log-sum-exp; a second kernel merges the ranges and writes each query head's final
  lse. ``n_ranges`` and ``split`` are fixed when the store packs (:func:`ragged_grid`, from the largest segment),
  so a CUDA graph captures the step once and replays it while the segments fill. With ``logits`` given, the split
  kernel also writes every visible slot's score per query head (``(N, G)`` fp32, log2 units): what the score pass
  needs to turn into probabilities without reading K again.
- :func:`ragged_append`: a decode step's bookkeeping in one kernel (one program per segment): the new token's K, V,
  position and starting score go to the segment's hole or high-water mark; the visible prefix, the high-water mark,
  the hole, the row's token count and the eviction limit are updated on the device.
- :func:`ragged_update`: the score pass, same grid. H2O-style methods add the attention the step's queries paid
  each slot (``exp2(logit - lse)``, the group's query heads combined by mean, max or sum); methods that evict during
  decode get each range's lowest-score eviction candidate (position <= ``pos_limit``, >= ``n_sink``) and its
  first slot; :func:`ragged_evict` (one program per segment) picks the segment's and, where the segment holds more
  than its budget, frees that slot (the next token takes it), all on the device.

References: :func:`ragged_append_reference`, :func:`segment_attend` (the store's reference decode attention,
output and probabilities) and :func:`ragged_update_reference`. fp32 inputs use IEEE fp32 dot products, so fp32 runs match the references to
~1e-6; bf16 inputs accumulate in fp32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import interpret_mode, interpreter_compat

LOG2E = 1.4426950408889634
REDUCE_CODES = {"mean": 0, "max": 1, "sum": 2}
BIG = 2**30  # "no candidate" slot index (same as the kernel's)

__all__ = ["segment_ids", "segment_attend", "ragged_append_reference", "ragged_update_reference", "ragged_grid",
           "ragged_append", "ragged_decode", "ragged_update", "ranges_argmin", "ragged_evict"]


# --------------------------------------------------------------------------------------------------
# References


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
    slot; sizes (BH,) slots per segment; visible (N,) bool. Every segment must see at least one slot. Returns the
    output (B, 1, H_q, D) in q's dtype and the attention probabilities (N, G) float32 (G query heads per kv head;
    0 where invisible). Equals dense softmax attention over each segment's visible slots; temporaries are the size
    of K.
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


def ragged_append_reference(k_new: Tensor, v_new: Tensor, k: Tensor, v: Tensor, offsets: Tensor, hwm: Tensor,
                            hole: Tensor, valid: Tensor, seen: Tensor, positions: Tensor, *, pos: Tensor | None = None,
                            score: Tensor | None = None, score_new: Tensor | None = None,
                            n_recent: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """A decode step's writes, in torch, in place: k_new, v_new (B, H_kv, 1, D) to each segment's hole (a slot the
    last eviction freed, ``hole >= 0``) or its high-water mark ``hwm`` (BH,) in k, v (N, D); the position (B, 1)
    to ``pos`` and ``score_new`` (BH,) (or 0) to ``score`` (N,) when kept. Rows still generating (``valid`` (B, 1))
    advance ``hwm``, clear ``hole`` and count the token in ``seen`` (B,). Returns the visible prefix (BH,)
    (kept tokens and the new one) and, with ``n_recent`` (BH,), the newest position eviction may free."""
    B, H, _, D = k_new.shape
    ok = valid[:, :1].expand(B, H).reshape(-1)  # (BH,)
    p = positions[:, :1].expand(B, H).reshape(-1)  # (BH,)
    free = hole < 0
    dest = offsets + torch.where(free, hwm, hole)  # (BH,)
    n_vis = hwm + free.long()  # (BH,)
    k.index_copy_(0, dest, k_new.reshape(B * H, D).to(k.dtype))
    v.index_copy_(0, dest, v_new.reshape(B * H, D).to(v.dtype))
    if pos is not None:
        pos.index_copy_(0, dest, p.to(pos.dtype))
    if score is not None:
        score.index_copy_(0, dest, score_new.float() if score_new is not None else torch.zeros_like(dest, dtype=score.dtype))
    hwm.add_((free & ok).long())
    hole.masked_fill_(ok, -1)
    seen.add_(valid[:, 0].long())
    return n_vis, (p - n_recent if n_recent is not None else None)


def reduce_group(probs: Tensor, how: str) -> Tensor:
    """(N, G) attention of a group's query heads -> (N,) per-slot gain (mean, max or sum over the group)."""
    from methods.selectors import group_reduce

    return group_reduce(probs.T[None], 1, how)[0, 0]


def ragged_update_reference(score: Tensor | None, pos: Tensor | None, seg: Tensor, rel: Tensor, visible: Tensor,
                            ok: Tensor, *, probs: Tensor | None = None, reduce: str = "mean",
                            pos_limit: Tensor | None = None, n_sink: int = 0) -> Tensor | None:
    """The score pass of a decode step, in torch. score (N,) float32, updated in place: visible slots of segments
    still generating (``ok`` (BH,)) gain ``reduce`` over the group of ``probs`` (N, G) when given. With
    ``pos_limit`` (BH,): returns (BH,) int64, each segment's first slot (index inside it) holding the lowest score
    among candidates (visible, pos <= pos_limit, pos >= n_sink), ``BIG`` where none."""
    if probs is not None:
        score += torch.where(visible & ok[seg], reduce_group(probs, reduce), 0.0)
    if pos_limit is None:
        return None
    BH = ok.shape[0]
    p = pos.long()
    cand = visible & (p <= pos_limit[seg]) & (p >= int(n_sink))
    key = torch.where(cand, score, torch.tensor(float("inf"), device=score.device))
    low = torch.full((BH,), float("inf"), device=key.device).scatter_reduce(0, seg, key, "amin")  # (BH,)
    at_low = cand & (key == low[seg])
    return torch.full((BH,), BIG, dtype=torch.long, device=key.device).scatter_reduce(
        0, seg, torch.where(at_low, rel, BIG), "amin")  # (BH,) earliest slot with the lowest score


# --------------------------------------------------------------------------------------------------
# Kernels


def _kernels():
    if interpret_mode():
        interpreter_compat()
    from . import _ragged_triton as K

    return K


def _launch(**options: int) -> dict[str, int]:
    return {} if interpret_mode() else options


def _block_n(D: int) -> int:
    return 64 if D <= 128 else 32


def _pow2(n: int) -> int:
    return 1 << max(0, (max(1, n) - 1).bit_length())


def ragged_grid(max_size: int, n_segments: int, head_dim: int, device: torch.device | str) -> tuple[int, int]:
    """(n_ranges, split) for segments of at most ``max_size`` slots: enough programs to fill the GPU (four per SM,
    as the dense decode kernel), ranges of whole tiles. Shapes only: fixed once per pack."""
    from .attention import decode_splits

    block_n = _block_n(head_dim)
    ns = decode_splits(1, n_segments, max(1, max_size), torch.device(device), block_n)
    split = -(-max(1, max_size) // ns)
    split = -(-split // block_n) * block_n
    return -(-max(1, max_size) // split), split


def ragged_append(k_new: Tensor, v_new: Tensor, k: Tensor, v: Tensor, offsets: Tensor, hwm: Tensor, hole: Tensor,
                  valid: Tensor, seen: Tensor, positions: Tensor, *, pos: Tensor | None = None,
                  score: Tensor | None = None, score_new: Tensor | None = None,
                  n_recent: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Fused :func:`ragged_append_reference` (one program per segment, no host synchronisation)."""
    B, H, _, D = k_new.shape
    n_vis = torch.empty_like(hwm)  # (BH,)
    pos_limit = torch.empty_like(hwm) if n_recent is not None else None
    valid = valid.reshape(B)
    K = _kernels()
    dummy = hwm
    K.ragged_append[(B * H,)](
        k_new, v_new, k, v, offsets, hwm, hole, n_vis, valid, seen, positions,
        pos if pos is not None else dummy, score if score is not None else dummy,
        score_new if score_new is not None else dummy, n_recent if n_recent is not None else dummy,
        pos_limit if pos_limit is not None else dummy, H,
        k_new.stride(0), k_new.stride(1), k_new.stride(3), v_new.stride(0), v_new.stride(1), v_new.stride(3),
        *k.stride(), *v.stride(), positions.stride(0),
        D=D, POS=pos is not None, SCORE=score is not None, SCORE_NEW=score_new is not None,
        EVICT=n_recent is not None, **_launch(num_warps=1),
    )
    return n_vis, pos_limit


def ragged_decode(q: Tensor, k: Tensor, v: Tensor, offsets: Tensor, n_vis: Tensor, *, scaling: float,
                  n_ranges: int, split: int, logits: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Fused decode attention: q (B, H_q, D) (any strides); k, v (N, D); offsets, n_vis (B * H_kv,) ->
    out (B, H_q, D) in q's dtype and lse (B, H_q) float32 (log2 units). ``logits`` (N, G) float32: where each
    visible slot's scores (log2 units) are written. No host synchronisation."""
    B, H_q, D = q.shape
    BH = offsets.shape[0]
    H_kv = BH // B
    G = H_q // H_kv
    block_n = _block_n(D)
    mid_o = torch.empty(B, H_q, n_ranges, D, dtype=torch.float32, device=q.device)
    mid_l = torch.empty(B, H_q, n_ranges, dtype=torch.float32, device=q.device)
    out = torch.empty(B, H_q, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H_q, dtype=torch.float32, device=q.device)
    K = _kernels()
    lg = logits if logits is not None else mid_l  # a placeholder pointer when not written
    sg = logits.stride() if logits is not None else (0, 0)
    K.ragged_split[(n_ranges, BH)](
        q, k, v, offsets, n_vis, mid_o, mid_l, lg, float(scaling) * LOG2E, H_kv,
        *q.stride(), *k.stride(), *v.stride(), *mid_o.stride(), *mid_l.stride(), *sg,
        G=G, SPLIT=split, BLOCK_G=max(16, _pow2(G)), BLOCK_N=block_n, D=D, IEEE=q.dtype == torch.float32,
        WRITE_LOGITS=logits is not None, **_launch(num_warps=4, num_stages=2),
    )
    K.ragged_combine[(B * H_q,)](
        mid_o, mid_l, out, lse, n_ranges, H_q, *mid_o.stride(), *mid_l.stride(), *out.stride(), *lse.stride(),
        NR=max(2, _pow2(n_ranges)), D=D, **_launch(num_warps=4),
    )
    return out, lse


def ragged_update(score: Tensor, pos: Tensor | None, offsets: Tensor, n_vis: Tensor, valid: Tensor, *,
                  n_kv_heads: int, n_ranges: int, split: int, logits: Tensor | None = None, lse: Tensor | None = None,
                  reduce: str = "mean", pos_limit: Tensor | None = None,
                  n_sink: int = 0) -> tuple[Tensor, Tensor] | None:
    """Fused :func:`ragged_update_reference` after :func:`ragged_decode` (same ``n_ranges``/``split``): score (N,)
    float32 gains ``exp2(logits - lse)`` reduced over the group in rows still generating (``valid`` (B,) or
    (B, 1)), when ``logits``/``lse`` are given. With ``pos_limit`` (BH,) returns each range's lowest-score
    candidate and its first slot, (BH, n_ranges) float32 and int32 (:func:`ranges_argmin` or :func:`ragged_evict`
    finish the choice)."""
    BH = offsets.shape[0]
    accum = logits is not None
    evict = pos_limit is not None
    if not (accum or evict):
        return None
    G = logits.shape[1] if accum else 1
    mid_min = torch.empty(BH, n_ranges, dtype=torch.float32, device=score.device)
    mid_idx = torch.empty(BH, n_ranges, dtype=torch.int32, device=score.device)
    dummy = score
    K = _kernels()
    K.ragged_update[(n_ranges, BH)](
        logits if accum else dummy, lse if accum else dummy, score, pos if evict else dummy, offsets, n_vis,
        valid.reshape(-1),
        pos_limit if evict else offsets, mid_min, mid_idx, int(n_sink), n_kv_heads,
        *(logits.stride() if accum else (0, 0)), *(lse.stride() if accum else (0, 0)), *mid_min.stride(),
        G=G, SPLIT=split, BLOCK_G=_pow2(G), BLOCK_N=128, REDUCE=REDUCE_CODES[reduce], ACCUM=accum, EVICT=evict,
        **_launch(num_warps=4),
    )
    return (mid_min, mid_idx) if evict else None


def ranges_argmin(mid_min: Tensor, mid_idx: Tensor) -> Tensor:
    """Each segment's first lowest-score slot over the ranges :func:`ragged_update` wrote, (BH, R) each -> (BH,)
    int64 (``BIG``: no candidate). Ranges are in slot order, so the smallest index among the minima is the first."""
    low = mid_min.amin(1, keepdim=True)  # (BH, 1)
    return torch.where((mid_min == low) & (mid_idx < BIG), mid_idx, BIG).amin(1).long()


def ragged_evict(mid_min: Tensor, mid_idx: Tensor, valid: Tensor, hwm: Tensor, hole: Tensor, seen: Tensor,
                 base: Tensor, *, ratio: float) -> None:
    """Fused end of an evicting decode step, in place: each segment of a row still generating (``valid`` (B,) or
    (B, 1)) that holds more than ``base + keep(seen[b])`` tokens (``keep``: the budget function at ``ratio``,
    :func:`methods.selectors.keep_count_t`) frees its first lowest-score candidate (``hole``). ``base`` (BH,) is the
    segment's context budget minus ``keep`` of the context. Equals ``hole = where(over & (first < BIG), first,
    hole)`` with ``first = ranges_argmin(mid_min, mid_idx)``."""
    from methods.selectors import ratio_fraction

    r = ratio_fraction(ratio)
    BH, R = mid_min.shape
    K = _kernels()
    K.ragged_evict[(BH,)](
        mid_min, mid_idx, valid.reshape(-1), hwm, hole, seen, base, R, BH // seen.shape[0],
        r.denominator - r.numerator, r.denominator, *mid_min.stride(), NR=max(2, _pow2(R)), **_launch(num_warps=1),
    )
