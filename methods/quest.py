"""``quest``: query-aware page selection (Tang et al., ICML 2024, "Quest: Query-Aware Sparsity for
Efficient Long-Context LLM Inference"; docs/PAPERS.md §6). The comparator of ``louver``.

Every token stays; the keys are cut into pages of ``page_size`` (16) consecutive tokens and each page
keeps the element-wise min and max of its keys. A decode query scores each page with the upper bound
sum_j max(q_j min_j, q_j max_j) >= q.k for every key of the page, and reads the top pages: a token
budget of (1 - ratio) of the indexed tokens, i.e. ceil((1 - ratio) * n / page_size) pages, per query head.

Choices, and ours:
- Pages are built at ``end_of_context`` over the context; later tokens (the question and generated
  tokens) sit in a dense buffer that every step reads (Quest always reads the page being filled) and
  become pages every ``page_size`` decode steps (a longer question is cut into full pages then).
- The first ``dense_layers`` layers read everything (Quest keeps the first two layers dense).
- Bytes read per step: the min/max of every page, plus K and V of the selected pages' tokens (a key
  selected by any query head of a kv head is read once) and of the buffer. Prefill and the question
  attend densely. ratio 0 reads everything and equals ``full``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from methods.api import LayerSpec, MethodBase
from methods.stores import SparseReadStore


def page_scores(qg: Tensor, kmin: Tensor, kmax: Tensor) -> Tensor:
    """Upper bound of q.k over each page: qg (B, H_kv, G, D) fp32; kmin, kmax (B, H_kv, P, D)
    -> (B, H_kv, G, P) fp32."""
    q = qg.float()[:, :, :, None, :]  # (B, H_kv, G, 1, D)
    return torch.maximum(q * kmin.float()[:, :, None], q * kmax.float()[:, :, None]).sum(-1)


def top_pages(scores: Tensor, page_ok: Tensor, n_pages: Tensor) -> Tensor:
    """The ``n_pages`` (B,) best valid pages per query: scores (B, H_kv, G, P); page_ok (B, P) bool
    -> (B, H_kv, G, P) bool."""
    s = scores.masked_fill(~page_ok[:, None, None, :], float("-inf"))
    rank = s.argsort(-1, descending=True).argsort(-1)  # (B, H_kv, G, P): 0 = best
    return (rank < n_pages[:, None, None, None]) & page_ok[:, None, None, :]


@dataclass
class Quest(MethodBase):
    """Pages of ``page_size`` tokens with key min/max; reads the top (1 - ratio) of the tokens."""

    ratio: float = 0.9
    page_size: int = 16
    dense_layers: int = 2

    family = "sparse"
    memory = "physical"
    kernel = "reference"
    name = "quest"

    def __post_init__(self) -> None:
        if int(self.page_size) < 1 or int(self.dense_layers) < 0:
            raise ValueError(f"page_size must be >= 1 and dense_layers >= 0, got {self.page_size}, {self.dense_layers}")

    def new_layer(self, layer: LayerSpec, *, batch: int, capacity: int, device: Any, dtype: Any) -> QuestStore:
        return QuestStore(layer, self, batch=batch, capacity=capacity, device=device, dtype=dtype)


class QuestStore(SparseReadStore):
    """Dense K/V plus per-page key min/max (preallocated pages; ``p_hi`` in use) and a slot -> page map."""

    index_fields = ("kmin", "kmax", "page")
    bookkeeping = (*SparseReadStore.bookkeeping, "page_len")

    def __init__(self, layer: LayerSpec, method: Quest, *, batch: int, capacity: int, device: Any, dtype: Any):
        super().__init__(layer, batch=batch, capacity=capacity, device=device, dtype=dtype,
                         merge_every=int(method.page_size))
        self.method = method
        self.dense_decode = float(method.ratio) == 0.0 or layer.layer_idx < int(method.dense_layers)
        self.p_hi = 0

    def _index_reset(self) -> None:
        ps = int(self.method.page_size)
        rest = self.capacity - self.hi
        p_cap = -(-self.hi // ps) + -(-rest // ps) + 2
        B, H, D = self.batch, self.layer.n_kv_heads, self.layer.head_dim
        self.kmin = torch.zeros(B, H, p_cap, D, dtype=self.dtype, device=self.device)  # (B, H_kv, P, D)
        self.kmax = torch.zeros(B, H, p_cap, D, dtype=self.dtype, device=self.device)  # (B, H_kv, P, D)
        self.page = torch.full((B, self.capacity), -1, dtype=torch.int32, device=self.device)  # (B, S) slot -> page
        self.page_len = torch.zeros(B, p_cap, dtype=torch.long, device=self.device)  # (B, P) tokens per page

    def _index_add(self, keys: Tensor, valid: Tensor, slots: Tensor) -> None:
        B, H, W, D = keys.shape
        ps = int(self.method.page_size)
        P = -(-W // ps)
        if self.p_hi + P > self.kmin.shape[2]:
            raise RuntimeError(f"quest page capacity {self.kmin.shape[2]} exceeded ({self.p_hi} + {P})")
        pad = P * ps - W
        v = torch.nn.functional.pad(valid, (0, pad))  # (B, P * ps): valid slots are a prefix of the window
        kp = torch.nn.functional.pad(keys, (0, 0, 0, pad)).view(B, H, P, ps, D)  # (B, H_kv, P, ps, D)
        vv = v.view(B, 1, P, ps, 1)
        inf = torch.tensor(float("inf"), device=self.device)
        lo = torch.where(vv, kp, inf).amin(3)  # (B, H_kv, P, D); empty pages: +inf, never selected
        hi = torch.where(vv, kp, -inf).amax(3)
        self.kmin[:, :, self.p_hi : self.p_hi + P] = torch.where(torch.isfinite(lo), lo, 0).to(self.dtype)
        self.kmax[:, :, self.p_hi : self.p_hi + P] = torch.where(torch.isfinite(hi), hi, 0).to(self.dtype)
        self.page_len[:, self.p_hi : self.p_hi + P] = v.view(B, P, ps).sum(-1)
        ids = self.p_hi + torch.arange(W, device=self.device) // ps  # (W,)
        old = self.page.gather(1, slots)
        self.page.scatter_(1, slots, torch.where(valid, ids[None].to(old.dtype), old))
        self.p_hi += P

    def _select(self, qg: Tensor) -> Tensor:
        B, H, G, _ = qg.shape
        ps = int(self.method.page_size)
        scores = page_scores(qg, self.kmin[:, :, : self.p_hi], self.kmax[:, :, : self.p_hi])  # (B, H_kv, G, P)
        ok = self.page_len[:, : self.p_hi] > 0  # (B, P)
        budget = torch.ceil((1.0 - float(self.method.ratio)) * self.idx_end.double() / ps).long().clamp(min=1)
        chosen = top_pages(scores, ok, budget)  # (B, H_kv, G, P)
        pg = self.page.long()  # (B, S)
        sel = chosen.gather(-1, pg.clamp(min=0)[:, None, None, :].expand(B, H, G, pg.shape[1]))  # (B, H_kv, G, S)
        return sel & (pg >= 0)[:, None, None, :]

    def _index_read_bytes(self) -> Tensor:
        pages = (self.page_len[:, : self.p_hi] > 0).sum(1).to(torch.float64)  # (B,)
        return pages * self.layer.n_kv_heads * 2 * self.layer.head_dim * self._nominal_size()

    def _index_stored_bytes(self, root: str, t: Tensor, elem: int) -> int:
        if root == "page":
            return int(self.idx_end.sum()) * elem
        return t.numel() // t.shape[2] * self.p_hi * elem
