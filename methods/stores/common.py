"""Slot bookkeeping every store shares, and the reference attention stores call.

A store keeps each layer's tokens in *slots* of buffers whose layout is ``(B, H_kv, S, ...)``: where new
tokens go (:func:`slot_destinations`), which slots a query may see (:func:`causal_slot_mask`), writing into
slot buffers (:func:`scatter_slots`), exact attention over them (:func:`attend`) and byte accounting over
every tensor a store holds (:func:`walk_tensors`). Eviction stores with per-head ragged lengths
(methods/ragged.py) build on the same pieces.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["attend", "walk_tensors", "slot_destinations", "causal_slot_mask", "scatter_slots"]


def _sdpa_has_gqa() -> bool:
    try:
        return "enable_gqa" in inspect.signature(F.scaled_dot_product_attention).parameters
    except (TypeError, ValueError):  # builtins without a signature: try the call instead
        return True


_HAS_GQA: bool | None = None


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, *, scaling: float) -> Tensor:
    """Exact softmax attention of new queries over a set of keys, with grouped-query heads.

    q (B, H_q, T, D); k, v (B, H_kv, S, D); mask (B, 1 | H_kv, T, S) bool, True = may attend.
    Every query row must see at least one key. Returns (B, T, H_q, D) in q's dtype.
    """
    global _HAS_GQA
    B, H_q, T, D = q.shape
    H_kv = k.shape[1]
    if mask.shape[1] not in (1, H_q):  # per-kv-head mask -> per-query-head
        mask = mask.repeat_interleave(H_q // H_kv, dim=1)  # (B, H_q, T, S)
    if _HAS_GQA is None:
        _HAS_GQA = _sdpa_has_gqa()
    if H_q != H_kv and not _HAS_GQA:  # torch < 2.5
        k = k.repeat_interleave(H_q // H_kv, dim=1)  # (B, H_q, S, D)
        v = v.repeat_interleave(H_q // H_kv, dim=1)
    kwargs = {"enable_gqa": True} if (H_q != H_kv and _HAS_GQA) else {}
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, **kwargs)  # (B, H_q, T, D)
    return out.transpose(1, 2)  # (B, T, H_q, D)


def walk_tensors(obj: Any, prefix: str = "", _seen: set[int] | None = None) -> Iterator[tuple[str, Tensor]]:
    """Every tensor reachable from ``obj``'s attributes (lists, tuples, dicts and plain objects
    included), each once, with a dotted name. Used for byte accounting: nothing is left out by
    forgetting to list it."""
    seen = set() if _seen is None else _seen
    if isinstance(obj, Tensor):
        if id(obj) not in seen:
            seen.add(id(obj))
            yield prefix, obj
        return
    if isinstance(obj, (str, bytes, int, float, bool, type(None), torch.dtype, torch.device, type)):
        return
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    elif hasattr(obj, "__dict__"):
        items = vars(obj).items()
    else:
        return
    for key, value in items:
        yield from walk_tensors(value, f"{prefix}.{key}" if prefix else str(key), seen)


def slot_destinations(lengths: Tensor, valid: Tensor) -> Tensor:
    """Slots for T new tokens of each row: valid tokens go, in order, right after the row's
    ``lengths`` stored tokens; padding tokens go after them (and are never counted as stored).

    lengths (B,) int64; valid (B, T) bool -> (B, T) int64, a permutation of lengths + arange(T).
    """
    v = valid.long()  # (B, T)
    n_valid = v.sum(1, keepdim=True)  # (B, 1)
    rank_valid = v.cumsum(1) - 1  # (B, T)
    rank_pad = (1 - v).cumsum(1) - 1  # (B, T)
    return lengths[:, None] + torch.where(valid, rank_valid, n_valid + rank_pad)  # (B, T)


def causal_slot_mask(lengths_new: Tensor, dest: Tensor, n_slots: int) -> Tensor:
    """Which of ``n_slots`` slots each new token may attend to, for in-order slot layouts.

    A valid token at slot d sees slots <= d (the stored past and earlier new tokens); a padding
    token sees the valid slots and itself (so no query row is empty; its output is discarded).
    lengths_new (B,) slots holding valid tokens after this call; dest (B, T) -> (B, 1, T, S) bool.
    """
    slots = torch.arange(n_slots, device=dest.device)  # (S,)
    d = dest[:, :, None]  # (B, T, 1)
    mask = (slots <= d) & ((slots < lengths_new[:, None, None]) | (slots == d))  # (B, T, S)
    return mask[:, None]  # (B, 1, T, S)


def scatter_slots(buf: Tensor, dest: Tensor, val: Tensor) -> None:
    """buf (B, H, S, *) [dest[b, t]] = val (B, H, T, *) along the slot axis, in place."""
    B, H, T = val.shape[:3]
    idx = dest[:, None, :, None].expand(B, H, T, val.shape[-1])  # (B, H, T, *)
    buf.scatter_(2, idx, val.to(buf.dtype))
