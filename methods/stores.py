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
           "FusedDenseStore", "CodecStore", "SparseReadStore"]


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


class FusedDenseStore(DenseStore):
    """:class:`DenseStore` with the fused fast path (docs/ARCHITECTURE.md §7): the layout and the numbers are the same,
    the kernels differ (``kernel = "fused"``).

    - Decode (T == 1): the new K/V go to slot ``lengths[b]`` and ``lengths`` and ``seen`` advance, in one
      kernel (:func:`methods.kernels.layers.append_decode`); then
      :func:`methods.kernels.attention.decode_attention` (flash-decoding, each kv head read once for its
      query group) attends over the first ``lengths[b]`` slots. No host
      synchronisation, no allocation that depends on lengths, no attribute rebinding: the engine captures
      the step in a CUDA graph (``graph_safe``). A finished row (``valid`` False) writes its token past
      its valid slots without counting it and attends to its stored tokens only; its output is discarded.
    - Prefill chunks (T > 1) while every row has had only valid tokens (one prompt, or prompts of equal
      length, as in the throughput probe): K/V are copied into slots ``hi .. hi+T-1`` and
      :func:`~methods.kernels.attention.prefill_attention` attends causally over ``0 .. hi+T-1`` without a
      mask. Otherwise (right-padded ragged batches) the reference path of :class:`SlotStore` runs.
    """

    kernel = "fused"
    graph_safe = True

    def __init__(self, layer: LayerSpec, *, batch: int, capacity: int, device: Any, dtype: torch.dtype):
        super().__init__(layer, batch=batch, capacity=capacity, device=device, dtype=dtype)
        self.uniform = True  # host: every row holds exactly `hi` valid slots (no padding, no decode yet)

    def extend(self, q: Tensor, k: Tensor, v: Tensor, *, positions: Tensor, valid: Tensor, scaling: float) -> Tensor:
        from methods.kernels.attention import decode_attention, prefill_attention
        from methods.kernels.layers import append_decode

        T = k.shape[2]
        self._check_capacity(T)
        if T == 1:
            # slot lengths[b] (after the row's valid tokens), then lengths and seen advance: one kernel
            append_decode(k[:, :, 0], v[:, :, 0], self.k, self.v, self.lengths, self.seen, valid[:, 0])
            self.uniform = False
            self.hi += 1  # host bound; a CUDA-graph replay skips this line and the engine calls graph_advance
            out = decode_attention(q[:, :, 0], self.k, self.v, self.lengths, scaling=scaling)  # (B, H_q, D)
            return out[:, None]
        if self.uniform and bool(valid.all()):  # one host sync per prefill chunk
            s = self.hi
            self.k[:, :, s : s + T].copy_(k)
            self.v[:, :, s : s + T].copy_(v)
            out = prefill_attention(q, self.k, self.v, start=s, scaling=scaling)  # (B, T, H_q, D)
            self.lengths.add_(T)
            self.seen.add_(T)
            self.hi += T
            return out
        self.uniform = False
        return super().extend(q, k, v, positions=positions, valid=valid, scaling=scaling)

    # -- CUDA-graph protocol (harness.engine captures the decode step of graph_safe stores) -------
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

    @staticmethod
    def supports(layer: LayerSpec) -> str | None:
        """Why the fused kernels cannot serve this layer, or None."""
        from methods.kernels.attention import HEAD_DIMS

        if layer.head_dim not in HEAD_DIMS:
            return f"head_dim {layer.head_dim} is not one of {HEAD_DIMS}"
        if layer.n_q_heads % layer.n_kv_heads:
            return f"{layer.n_q_heads} query heads are not a multiple of {layer.n_kv_heads} kv heads"
        return None


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


