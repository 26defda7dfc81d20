"""The eviction baselines: small scorers in front of the ragged store (:mod:`methods.ragged`).

Every method here keeps ``keep_count(n, ratio)`` of a row's ``n`` context tokens per kv head
(:func:`methods.selectors.keep_count`; PyramidKV and AdaKV redistribute that same total across
layers or heads), compacts them physically at ``end_of_context`` and frees the prefill buffer.
Question and decode tokens are added on top, except for H2O, whose cache stays within the budget
function applied to every token seen so far (so ``ratio=0`` never evicts and equals ``full``).

Choices common to the family (docs/PAPERS.md §6 and kvpress' query-agnostic protocol):
- The context is prefilled in full (every chunk attends to every earlier context token), then
  compressed once; with ``protocol=query_aware`` the question is part of the context, so
  observation-window scorers see it.
- Keys are scored after RoPE as stored; positions stay absolute (no re-indexing).
- GQA: scorers work per kv head; the query heads of a group are combined by ``group_reduce``
  (kvpress averages them; ``mean`` is the default everywhere).
- Protected tokens (sinks, recent/observation window) count inside the budget and are clamped to
  it: sinks first, then the most recent tokens.
- Attention statistics (the window's attention, the accumulated mass) are computed by the store: in chunks of
  queries on the reference path, blockwise or by kernels on the fused path, never as a T x S matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from methods.api import LayerSpec, MethodBase
from methods.kernels import FUSED_CHOICES, use_fused
from methods.ragged import (
    EvictionPolicy,
    EvictionStore,
    FusedEvictionStore,
    RescoreInput,
    ScoreInput,
    Selection,
)
from methods.selectors import (
    GROUP_REDUCE,
    POOLING,
    adakv_budgets,
    group_reduce,
    keep_count,
    keep_count_t,
    per_row,
    pool_scores,
    protect_mask,
    pyramid_budgets,
    select_topk,
)

__all__ = ["EvictionMethod", "RandomEviction", "KNorm", "H2O", "SnapKV", "PyramidKV", "AdaKV", "VATP"]


@dataclass
class EvictionMethod(MethodBase):
    """Base of the eviction family: the store contract (:mod:`methods.ragged`: ``policy``, ``plan``,
    ``write_scores``, ``reselect``) built from a few family hooks.

    A subclass defines ``scores(inp)`` (higher = keep), reading what it needs from the
    :class:`~methods.ragged.ScoreInput` (keys, values, positions, the observation window's attention, the
    accumulated mass, the layer), and when it needs them the observers (``observe_window``, ``observe_mass``) and a
    budget allocation (``budgets``). ``fused`` picks the store: ``auto`` = :class:`~methods.ragged.FusedEvictionStore`
    on CUDA (Triton kernels, CUDA-graph decode), the reference :class:`~methods.ragged.EvictionStore` elsewhere;
    ``on`` insists (CPU: under ``TRITON_INTERPRET=1``), ``off`` never.
    """

    ratio: float = 0.5

    family: ClassVar[str] = "eviction"
    memory: ClassVar[str] = "physical"
    kernel: ClassVar[str] = "fused"  # has a fused path; rows record the path that actually ran
    keeps_positions: ClassVar[bool] = False  # store each kept token's position (recency, blocks)
    keeps_scores: ClassVar[bool] = False  # store a per-token score updated during decode
    scores_on_write: ClassVar[bool] = False  # write_scores gives a new token its own score (LKV); else it starts at 0

    n_sink: int = 0
    window: int = 0
    fused: str = "auto"

    def __post_init__(self) -> None:
        if int(self.n_sink) < 0 or int(self.window) < 0:
            raise ValueError(f"n_sink and window must be >= 0, got {self.n_sink}, {self.window}")
        if getattr(self, "group_reduce", "mean") not in GROUP_REDUCE:
            raise ValueError(f"unknown group_reduce {self.group_reduce!r}; use one of {GROUP_REDUCE}")
        if self.fused not in FUSED_CHOICES:
            raise ValueError(f"fused must be one of {FUSED_CHOICES}, got {self.fused!r}")

    def new_layer(self, layer: LayerSpec, *, batch: int, capacity: int, device: Any, dtype: Any) -> EvictionStore:
        cls = FusedEvictionStore if use_fused(self.fused, device, FusedEvictionStore.supports(layer)) else EvictionStore
        return cls(layer, self, batch=batch, capacity=capacity, device=device, dtype=dtype)

    # -- the store contract -----------------------------------------------------------------------
    def policy(self, layer: LayerSpec) -> EvictionPolicy:
        keeps_scores = bool(self.keeps_scores)
        return EvictionPolicy(
            ratio=float(self.ratio), scores_written=bool(self.scores_on_write),
            observe_window=int(self.observe_window()), observe_mass=bool(self.observe_mass()),
            group_reduce=getattr(self, "group_reduce", "mean"), n_sink=int(self.n_sink),
            keeps_positions=bool(self.keeps_positions), keeps_scores=keeps_scores,
            accumulates_attention=keeps_scores and bool(self.accumulates_attention),
            evicts_in_decode=bool(self.evicts_in_decode), evicts_after_compaction=bool(self.evicts_after_compaction),
            rescore_every=int(self.rescore_period()),
        )

    def plan(self, inp: ScoreInput) -> Selection:
        """Which prefill slots each (row, kv head) keeps: the protected ones, then the highest scores."""
        scores = self.scores(inp).float().masked_fill(inp.empty, float("-inf"))  # (B, H_kv, S)
        budget, protected = self.budgets(inp, scores)
        return Selection(keep=select_topk(scores, protected, budget), budget=budget,
                         recent=self.recent_window(budget),
                         scores=self.carried_scores(inp) if self.keeps_scores else None)

    def write_scores(self, layer: LayerSpec, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        """(B, H_kv, T) score a token starts with when it is written after compaction (default 0;
        a query-agnostic scorer such as LKV's gives its own). k, v (B, H_kv, T, D) post-RoPE;
        positions (B, T). Runs inside the decode step: device ops only."""
        return torch.zeros(k.shape[:3], dtype=torch.float32, device=k.device)

    def reselect(self, inp: RescoreInput) -> Tensor:
        """Re-select after compaction (kept + new tokens) down to ``inp.budget``: sinks and recent window by
        position, then the highest :meth:`rescore`."""
        pos, present, budget = inp.positions, inp.present, inp.budget
        assert pos is not None and inp.scores is not None, "reselect needs positions and scores"
        last = pos.masked_fill(~present, -1).amax(-1, keepdim=True)  # (B, H, 1)
        recent = self.recent_window(budget)[..., None]  # (B, H, 1)
        sinks = torch.clamp(budget, max=int(self.n_sink))[..., None]
        protected = present & ((pos < sinks) | (pos > last - recent))
        key = self.rescore(inp).float()
        return select_topk(key.masked_fill(~present, float("-inf")), protected, budget)

    # -- family hooks -----------------------------------------------------------------------------
    @property
    def evicts_in_decode(self) -> bool:
        """Evict one token per decode step on device once over budget (H2O)."""
        return False

    @property
    def evicts_after_compaction(self) -> bool:
        """Re-select down to the budget when multi-token chunks or re-scoring repack the store."""
        return self.evicts_in_decode

    @property
    def accumulates_attention(self) -> bool:
        """Kept scores grow with the attention each decode query (and question chunk) pays them (H2O)."""
        return True

    def rescore_period(self) -> int:
        """Decode steps between re-scorings of the kept tokens (0 = never)."""
        return 0

    def observe_window(self) -> int:
        """How many of the context's last queries the store observes for scoring (0 = none)."""
        return 0

    def observe_mass(self) -> bool:
        """Whether the store accumulates the attention every key receives during prefill."""
        return False

    def scores(self, inp: ScoreInput) -> Tensor:
        """(B, H_kv, S) scores of the prefill slots, higher = keep."""
        raise NotImplementedError

    def uniform_budget(self, inp: ScoreInput) -> Tensor:
        """(B,) tokens per head each row keeps on average: the budget function."""
        return keep_count_t(inp.n.long(), float(self.ratio))

    def recent_window(self, budget: Tensor) -> Tensor:
        """(B, H_kv) most recent tokens protected from eviction (clamped to the budget)."""
        return torch.clamp(budget - int(self.n_sink), min=0).minimum(torch.full_like(budget, int(self.window)))

    def budgets(self, inp: ScoreInput, scores: Tensor) -> tuple[Tensor, Tensor]:
        """(B, H_kv) budgets and the (B, H_kv, S) protected tokens: uniform over heads and layers."""
        budget = self.uniform_budget(inp)[:, None].expand(-1, inp.layer.n_kv_heads).contiguous()
        return budget, self.protect(inp.n, budget, scores.shape[-1])

    def protect(self, n: Tensor, budget: Tensor, n_slots: int) -> Tensor:
        return protect_mask(n, budget, n_slots=n_slots, n_sink=self.n_sink, window=self.recent_window(budget))

    def carried_scores(self, inp: ScoreInput) -> Tensor:
        """(B, H_kv, S) per-token scores a method that keeps scores starts decode with (default 0)."""
        return torch.zeros(inp.keys.shape[:3], device=inp.keys.device)

    def reduce_mass(self, mass: Tensor, n_kv_heads: int) -> Tensor:
        """Attention (B, H_q, S) -> (B, H_kv, S), the group's query heads combined by ``group_reduce``."""
        return group_reduce(mass, n_kv_heads, getattr(self, "group_reduce", "mean"))

    def rescore(self, inp: RescoreInput) -> Tensor:
        """Scores of kept + new tokens when re-selecting (default: the accumulated score)."""
        return inp.scores


def _fraction_window(budget: Tensor, n_sink: int, frac: float) -> Tensor:
    """H2O's recent window: ``frac`` of the budget (rounded half up), within what the sinks leave."""
    recent = torch.floor(budget.double() * float(frac) + 0.5).long()
    return torch.minimum(recent, budget - torch.clamp(budget, max=int(n_sink)))


def _seeded(seed: int, layer_idx: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(layer_idx))


@dataclass
class RandomEviction(EvictionMethod):
    """``random``: keep a uniformly random subset of the context (a floor every scorer must beat).

    Choices: the draw is seeded by ``seed`` and the layer (the same for every sample of a given
    length, so runs are reproducible); no sinks or window unless asked (``n_sink``, ``window``)."""

    seed: int = 0

    name: ClassVar[str] = "random"

    def scores(self, inp: ScoreInput) -> Tensor:
        shape = inp.keys.shape[:3]  # (B, H_kv, S)
        return torch.rand(shape, generator=_seeded(self.seed, inp.layer.layer_idx)).to(inp.keys.device)


@dataclass
class KNorm(EvictionMethod):
    """``knorm``: keep the keys with the smallest L2 norm (Devoto et al. 2024, "A Simple and
    Effective L2 Norm-Based Strategy for KV Cache Compression"; kvpress ``KnormPress``).

    Choices: norms of the post-RoPE keys as stored (RoPE rotates pairs of channels, so the norm is
    the same before and after); no sinks or window by default, as in kvpress."""

    name: ClassVar[str] = "knorm"

    def scores(self, inp: ScoreInput) -> Tensor:
        return -per_row(lambda k: k.float().norm(dim=-1), inp.keys)  # (B, H_kv, S), one row's fp32 copy at a time


@dataclass
class H2O(EvictionMethod):
    """``h2o``: heavy hitters + a recent window (Zhang et al., NeurIPS 2023, "H2O: Heavy-Hitter
    Oracle"), evicting during decode too.

    A token's score is the attention it has received from every query so far (context queries during
    prefill, in chunks; then each question and decode query). The budget splits into a recent
    window (``recent_frac`` of it, H2O's 50/50 split) and the highest-score other tokens.

    Choices the paper leaves open, and ours:
    - Budget during decode: the budget function applied to every token the row has seen, so the
      cache never exceeds it (one eviction per step when a new token takes it over) and ``ratio=0``
      never evicts. The new token attends before the eviction, as in H2O.
    - GQA: the attention of a group's query heads is averaged (``group_reduce``).
    - Scores are unnormalised sums (older tokens have had more queries), as in H2O; ties go to the
      earlier slot. Per-token scores (float32) and positions (int32) are stored and counted.
    - ``evict_in_decode=false`` freezes the cache after ``end_of_context`` (prefill-only H2O)."""

    recent_frac: float = 0.5
    group_reduce: str = "mean"
    evict_in_decode: bool = True

    name: ClassVar[str] = "h2o"
    keeps_positions: ClassVar[bool] = True
    keeps_scores: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= float(self.recent_frac) <= 1.0:
            raise ValueError(f"recent_frac must be in [0, 1], got {self.recent_frac}")

    @property
    def evicts_in_decode(self) -> bool:
        return bool(self.evict_in_decode)

    def observe_mass(self) -> bool:
        return True

    def recent_window(self, budget: Tensor) -> Tensor:
        return _fraction_window(budget, self.n_sink, self.recent_frac)

    def scores(self, inp: ScoreInput) -> Tensor:
        return self.reduce_mass(inp.mass, inp.layer.n_kv_heads)

    def carried_scores(self, inp: ScoreInput) -> Tensor:
        return self.scores(inp)


@dataclass
class SnapKV(EvictionMethod):
    """``snapkv``: observation-window attention, pooled (Li et al., NeurIPS 2024, "SnapKV: LLM
    Knows What You are Looking for Before Generation").

    The last ``window`` queries of the context attend (causally) to it; their softmax weights,
    averaged over the window and over the query heads of a group, are pooled along the tokens
    (``pooling`` with ``pool_kernel``); each kv head keeps the window plus its top-scoring tokens.

    Choices: the paper's defaults (window 32, kernel 7, max pooling; KVCache-Factory uses 64, 5,
    avg); the window counts in the budget (C = (C - w) selected + w window); GQA heads averaged
    (kvpress); no sinks (``n_sink=0``)."""

    window: int = 32
    pool_kernel: int = 7
    pooling: str = "max"
    group_reduce: str = "mean"

    name: ClassVar[str] = "snapkv"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pooling not in POOLING:
            raise ValueError(f"unknown pooling {self.pooling!r}; use one of {POOLING}")
        if int(self.window) < 1:
            raise ValueError(f"{self.name} needs an observation window of >= 1 query, got {self.window}")

    def observe_window(self) -> int:
        return int(self.window)

    def scores(self, inp: ScoreInput) -> Tensor:
        a = self.reduce_mass(inp.window_attn, inp.layer.n_kv_heads)  # (B, H_kv, S)
        return pool_scores(a, kernel=int(self.pool_kernel), how=self.pooling)


@dataclass
class PyramidKV(SnapKV):
    """``pyramidkv``: SnapKV scores with layer budgets decreasing linearly with depth (Cai et al.
    2024, "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling").

    Outside the window, layer l keeps max - l (max - min) / (L - 1) tokens per head, with
    min = (C - w) / ``beta`` and max = 2 (C - w) - min (``beta=20`` as in KVCache-Factory).

    Choices: integer budgets by largest remainder so the layers sum to exactly L x C (the budget
    function's total); a layer can hold at most its context, what it cannot hold goes to the
    others (at low ratios the top of the pyramid is clipped)."""

    beta: float = 20.0

    name: ClassVar[str] = "pyramidkv"

    def __post_init__(self) -> None:
        super().__post_init__()
        if float(self.beta) <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")

    def uniform_budget(self, inp: ScoreInput) -> Tensor:
        li, L = inp.layer.layer_idx, inp.layer.n_layers
        out = [pyramid_budgets(x, keep_count(x, self.ratio), n_layers=L, window=self.window, beta=self.beta)[li]
               if x > 0 else 0 for x in inp.n.tolist()]
        return torch.tensor(out, dtype=torch.long, device=inp.n.device)


@dataclass
class AdaKV(SnapKV):
    """``adakv``: head-adaptive budgets inside each layer over SnapKV scores (Feng et al. 2024,
    "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation"; kvpress ``AdaKVPress``).

    The layer's H x C tokens go to the highest scores of all its kv heads pooled, after each head
    got its window and a safeguard of ``floor(alpha_safeguard * C)`` of its own top tokens. The
    store is physically ragged: each head holds exactly its own budget.

    Choices: the safeguard default 0.2 as in kvpress; scores are comparable across heads because
    each is a softmax average; layer budgets uniform (the budget function per layer)."""

    alpha_safeguard: float = 0.2

    name: ClassVar[str] = "adakv"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= float(self.alpha_safeguard) <= 1.0:
            raise ValueError(f"alpha_safeguard must be in [0, 1], got {self.alpha_safeguard}")

    def budgets(self, inp: ScoreInput, scores: Tensor) -> tuple[Tensor, Tensor]:
        uniform, protected = super().budgets(inp, scores)
        budget = adakv_budgets(scores, uniform[:, 0], protected, alpha=float(self.alpha_safeguard))
        return budget.to(inp.n.device), protected


@dataclass
class VATP(SnapKV):
    """``vatp``: value-aware token pruning, attention x value L1 norm (Guo, Kamigaito, Watanabe,
    EMNLP 2024, "Attention Score is not All You Need for Token Importance Indicator in KV Cache
    Reduction: Value Also Matters").

    Token score = a_i * ||v_i||_1 per kv head, where a_i is the accumulated attention of every
    context query (``support=accumulated``, H2O's, the paper's main setting) or the observation
    window's (``support=window``, SnapKV's). Attention sinks are always kept (``n_sink=4``): the paper
    notes they have tiny value norms and must not be evicted.

    Choices: with accumulated support the recent window is H2O's half of the budget
    (``recent_frac``); with window support the protected window is ``window``; no pooling by
    default; compression once at ``end_of_context`` (no decode-time eviction)."""

    support: str = "accumulated"
    n_sink: int = 4
    recent_frac: float = 0.5
    pool_kernel: int = 1
    pooling: str = "none"

    name: ClassVar[str] = "vatp"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.support not in ("accumulated", "window"):
            raise ValueError(f"unknown support {self.support!r}; use accumulated or window")

    def observe_window(self) -> int:
        return int(self.window) if self.support == "window" else 0

    def observe_mass(self) -> bool:
        return self.support == "accumulated"

    def recent_window(self, budget: Tensor) -> Tensor:
        if self.support == "window":
            return super().recent_window(budget)
        return _fraction_window(budget, self.n_sink, self.recent_frac)

    def scores(self, inp: ScoreInput) -> Tensor:
        a = self.reduce_mass(inp.window_attn if self.support == "window" else inp.mass, inp.layer.n_kv_heads)
        s = a * per_row(lambda v: v.float().abs().sum(-1), inp.values)  # (B, H_kv, S)
        return pool_scores(s, kernel=int(self.pool_kernel), how=self.pooling)
