"""``value_aware``: value-aware eviction in a fixed contract (paper 3, Zhang et al. 2026, "When Does
Value-Aware KV Eviction Help? A Fixed-Contract Diagnostic for Non-Monotone Cache Compression").

A selector split into three decision slots, each a knob, inside a fixed contract (budget, sinks,
recent window, block size, observation window, GQA combination):

- ``support`` (S1), which queries define attention: ``prefill_window`` (the context's last
  ``window`` queries, SnapKV-style) or ``decode_queries`` (the question and decode queries; the
  store re-scores its kept tokens every ``rescore_every`` decode steps and after each question
  chunk, and evicts back to the budget);
- ``ranking`` (S2): ``attention`` (attention mass A), ``value_aware`` (the leave-one-block-out
  output change dO_b = ||sum_{i in b} a_i (v_i - o)|| / (1 - A_b), combined with A by
  ``value_score``), or ``vatp`` (a_i * ||v_i||_1);
- ``projection`` (S3): ``topk`` (single tokens), ``block`` (whole blocks of ``block_size``
  tokens, best first), ``dilate`` (blocks worth the best score within ``dilation`` blocks, so the
  neighbours of a selected block come with it).

Choices the paper leaves open (docs/PAPERS.md §3, [I]), and ours:
- The exact probe formula: exact leave-one-block-out dO_b as above, per query head with the
  window-averaged attention a_i, then the query heads of a group averaged (``group_reduce``). The
  score combining A_b and dO_b is ``value_score``: ``mass_x_delta`` (A_b * dO_b, default),
  ``delta`` (dO_b alone) or ``ranksum`` (rank of A_b + rank of dO_b). No W_O projection (the
  store sees per-head values only).
- Granularity: rankings are computed at the projection's unit: single tokens for ``topk`` (dO of
  removing that token alone), blocks of ``block_size`` (16, Quest's page) for ``block`` and
  ``dilate``. Blocks are aligned on absolute positions (``pos // block_size``). Within a block the
  last tokens to fit the budget are the ones with the highest attention.
- The base contract (``scripts/experiments/fixed_contract.py``) is support ``prefill_window``, ranking
  ``attention``, projection ``block``; this method's default swaps in ``ranking=value_aware``.
- Sinks (``n_sink=4``) and the recent window (``window=32``, also the observation window) are
  always kept and count in the budget, clamped to it (sinks first).
- Budget: ``keep_count(n, ratio)`` context tokens per kv head at ``end_of_context``; with
  ``decode_queries`` support the store is re-selected to the budget function of every token seen
  (at most ``rescore_every - 1`` tokens over it between re-scorings). Physically evicted tokens
  cannot come back, so decode-side support can only re-rank what the prefill selection kept plus
  new tokens; its first selection uses the prefill window (there are no decode queries yet).
- Decode-side attention is the group-averaged softmax of each question/decode query, summed since
  the last re-scoring; ``value_aware`` re-scoring renormalises it to a distribution per head.
- No pooling by default (``pool_kernel=1``); ``pooling``/``pool_kernel`` as in SnapKV when asked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from methods.eviction import SnapKV
from methods.ragged import RescoreInput, ScoreInput
from methods.selectors import block_ids, dilate_blocks, group_reduce, leave_block_out, lex_scores, pool_scores

SUPPORTS = ("prefill_window", "decode_queries")
RANKINGS = ("attention", "value_aware", "vatp")
PROJECTIONS = ("topk", "block", "dilate")
VALUE_SCORES = ("mass_x_delta", "delta", "ranksum")


@dataclass
class ValueAware(SnapKV):
    """Fixed-contract selector with three decision slots (see the module docstring)."""

    support: str = "prefill_window"
    ranking: str = "value_aware"
    projection: str = "block"
    n_sink: int = 4
    window: int = 32
    block_size: int = 16
    dilation: int = 1
    value_score: str = "mass_x_delta"
    rescore_every: int = 16
    pool_kernel: int = 1
    pooling: str = "none"

    name: ClassVar[str] = "value_aware"
    keeps_positions: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        for knob, value, allowed in (("support", self.support, SUPPORTS), ("ranking", self.ranking, RANKINGS),
                                     ("projection", self.projection, PROJECTIONS),
                                     ("value_score", self.value_score, VALUE_SCORES)):
            if value not in allowed:
                raise ValueError(f"unknown {knob} {value!r}; use one of {allowed}")
        if int(self.block_size) < 1 or int(self.dilation) < 0 or int(self.rescore_every) < 1:
            raise ValueError("block_size and rescore_every must be >= 1 and dilation >= 0, got "
                             f"{self.block_size}, {self.rescore_every}, {self.dilation}")

    @property
    def keeps_scores(self) -> bool:  # type: ignore[override]
        return self.support == "decode_queries"

    @property
    def evicts_after_compaction(self) -> bool:
        return self.support == "decode_queries"

    def rescore_period(self) -> int:
        return int(self.rescore_every) if self.support == "decode_queries" else 0

    # -- ranking + projection on dense (B, H_kv, S) tensors ------------------------------------
    def rank(self, a: Tensor, v: Tensor, pos: Tensor, present: Tensor) -> Tensor:
        """Keep-scores of tokens from attention a (B, H_a, S) (H_a = H_q or H_kv), values
        v (B, H_kv, S, D) and positions pos (B, H_kv, S); -inf where ``present`` is False."""
        H = v.shape[1]
        unit = 1 if self.projection == "topk" else int(self.block_size)
        if unit == 1:  # each token its own unit: index by slot
            blocks = torch.arange(pos.shape[-1], device=pos.device).expand_as(pos)  # (B, H_kv, S)
        else:
            blocks = block_ids(pos.clamp(min=0), unit)  # (B, H_kv, S)
        nb = int(blocks.max()) + 1 if blocks.numel() else 1
        a_kv = group_reduce(a, H, self.group_reduce) if a.shape[1] != H else a  # (B, H_kv, S)
        if self.ranking == "attention":
            tok = a_kv
        elif self.ranking == "vatp":
            tok = a_kv * v.float().abs().sum(-1)
        else:
            tok = None
        if tok is not None:
            tok = pool_scores(tok, kernel=int(self.pool_kernel), how=self.pooling)
            if unit == 1:
                return tok.masked_fill(~present, float("-inf"))
            blk = torch.zeros(*tok.shape[:2], nb, device=tok.device).scatter_add_(2, blocks, tok)  # (B, H, nb)
        else:
            A, dO = leave_block_out(a, v, blocks, nb)  # (B, H_a, nb) each
            if self.value_score == "mass_x_delta":
                blk = A * dO
            elif self.value_score == "delta":
                blk = dO
            else:
                blk = lex_scores(A) + lex_scores(dO)  # minus the rank sum: best of both ranks first
            blk = group_reduce(blk, H, self.group_reduce) if blk.shape[1] != H else blk
            if unit == 1:
                return blk.gather(2, blocks).masked_fill(~present, float("-inf"))
        keys = [blk.gather(2, blocks)]
        if self.projection == "dilate":
            keys = [dilate_blocks(blk, int(self.dilation)).gather(2, blocks), *keys]
        key = lex_scores(*keys, a_kv.float())  # blocks best first; inside a block by attention
        return key.masked_fill(~present, float("-inf"))

    def scores(self, inp: ScoreInput) -> Tensor:
        B, H, S = inp.keys.shape[:3]
        pos = inp.positions[:, None].expand(B, H, S)  # (B, H_kv, S)
        present = pos < inp.n[:, None, None]
        return self.rank(inp.window_attn, inp.values, pos, present)

    def rescore(self, inp: RescoreInput) -> Tensor:
        a = inp.scores.masked_fill(~inp.present, 0.0)
        a = a / a.sum(-1, keepdim=True).clamp(min=1e-30)  # (B, H_kv, S) decode-side attention
        return self.rank(a, inp.values, inp.positions, inp.present)
