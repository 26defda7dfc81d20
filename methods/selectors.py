"""Shared parts of the eviction family: the budget arithmetic and small pure-tensor scorers.

Everything here works on dense ``(B, H, S, ...)`` tensors whose slot axis holds one row's tokens in
position order (the prefill buffer of an eviction store, or a padded view of a ragged store), with
a ``present`` mask for the slots that hold a token. Scores are "higher = keep".

Budget arithmetic lives in :func:`keep_count` (and its tensor twin :func:`keep_count_t`): the
number of tokens a row of ``n`` tokens keeps at compression ``ratio`` is ``n * (1 - ratio)``
rounded half up, computed in exact integers from the decimal ``ratio`` the user typed (so
``ratio=0.9`` of 10 tokens keeps 1, where ``int(10 * (1 - 0.9))`` gives 0), and at least 1 when
``n >= 1``. Layer (PyramidKV) and head (AdaKV) allocations redistribute that same total exactly.
"""

from __future__ import annotations

from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ratio_fraction", "keep_count", "keep_count_t", "pyramid_budgets", "adakv_budgets", "protect_mask",
    "lex_scores", "select_topk", "group_reduce", "pool_scores", "window_attention", "attention_mass", "block_ids",
    "block_reduce", "leave_block_out", "dilate_blocks", "per_row",
]

GROUP_REDUCE = ("mean", "max", "sum")
POOLING = ("max", "avg", "none")


# -- budget arithmetic ----------------------------------------------------------------------------
def ratio_fraction(ratio: float) -> Fraction:
    """The ratio as an exact fraction of its shortest decimal form (0.9 -> 9/10, not 0.900000000000000022)."""
    r = Fraction(repr(float(ratio)))
    if not 0 <= r < 1:
        raise ValueError(f"an eviction ratio is the fraction of tokens removed, in [0, 1); got {ratio}")
    return r


def keep_count(n: int, ratio: float) -> int:
    """Tokens a row of ``n`` tokens keeps at ``ratio``: round-half-up of n * (1 - ratio), >= 1 if n >= 1."""
    r = ratio_fraction(ratio)
    n = int(n)
    if n <= 0:
        return 0
    keep_num = r.denominator - r.numerator  # keep fraction = keep_num / den
    kept = (2 * n * keep_num + r.denominator) // (2 * r.denominator)
    return max(1, min(n, kept))


def keep_count_t(n: Tensor, ratio: float) -> Tensor:
    """:func:`keep_count` on an int64 tensor, elementwise, on the tensor's device (no host sync)."""
    r = ratio_fraction(ratio)
    den, keep_num = r.denominator, r.denominator - r.numerator
    kept = torch.div(2 * n * keep_num + den, 2 * den, rounding_mode="floor")
    return torch.where(n > 0, kept.clamp(min=1).minimum(n), torch.zeros_like(n))


def _largest_remainder(targets: list[Fraction], total: int, caps: list[int]) -> list[int]:
    """Integers summing to ``total`` (when the caps allow), each <= its cap, closest to ``targets``:
    floors first, then one more to the largest remainders; whatever a cap clips is handed on."""
    out = [min(cap, max(0, int(t))) for t, cap in zip(targets, caps)]
    left = total - sum(out)
    while left > 0:
        order = sorted(range(len(out)), key=lambda i: (-(targets[i] - out[i]), i))
        moved = 0
        for i in order:
            if left == 0:
                break
            if out[i] < caps[i]:
                out[i] += 1
                left -= 1
                moved += 1
        if moved == 0:
            break
    return out