class CodecStore(SlotStore):
    """Per-token quantized K and V: each kv head's vector of each token is encoded by a codec
    (``k_codec``, ``v_codec``) into named fields (packed codes, scales, zero points, norms, ...),
    kept in slot buffers ``k_<field>``, ``v_<field>`` of shape (B, H_kv, S, n).

    A codec has ``fields(dim) -> {name: (n, dtype or None = the compute dtype)}``,
    ``encode_fields(x (..., D), meta_dtype) -> {name: (..., n)}`` and
    ``decode_fields(parts, dtype) -> (..., D)``. Constants a codec holds (rotation signs, a
    codebook, a sketch matrix) are reachable from the store, so ``stats`` counts them once.

    Two paths (the row's ``kernel`` column says which the store took):
    - reference (default): :class:`SlotStore`'s, dequantizing the stored slots into a dense tensor.
    - fused (``fused=True``; the codecs declare ``kernel_layout(dim)``, see
      :mod:`methods.kernels.quant_attention` for the dispatch and the kernel contract): a decode step
      (T == 1) runs the codec family's append kernel (the new token quantized in registers into slot
      ``lengths[b]``), split kernel (the stored slots read packed, dequantized in registers) and combine
      kernel (the splits and the new token, exact, merged by log-sum-exp; ``lengths`` / ``seen`` advance
      there): the reference semantics, static shapes, no host sync, no attribute rebinding, so the engine
      captures it in a CUDA graph (``graph_safe``, the snapshot / restore / advance protocol of
      :class:`FusedDenseStore`). Prefill chunks while every row holds only valid tokens quantize the chunk
      into its slots and attend over the stored past plus the chunk exactly in one kernel, so the peak
      stays at the packed cache; ragged (padded) batches take the reference path. The driver's workspace
      (``fused_kernel``: a step's rotated q/k/v, matrices rebuilt from the counted rotation signs) is not KV
      and is not counted.
    """

    def __init__(self, layer: LayerSpec, k_codec: Any, v_codec: Any, *, batch: int, capacity: int, device: Any,
                 dtype: torch.dtype, fused: bool = False):
        super().__init__(layer, batch=batch, capacity=capacity, device=device, dtype=dtype)
        self.k_codec, self.v_codec = k_codec, v_codec
        lead = (batch, layer.n_kv_heads, self.capacity)
        fields = []
        for name, codec in (("k", k_codec), ("v", v_codec)):
            for f, (n, dt) in codec.fields(layer.head_dim).items():
                setattr(self, f"{name}_{f}", torch.zeros(*lead, n, dtype=dt or dtype, device=self.device))
                fields.append(f"{name}_{f}")
        self.token_fields = tuple(fields)
        self.fused_kernel = None
        if fused:
            from methods.kernels.quant_attention import codec_kernel

            self.fused_kernel = codec_kernel(layer, k_codec, v_codec, batch=batch, device=self.device, dtype=dtype)
            self.kernel = "fused"
            self.graph_safe = True
            self.bookkeeping = (*SlotStore.bookkeeping, "fused_kernel")
        self.uniform = True  # host: every row holds exactly `hi` valid slots (no padding, no decode yet)

    @staticmethod
    def fused_reason(layer: LayerSpec, k_codec: Any, v_codec: Any) -> str | None:
        """Why no fused kernel serves these codecs on this layer (None: one does)."""
        from methods.kernels.quant_attention import codec_kernel_reason

        return codec_kernel_reason(layer, k_codec, v_codec)

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

    def extend(self, q: Tensor, k: Tensor, v: Tensor, *, positions: Tensor, valid: Tensor, scaling: float) -> Tensor:
        if self.fused_kernel is None:
            return super().extend(q, k, v, positions=positions, valid=valid, scaling=scaling)
        T = k.shape[2]
        self._check_capacity(T)
        if T == 1:
            out = self.fused_kernel.decode(self, q[:, :, 0], k[:, :, 0], v[:, :, 0], valid[:, 0],
                                           scaling=scaling)  # (B, H_q, D); lengths and seen advanced
            self.uniform = False
            self.hi += 1  # host bound; a CUDA-graph replay skips this line and the engine calls graph_advance
            return out[:, None]
        if self.uniform and bool(valid.all()):  # one host sync per prefill chunk
            out = self.fused_kernel.prefill(self, q, k, v, start=self.hi, scaling=scaling)  # (B, T, H_q, D)
            self.lengths.add_(T)
            self.seen.add_(T)
            self.hi += T
            return out
        self.uniform = False
        return super().extend(q, k, v, positions=positions, valid=valid, scaling=scaling)

    # -- CUDA-graph protocol (as FusedDenseStore; harness.engine captures graph_safe stores) -----------
    def graph_snapshot(self) -> tuple:
        return self.lengths.clone(), self.seen.clone(), self.hi, self.uniform

    def graph_restore(self, snap: tuple) -> None:
        lengths, seen, self.hi, self.uniform = snap
        self.lengths.copy_(lengths)  # in place: the captured graph holds these tensors
        self.seen.copy_(seen)

    def graph_advance(self, steps: int) -> None:
        self.hi += steps
        self.uniform = False
