"""``quest``: query-aware page selection (Tang et al., ICML 2024, "Quest: Query-Aware Sparsity for
Efficient Long-Context LLM Inference"; docs/PAPERS.md §6). The comparator of ``louver``.

Every token stays; the keys are cut into pages of ``page_size`` (16) consecutive slots and each page keeps
the element-wise min and max of its keys. A decode query scores each page with the upper bound
sum_j max(q_j min_j, q_j max_j) >= q.k for every key of the page, and reads the top pages: a budget of
ceil((1 - ratio) * n) of the n indexed pages (at least one).

Choices, and ours:
- Pages are aligned: page p holds slots p * page_size .. (p + 1) * page_size - 1 of a row, and a page is
  indexed (gets its min/max) once the row's tokens fill it: at ``end_of_context``, after the question, and at
  the start of the decode step after the one that filled it. The row's last, partial page is the *buffer*:
  every step reads it (Quest always reads the page being filled).
- GQA (Quest is an MHA method): ``gqa=per_head`` (default) lets each query head pick its own top pages, as
  Quest does per head; a kv head reads the union of its group's pages (a key is loaded once per kv head), up
  to G times the budget. ``gqa=group`` ranks pages once per kv head by the sum of its query heads' upper
  bounds, so a kv head reads exactly the budget. On the tiny model's captured keys at ratio 0.9 (4K tokens,
  niah_multikey): per_head reads 0.20 of the pages (union over the group of 3) at recall@10 0.74; group reads
  0.10 at recall@10 0.63 (the group's max instead of the sum: 0.56).
- Ties in the page ranking go to the lower page (both paths; the fused selection is an exact k-th-largest).
- The first ``dense_layers`` layers read everything (Quest keeps the first two layers dense).
- Bytes read per step: the min/max of every indexed page, plus K and V of the selected pages' tokens (a key
  selected by any query head of a kv head is read once) and of the buffer. Prefill and the question attend
  densely. ratio 0 reads everything and equals ``full``.

Kernels (``fused``): on CUDA (or CPU under ``TRITON_INTERPRET=1`` with ``fused=on``) a decode step runs four
kernels besides the projections: append + page close, page bounds, top-k selection, and sparse flash-decoding
over the selected pages and the buffer (:mod:`methods.kernels.sparse_attention`); the engine captures it in a
CUDA graph. The reference path computes the same selection with torch and attends under a mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from methods.api import LayerSpec, MethodBase
from methods.kernels import FUSED_CHOICES, use_fused
from methods.sparse_fused import FusedSparseRead
from methods.stores import SparseReadStore

GQA = ("per_head", "group")


def page_scores(qg: Tensor, kmin: Tensor, kmax: Tensor) -> Tensor:
    """Upper bound of q.k over each page: qg (B, H_kv, G, D) fp32; kmin, kmax (B, H_kv, P, D)
    -> (B, H_kv, G, P) fp32."""
    q = qg.float()[:, :, :, None, :]  # (B, H_kv, G, 1, D)
    return torch.maximum(q * kmin.float()[:, :, None], q * kmax.float()[:, :, None]).sum(-1)


def top_pages(scores: Tensor, page_ok: Tensor, n_pages: Tensor) -> Tensor:
    """The ``n_pages`` (B,) best valid pages per query, ties to the lower page: scores (B, H_kv, G, P);
    page_ok (B, P) bool -> (B, H_kv, G, P) bool."""
    s = scores.masked_fill(~page_ok[:, None, None, :], float("-inf"))
    rank = s.sort(dim=-1, descending=True, stable=True).indices.argsort(-1)  # (B, H_kv, G, P): 0 = best
    return (rank < n_pages[:, None, None, None]) & page_ok[:, None, None, :]


def page_budget(ratio: float, n_max: int) -> Tensor:
    """Pages read for n = 0 .. n_max indexed pages: max(1, ceil((1 - ratio) n)) (the 1e-9 absorbs the binary
    rounding of 1 - ratio, so ratio 0.9 of 30 pages reads 3)."""
    keep = 1.0 - float(ratio)
    return torch.tensor([max(1, math.ceil(keep * n - 1e-9)) for n in range(n_max + 1)], dtype=torch.int32)


@dataclass
class Quest(MethodBase):
    """Pages of ``page_size`` tokens with key min/max; reads the top (1 - ratio) of the pages."""

    ratio: float = 0.9
    page_size: int = 16
    dense_layers: int = 2
    gqa: str = "per_head"
    fused: str = "auto"

    family = "sparse"
    memory = "physical"
    kernel = "fused"  # has a fused path; rows record the path that actually ran
    name = "quest"

    def __post_init__(self) -> None:
        if int(self.page_size) < 1 or int(self.dense_layers) < 0:
            raise ValueError(f"page_size must be >= 1 and dense_layers >= 0, got {self.page_size}, {self.dense_layers}")
        if self.gqa not in GQA:
            raise ValueError(f"gqa must be one of {GQA}, got {self.gqa!r}")
        if self.fused not in FUSED_CHOICES:
            raise ValueError(f"fused must be one of {FUSED_CHOICES}, got {self.fused!r}")

    @staticmethod
    def unsupported(layer: LayerSpec, page_size: int) -> str | None:
        """Why the fused kernels cannot serve this layer, or None."""
        from methods.kernels.sparse_attention import supports

        why = supports(layer.head_dim, layer.n_q_heads, layer.n_kv_heads)
        if why is None and (page_size & (page_size - 1) or page_size > 64):
            why = f"page_size {page_size} is not a power of two up to 64"
        return why

    def new_layer(self, layer: LayerSpec, *, batch: int, capacity: int, device: Any, dtype: Any) -> QuestStore:
        cls = QuestStore
        if use_fused(self.fused, device, self.unsupported(layer, int(self.page_size))):
            cls = FusedQuestStore
        return cls(layer, self, batch=batch, capacity=capacity, device=device, dtype=dtype)


class QuestStore(SparseReadStore):
    """Dense K/V plus per-page key min/max of the row's full pages (slots [0, idx_end), idx_end a multiple of
    page_size); the row's partial last page is the buffer."""

    index_fields = ("kmin", "kmax")
    bookkeeping = (*SparseReadStore.bookkeeping, "budget")

    def __init__(self, layer: LayerSpec, method: Quest, *, batch: int, capacity: int, device: Any, dtype: Any):
        super().__init__(layer, batch=batch, capacity=capacity, device=device, dtype=dtype, merge_every=2**62)
        self.method = method
        self.ps = int(method.page_size)
        self.dense_decode = float(method.ratio) == 0.0 or layer.layer_idx < int(method.dense_layers)
        self.budget = page_budget(method.ratio, self.capacity // self.ps).to(self.device)  # (P_cap + 1,)

    def _index_reset(self) -> None:
        B, H, D = self.batch, self.layer.n_kv_heads, self.layer.head_dim
        p_cap = self.capacity // self.ps
        self.kmin = torch.zeros(B, H, p_cap, D, dtype=self.dtype, device=self.device)  # (B, H_kv, P, D)
        self.kmax = torch.zeros(B, H, p_cap, D, dtype=self.dtype, device=self.device)  # (B, H_kv, P, D)

    def end_of_context(self) -> None:
        if self.built:
            return
        if not self.dense_decode:
            self._index_reset()
        self.built = True
        self.n_merges += 1
        self.buf_hi = 0
        self._close_pages()

    def _close_pages(self) -> None:
        """Index every page the row's tokens fill (pages idx_end / ps .. lengths // ps - 1); idx_end follows."""
        ps = self.ps
        new_end = (self.lengths // ps) * ps  # (B,)
        n_pages = self.hi // ps  # host bound on any row's full pages
        if not self.dense_decode and n_pages > 0:
            B, H, _, D = self.k.shape
            pages = self.k[:, :, : n_pages * ps].reshape(B, H, n_pages, ps, D)  # (B, H_kv, P, ps, D) a view
            p = torch.arange(n_pages, device=self.device)
            new = ((p[None] >= self.idx_end[:, None] // ps) & (p[None] < new_end[:, None] // ps))[:, None, :, None]
            for meta, val in ((self.kmin, pages.amin(3)), (self.kmax, pages.amax(3))):
                meta[:, :, :n_pages] = torch.where(new, val.to(meta.dtype), meta[:, :, :n_pages])
        self.idx_end = new_end

    def _after_chunk(self) -> None:
        self._close_pages()

    def _before_decode_step(self) -> None:
        # the page-close half of kernels.sparse_attention.quest_append_reference: the last full page's min/max
        # (idempotent) and idx_end, without a host sync
        n = self.lengths
        if not self.dense_decode:
            B, H, _, D = self.k.shape
            full = (n % self.ps == 0) & (n > 0)  # (B,)
            slots = (n - self.ps).clamp(min=0)[:, None] + torch.arange(self.ps, device=self.device)  # (B, ps)
            page = self.k.gather(2, slots[:, None, :, None].expand(B, H, self.ps, D))  # (B, H_kv, ps, D)
            p = (n // self.ps - 1).clamp(min=0)[:, None, None, None].expand(B, H, 1, D)
            for meta, val in ((self.kmin, page.amin(2, keepdim=True)), (self.kmax, page.amax(2, keepdim=True))):
                meta.scatter_(2, p, torch.where(full[:, None, None, None], val.to(meta.dtype), meta.gather(2, p)))
        self.idx_end = (n // self.ps) * self.ps

    def _select(self, qg: Tensor) -> Tensor:
        from methods.kernels.sparse_attention import select_pages_reference

        B, H, G, _ = qg.shape
        n_pages = self.idx_end // self.ps  # (B,)
        scores = page_scores(qg, self.kmin, self.kmax)  # (B, H_kv, G, P)
        rows = scores.sum(2) if self.method.gqa == "group" else scores.reshape(B, H * G, -1)  # (B, R, P)
        sel = select_pages_reference(rows, n_pages, self.budget)  # (B, R, P)
        sel = sel[:, :, None].expand(B, H, G, -1) if self.method.gqa == "group" else sel.reshape(B, H, G, -1)
        slot_page = (torch.arange(self.capacity, device=self.device) // self.ps).clamp(max=sel.shape[-1] - 1)
        return sel[..., slot_page]  # (B, H_kv, G, S); the caller keeps indexed slots only

    def _index_read_bytes(self) -> Tensor:
        pages = (self.idx_end // self.ps).to(torch.float64)  # (B,)
        return pages * self.layer.n_kv_heads * 2 * self.layer.head_dim * self._nominal_size()

    def _index_stored_bytes(self, root: str, t: Tensor, elem: int) -> int:
        pages = int((self.idx_end // self.ps).sum())
        return pages * t.shape[1] * t.shape[3] * elem


class FusedQuestStore(FusedSparseRead, QuestStore):
    """:class:`QuestStore` on the sparse-read kernels (module docstring): same layout, index and selection."""

    bookkeeping = (*QuestStore.bookkeeping, "acc")

    def __init__(self, layer: LayerSpec, method: Quest, *, batch: int, capacity: int, device: Any, dtype: Any):
        super().__init__(layer, method, batch=batch, capacity=capacity, device=device, dtype=dtype)
        self._fused_init()

    def _fused_decode(self, q: Tensor, k: Tensor, v: Tensor, valid: Tensor, scaling: float) -> Tensor:
        from methods.kernels import sparse_attention as sa

        kw = {"acc": self.acc, "valid": valid, "scaling": scaling}
        if self.dense_decode:
            sa.quest_append(k, v, self.k, self.v, self.lengths, self.seen, valid, self.idx_end, None, None,
                            page_size=self.ps)
            return sa.sparse_decode_attention(q, self.k, self.v, self.lengths, self.idx_end, gate="dense", **kw)
        sa.quest_append(k, v, self.k, self.v, self.lengths, self.seen, valid, self.idx_end, self.kmin, self.kmax,
                        page_size=self.ps)
        group = self.method.gqa == "group"
        scores = sa.quest_page_scores(q, self.kmin, self.kmax, self.idx_end, group=group, page_size=self.ps)
        bits = sa.quest_select(scores, self.idx_end, self.budget, n_kv_heads=self.layer.n_kv_heads,
                               groups=self.layer.n_groups, page_size=self.ps)
        return sa.sparse_decode_attention(q, self.k, self.v, self.lengths, self.idx_end, gate="pages", bits=bits,
                                          page_size=self.ps, **kw)

    def _index_bytes_booked(self, indexed: Tensor, steps: Tensor) -> Tensor:
        if self.dense_decode:
            return torch.zeros_like(indexed)
        return indexed * (2 * self.layer.head_dim * self._nominal_size()) / self.ps  # pages' min/max per step