def pyramid_budgets(n: int, per_layer: int, *, n_layers: int, window: int, beta: float) -> list[int]:
    """PyramidKV's layer budgets for a row of ``n`` context tokens whose uniform budget is
    ``per_layer`` tokens per head: outside the window, layer l gets max - l (max - min) / (L - 1)
    with min = (C - w) / beta and max = 2 (C - w) - min, C = per_layer; then integers by largest
    remainder so the layers sum to exactly ``n_layers * per_layer`` (each layer at most ``n``;
    what a layer cannot hold goes to the others)."""
    C, L = int(per_layer), int(n_layers)
    w = min(int(window), C)
    body = C - w
    if L == 1 or body == 0:
        return [C] * L
    lo = Fraction(body) / Fraction(repr(float(beta)))
    hi = 2 * body - lo
    targets = [hi - Fraction(layer) * (hi - lo) / (L - 1) for layer in range(L)]
    bodies = _largest_remainder(targets, L * body, [max(0, int(n) - w)] * L)
    return [w + b for b in bodies]


def adakv_budgets(scores: Tensor, budget: Tensor, protected: Tensor, *, alpha: float) -> Tensor:
    """AdaKV head-adaptive budgets inside one layer (safeguard ``alpha``).

    scores (B, H, S) (-inf where no token); budget (B,) tokens per head on average; protected
    (B, H, S) bool, tokens every head keeps anyway (counted in its budget). Each head gets its
    protected tokens plus at least ``floor(alpha * budget)`` more of its own top tokens (the
    safeguard), and the rest of the layer's ``H * budget`` goes to the highest scores of all heads
    pooled. Returns (B, H) int64 budgets summing to H * budget per row.
    """
    B, H, S = scores.shape
    out = torch.zeros(B, H, dtype=torch.long)
    for b in range(B):
        C = int(budget[b])
        n = int((scores[b, 0] > float("-inf")).sum())
        prot = protected[b].sum(-1).cpu()  # (H,)
        floor = torch.clamp(prot + int(alpha * C), max=C)  # (H,)
        s = scores[b].float().masked_fill(protected[b], float("inf"))  # (H, S)
        order = s.argsort(dim=-1, descending=True, stable=True)  # (H, S)
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(S).expand(H, S).to(order))
        taken = rank < floor[:, None].to(rank.device)  # (H, S) safeguard picks
        rest = min(H * C, H * n) - int(floor.sum())
        if rest > 0:
            pool = s.masked_fill(taken, float("-inf")).flatten()  # (H * S,)
            top = pool.argsort(descending=True, stable=True)[:rest]
            extra = torch.zeros(H * S, dtype=torch.long, device=s.device)
            extra[top] = 1
            out[b] = floor + extra.view(H, S).sum(-1).cpu()
        else:
            out[b] = floor
    return out


def protect_mask(n: Tensor, budget: Tensor, *, n_slots: int, n_sink: int, window: int | Tensor) -> Tensor:
    """Sinks (the first ``n_sink`` tokens) and the recent window (the last ``window``, an int or
    (B, H)), clamped so they never exceed the budget: sinks first, then the most recent tokens.

    n (B,) tokens per row; budget (B, H) -> (B, H, S) bool.
    """
    s = torch.arange(n_slots, device=n.device)  # (S,)
    sinks = torch.clamp(budget, max=int(n_sink))  # (B, H)
    win = torch.minimum(budget - sinks, torch.as_tensor(window, device=budget.device).expand_as(budget))  # (B, H)
    n_ = n[:, None, None]  # (B, 1, 1)
    return (s < sinks[..., None]) | ((s >= n_ - win[..., None]) & (s < n_))  # (B, H, S)


def lex_scores(*keys: Tensor) -> Tensor:
    """One score ordering tokens lexicographically by ``keys`` (first key first, higher better),
    each (B, H, S): the negated rank, float32 (exact for S < 2**24)."""
    S = keys[0].shape[-1]
    order = keys[-1].argsort(dim=-1, descending=True, stable=True)  # (B, H, S)
    for key in reversed(keys[:-1]):
        order = order.gather(-1, key.gather(-1, order).argsort(dim=-1, descending=True, stable=True))
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(S, device=order.device).expand_as(order))
    return -rank.float()


