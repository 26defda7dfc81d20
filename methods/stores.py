"""Storage layouts shared by methods, and the reference attention they call.

A store keeps each layer's tokens in *slots* of buffers whose layout is ``(B, H_kv, S, ...)``.
:class:`SlotStore` handles the bookkeeping every slot layout shares (where new tokens go, which
slots a query may see, padding, capacity, byte accounting); subclasses decide what a slot holds
(dense K/V, packed integer codes, ...). Eviction stores that keep per-head ragged lengths build on
the same pieces (:func:`attend`, :func:`walk_tensors`).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from methods.api import KVStats, LayerSpec, torch_dtype

__all__ = ["attend", "walk_tensors", "slot_destinations", "causal_slot_mask", "scatter_slots", "SlotStore", "DenseStore",
           "CodecStore"]


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
    def extend(self, q: Tensor, k: Tensor, v: Tensor, *, positions: Tensor, valid: Tensor, scaling: float) -> Tensor:
        B, H_kv, T, D = k.shape
        if self.hi + T > self.capacity:
            raise RuntimeError(
                f"KV store capacity {self.capacity} exceeded ({self.hi} slots used + {T} new); "
                "the engine sizes capacity as context + question + max_new_tokens"
            )
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
            n = self.slots_stored(root, kept)
            if n is not None:
                per_slot = (t.numel() // max(1, t.shape[0] * t.shape[1] * t.shape[2])) * elem
                stored += int(n.sum()) * per_slot
            else:
                stored += t.numel() * elem
        seen = self.seen.detach().to("cpu", torch.long)
        full = int(seen.sum()) * 2 * self.layer.n_kv_heads * self.layer.head_dim * torch.empty(
            (), dtype=nominal
        ).element_size()
        return KVStats(
            tokens_kept=kept,
            tokens_seen=seen,
            bytes_stored=stored,
            bytes_allocated=allocated,
            bytes_read_per_step=stored,
            bytes_full=full,
        )


class DenseStore(SlotStore):
    """Full-precision K and V in preallocated (B, H_kv, capacity, D) buffers."""

    token_fields = ("k", "v")
    overlay_new = False  # the buffer already holds the new tokens exactly

    def __init__(self, layer: LayerSpec, *, batch: int, capacity: int, device: Any, dtype: torch.dtype):
        super().__init__(layer, batch=batch, capacity=capacity, device=device, dtype=dtype)
        shape = (batch, layer.n_kv_heads, self.capacity, layer.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=self.device)  # (B, H_kv, S, D)
        self.v = torch.zeros(shape, dtype=dtype, device=self.device)  # (B, H_kv, S, D)

    def _write(self, dest: Tensor, k: Tensor, v: Tensor) -> None:
        B, H_kv, T, D = k.shape
        idx = dest[:, None, :, None].expand(B, H_kv, T, D)  # (B, H_kv, T, D)
        self.k.scatter_(2, idx, k.to(self.dtype))
        self.v.scatter_(2, idx, v.to(self.dtype))

    def _read(self, n_slots: int) -> tuple[Tensor, Tensor]:
        return self.k[:, :, :n_slots], self.v[:, :, :n_slots]


class CodecStore(SlotStore):
    """Per-token quantized K and V: each kv head's vector of each token is encoded by a codec
    (``k_codec``, ``v_codec``) into named fields (packed codes, scales, zero points, norms, ...),
    kept in slot buffers ``k_<field>``, ``v_<field>`` of shape (B, H_kv, S, n).

    A codec has ``fields(dim) -> {name: (n, dtype or None = the compute dtype)}``,
    ``encode_fields(x (..., D), meta_dtype) -> {name: (..., n)}`` and
    ``decode_fields(parts, dtype) -> (..., D)``. Constants a codec holds (rotation signs, a
    codebook, a sketch matrix) are reachable from the store, so ``stats`` counts them once.
    """

    def __init__(self, layer: LayerSpec, k_codec: Any, v_codec: Any, *, batch: int, capacity: int, device: Any,
                 dtype: torch.dtype):
        super().__init__(layer, batch=batch, capacity=capacity, device=device, dtype=dtype)
        self.k_codec, self.v_codec = k_codec, v_codec
        lead = (batch, layer.n_kv_heads, self.capacity)
        fields = []
        for name, codec in (("k", k_codec), ("v", v_codec)):
            for f, (n, dt) in codec.fields(layer.head_dim).items():
                setattr(self, f"{name}_{f}", torch.zeros(*lead, n, dtype=dt or dtype, device=self.device))
                fields.append(f"{name}_{f}")
        self.token_fields = tuple(fields)

    def _names(self, name: str) -> list[str]:
        return [f[len(name) + 1:] for f in self.token_fields if f.startswith(name + "_")]

    def _write(self, dest: Tensor, k: Tensor, v: Tensor) -> None:
        for name, x, codec in (("k", k, self.k_codec), ("v", v, self.v_codec)):
            for f, val in codec.encode_fields(x, meta_dtype=self.dtype).items():  # (B, H_kv, T, n)
                scatter_slots(getattr(self, f"{name}_{f}"), dest, val)

    def _read(self, n_slots: int) -> tuple[Tensor, Tensor]:
        out = []
        for name, codec in (("k", self.k_codec), ("v", self.v_codec)):
            parts = {f: getattr(self, f"{name}_{f}")[:, :, :n_slots] for f in self._names(name)}  # (B, H_kv, S, n)
            out.append(codec.decode_fields(parts, dtype=self.dtype))  # (B, H_kv, S, D)
        return out[0], out[1]