def select_topk(scores: Tensor, protected: Tensor, budget: Tensor) -> Tensor:
    """Keep ``budget`` tokens per head: the protected ones, then the highest scores (earlier token
    first on ties). scores (B, H, S) (-inf = no token); protected (B, H, S); budget (B, H) ->
    (B, H, S) bool with exactly min(budget, tokens) True per head."""
    s = scores.float().masked_fill(protected, float("inf"))
    order = s.argsort(dim=-1, descending=True, stable=True)  # (B, H, S)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(s.shape[-1], device=s.device).expand_as(order))
    return (rank < budget[..., None].to(rank.device)) & (scores > float("-inf"))


# -- scorers --------------------------------------------------------------------------------------
def per_row(fn, *xs: Tensor) -> Tensor:
    """``fn`` applied to each batch row of ``xs`` (each (B, ...)) and stacked: the same values as ``fn(*xs)`` for
    a row-wise ``fn``, with one row's temporaries at a time (a float32 copy of 8 x 32K keys would be 1 GB)."""
    return torch.stack([fn(*(x[b] for x in xs)) for b in range(xs[0].shape[0])])


def group_reduce(x: Tensor, n_kv_heads: int, how: str = "mean") -> Tensor:
    """Combine the query heads of each GQA group: x (B, H_q, ...) -> (B, H_kv, ...)."""
    B, H_q = x.shape[:2]
    g = x.reshape(B, n_kv_heads, H_q // n_kv_heads, *x.shape[2:])
    if how == "mean":
        return g.mean(2)
    if how == "max":
        return g.amax(2)
    if how == "sum":
        return g.sum(2)
    raise ValueError(f"unknown group_reduce {how!r}; use one of {GROUP_REDUCE}")


def pool_scores(scores: Tensor, *, kernel: int, how: str) -> Tensor:
    """SnapKV's 1-D pooling along the token axis (stride 1, same length): (B, H, S) -> (B, H, S)."""
    if how == "none" or kernel <= 1:
        return scores
    B, H, S = scores.shape
    x = scores.reshape(B * H, 1, S)
    if how == "max":
        y = F.max_pool1d(x, kernel, stride=1, padding=kernel // 2)
    elif how == "avg":
        y = F.avg_pool1d(x, kernel, stride=1, padding=kernel // 2)
    else:
        raise ValueError(f"unknown pooling {how!r}; use one of {POOLING}")
    return y[..., :S].reshape(B, H, S)


def window_attention(q_win: Tensor, win_slot: Tensor, k: Tensor, n: Tensor, *, scaling: float) -> Tensor:
    """Softmax attention of observation-window queries over the stored keys (causal inside the
    window), averaged over the window's queries, per query head.

    q_win (B, H_q, W, D); win_slot (B, W) slot of each query (-1 = none); k (B, H_kv, S, D);
    n (B,) stored tokens per row -> (B, H_q, S) float32 (0 on empty slots). W x S, never S x S.
    """
    B, H_q, W, D = q_win.shape
    H_kv, S = k.shape[1], k.shape[2]
    kk = k.float().repeat_interleave(H_q // H_kv, dim=1)  # (B, H_q, S, D)
    logits = torch.einsum("bhwd,bhsd->bhws", q_win.float(), kk) * scaling  # (B, H_q, W, S)
    s = torch.arange(S, device=k.device)
    ok = (s[None, None, :] <= win_slot[:, :, None]) & (s[None, None, :] < n[:, None, None])  # (B, W, S)
    probs = torch.softmax(logits.masked_fill(~ok[:, None], float("-inf")), dim=-1)
    has = (win_slot >= 0).float()  # (B, W)
    probs = torch.nan_to_num(probs, nan=0.0) * has[:, None, :, None]
    return probs.sum(2) / has.sum(1).clamp(min=1)[:, None, None]  # (B, H_q, S)


def attention_mass(q: Tensor, k: Tensor, visible: Tensor, *, scaling: float, chunk: int = 256) -> Tensor:
    """Attention each key receives, summed over the queries: softmax(q k^T) column sums, per query
    head, computed ``chunk`` queries at a time (never all T x S at once).

    q (B, H_q, T, D); k (B, H_kv, S, D); visible (B, 1 | H_kv, T, S) bool -> (B, H_q, S) float32.
    Queries with no visible key (padding) contribute nothing.
    """
    B, H_q, T, D = q.shape
    H_kv, S = k.shape[1], k.shape[2]
    G = H_q // H_kv
    out = torch.zeros(B, H_q, S, dtype=torch.float32, device=q.device)
    kk = k.float()
    for t0 in range(0, T, chunk):
        qc = q[:, :, t0 : t0 + chunk].float().reshape(B, H_kv, G, -1, D)  # (B, H_kv, G, t, D)
        logits = torch.einsum("bhgtd,bhsd->bhgts", qc, kk) * scaling  # (B, H_kv, G, t, S)
        vis = visible[:, :, t0 : t0 + chunk][:, :, None]  # (B, 1|H_kv, 1, t, S)
        probs = torch.nan_to_num(torch.softmax(logits.masked_fill(~vis, float("-inf")), dim=-1), nan=0.0)
        out += probs.sum(3).reshape(B, H_q, S)
    return out


def block_ids(pos: Tensor, block_size: int) -> Tensor:
    """Block of each token from its absolute position: pos (...) -> (...) int64."""
    return torch.div(pos, int(block_size), rounding_mode="floor")


def block_reduce(x: Tensor, blocks: Tensor, n_blocks: int) -> Tensor:
    """Sum x (B, H, S, ...) over tokens of each block: blocks (B, H, S) -> (B, H, n_blocks, ...)."""
    shape = (*x.shape[:2], n_blocks, *x.shape[3:])
    idx = blocks.reshape(*blocks.shape, *([1] * (x.dim() - 3))).expand_as(x)
    return torch.zeros(shape, dtype=x.dtype, device=x.device).scatter_add_(2, idx, x)


def leave_block_out(a: Tensor, v: Tensor, blocks: Tensor, n_blocks: int, *, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Attention mass A_b and exact leave-one-block-out output change dO_b of each block
    (docs/PAPERS.md §3): with o = sum_i a_i v_i, removing block b and renormalising changes the output by
    ||sum_{i in b} a_i (v_i - o)|| / (1 - A_b).

    a (B, H_q, S) attention (0 where no token); v (B, H_kv, S, D); blocks (B, H_kv, S) ->
    (A, dO), each (B, H_q, n_blocks) float32. Loops over the query heads of a group, so the
    temporary is one row of V.
    """
    B, H_q, S = a.shape
    H_kv = v.shape[1]
    G = H_q // H_kv
    A = torch.zeros(B, H_q, n_blocks, dtype=torch.float32, device=a.device)
    dO = torch.zeros_like(A)
    ag = a.float().reshape(B, H_kv, G, S)
    for b in range(B):  # one row's float32 values at a time
        vf = v[b : b + 1].float()  # (1, H_kv, S, D)
        for g in range(G):
            ai = ag[b : b + 1, :, g]  # (1, H_kv, S)
            o = torch.einsum("bhs,bhsd->bhd", ai, vf)  # (1, H_kv, D)
            contrib = ai[..., None] * (vf - o[:, :, None])  # (1, H_kv, S, D)
            num = block_reduce(contrib, blocks[b : b + 1], n_blocks).norm(dim=-1)  # (1, H_kv, nb)
            mass = block_reduce(ai, blocks[b : b + 1], n_blocks)  # (1, H_kv, nb)
            A.view(B, H_kv, G, n_blocks)[b : b + 1, :, g] = mass
            dO.view(B, H_kv, G, n_blocks)[b : b + 1, :, g] = num / (1 - mass).clamp(min=eps)
    return A, dO


def dilate_blocks(block_scores: Tensor, radius: int) -> Tensor:
    """Coupling-preserving projection: a block is worth the best score within ``radius`` blocks of
    it, so the neighbours of a selected block are selected with it (its own score breaks ties).
    (B, H, nb) -> (B, H, nb)."""
    if radius <= 0:
        return block_scores
    B, H, nb = block_scores.shape
    x = block_scores.reshape(B * H, 1, nb)
    y = F.max_pool1d(x, 2 * radius + 1, stride=1, padding=radius)[..., :nb].reshape(B, H, nb)
    return y
