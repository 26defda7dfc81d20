"""Prefill-time attention statistics of the eviction family without a (T x S) attention matrix (issue 21, item 2).

Two statistics feed the scorers (:class:`methods.ragged.ScoreInput`):

- the *observation window*'s attention (SnapKV, PyramidKV, AdaKV, VATP-window, value_aware): the softmax weights
  of the context's last W queries over the stored keys, averaged over the window, per query head.
  :func:`window_attention_blockwise` computes it in two passes over blocks of keys (a running max and sum per
  query, then the normalised weights block by block), so the working set is (B, H_q, W, block), never the
  (B, H_q, S, D) copy of the keys that a one-shot einsum over repeated heads takes;
- the *accumulated mass* (H2O, VATP): the attention each key receives from every context query, summed over the
  queries. A chunk of T queries over S keys would be a (B, H_q, T, S) softmax. :func:`prefill_attention_lse`
  computes the chunk's attention output (the prefill step needs it anyway) and each query's log-sum-exp in one
  FlashAttention-style kernel; :func:`accumulate_mass` then walks key tiles and streams the query tiles that see
  them, adding ``exp2(s - lse)`` column sums (the transpose of the forward loop, as FlashAttention's backward
  computes dK). Memory: the lse (B, H_q, T) and the mass (B, H_q, S) itself; compute: one more QK^T pass.
  :func:`attention_mass_blockwise` is the torch version with bounded memory for any visibility (padded batches,
  question chunks after compaction) and the kernels' reference.

``max_elems`` bounds the largest temporary of the torch versions (float32 elements; default 2**24 = 64 MiB).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from . import interpret_mode, interpreter_compat

LOG2E = 1.4426950408889634
MAX_ELEMS = 1 << 24

__all__ = ["window_attention_blockwise", "attention_mass_blockwise", "prefill_attention_lse",
           "prefill_attention_lse_reference", "accumulate_mass", "slot_visibility"]


def _block(total_other: int, n: int, max_elems: int, minimum: int = 16) -> int:
    """Block length along an axis of ``n`` so that ``total_other * block <= max_elems`` (at least ``minimum``)."""
    return max(1, min(n, max(minimum, max_elems // max(1, total_other))))


def window_attention_blockwise(q_win: Tensor, win_slot: Tensor, k: Tensor, n: Tensor, *, scaling: float,
                               max_elems: int = MAX_ELEMS) -> Tensor:
    """:func:`methods.selectors.window_attention` in blocks of keys: q_win (B, H_q, W, D); win_slot (B, W) slot of
    each window query (-1 = none); k (B, H_kv, S, D); n (B,) stored tokens per row -> (B, H_q, S) float32, the
    softmax weights (causal inside the window: a query at slot w sees slots <= w and < n) averaged over each row's
    window queries (0 on empty slots)."""
    B, H_q, W, D = q_win.shape
    H_kv, S = k.shape[1], k.shape[2]
    G = H_q // H_kv
    qg = q_win.float().reshape(B, H_kv, G * W, D)  # (B, H_kv, G W, D): entry g W + w
    slot = win_slot[:, None, :].expand(B, G, W).reshape(B, 1, G * W, 1)  # (B, 1, G W, 1)
    lim = n.view(B, 1, 1, 1)
    blk = _block(B * H_q * W * 2, S, max_elems)
    m = torch.full((B, H_kv, G * W, 1), float("-inf"), device=k.device)
    den = torch.zeros(B, H_kv, G * W, 1, device=k.device)

    def logits(s0: int) -> Tensor:
        kb = k[:, :, s0 : s0 + blk].float()  # (B, H_kv, b, D)
        x = torch.matmul(qg, kb.transpose(-1, -2)) * scaling  # (B, H_kv, G W, b)
        s = torch.arange(s0, s0 + kb.shape[2], device=k.device)
        return x.masked_fill(~((s <= slot) & (s < lim)), float("-inf"))

    for s0 in range(0, S, blk):  # pass 1: running max and sum per window query
        x = logits(s0)
        m_new = torch.maximum(m, x.amax(-1, keepdim=True))
        safe = torch.where(torch.isfinite(m_new), m_new, 0.0)
        den = den * torch.exp(m - safe) + torch.exp(x - safe).sum(-1, keepdim=True)
        m = m_new
    lse = torch.where(den > 0, m + torch.log(den.clamp(min=1e-38)), float("inf"))  # no visible key: weights 0
    has = (win_slot >= 0).float()  # (B, W)
    weight = (has / has.sum(1, keepdim=True).clamp(min=1))[:, None].expand(B, G, W).reshape(B, 1, G * W, 1)
    out = torch.empty(B, H_q, S, dtype=torch.float32, device=k.device)
    for s0 in range(0, S, blk):  # pass 2: normalised weights, averaged over the window
        p = torch.exp(logits(s0) - lse) * weight  # (B, H_kv, G W, b)
        out[:, :, s0 : s0 + blk] = p.reshape(B, H_kv, G, W, -1).sum(3).reshape(B, H_q, -1)
    return out


def slot_visibility(dest: Tensor, limit: Tensor, valid: Tensor) -> Callable[[int, int], Tensor]:
    """Visibility of the in-order slot layout, by blocks: a valid query at slot ``dest[b, t]`` sees slots
    <= its own and < ``limit[b]``; padding queries see nothing. -> fn(t0, t1, s0, s1) -> (B, 1, t, s) bool."""

    def vis(t0: int, t1: int, s0: int, s1: int) -> Tensor:
        s = torch.arange(s0, s1, device=dest.device)
        d = dest[:, t0:t1, None]
        return ((s <= d) & (s < limit[:, None, None]) & valid[:, t0:t1, None])[:, None]

    return vis


def attention_mass_blockwise(q: Tensor, k: Tensor, visible: Callable[[int, int, int, int], Tensor], *,
                             scaling: float, max_elems: int = MAX_ELEMS) -> Tensor:
    """:func:`methods.selectors.attention_mass` with bounded memory: q (B, H_q, T, D); k (B, H_kv, S, D);
    ``visible(t0, t1, s0, s1)`` -> (B, 1 | H_kv, t, s) bool, which keys each query sees -> (B, H_q, S) float32,
    the softmax weights summed over the queries. Blocks of queries and keys, two passes (lse, then column sums);
    the largest temporary has at most ``max_elems`` elements whatever T and S are."""
    B, H_q, T, D = q.shape
    H_kv, S = k.shape[1], k.shape[2]
    G = H_q // H_kv
    tb = _block(B * H_q * 256, T, max_elems)
    kb = _block(B * H_q * tb * 2, S, max_elems)
    out = torch.zeros(B, H_q, S, dtype=torch.float32, device=q.device)

    def logits(qc: Tensor, t0: int, t1: int, s0: int, s1: int) -> Tensor:
        x = torch.matmul(qc, k[:, :, s0:s1].float().transpose(-1, -2)) * scaling  # (B, H_kv, G t, s)
        x = x.view(B, H_kv, G, t1 - t0, s1 - s0)
        return x.masked_fill(~visible(t0, t1, s0, s1)[:, :, None], float("-inf"))

    for t0 in range(0, T, tb):
        t1 = min(T, t0 + tb)
        qc = q[:, :, t0:t1].float().reshape(B, H_kv, G * (t1 - t0), D)  # (B, H_kv, G t, D): entry g t + i
        m = torch.full((B, H_kv, G, t1 - t0, 1), float("-inf"), device=q.device)
        den = torch.zeros_like(m)
        for s0 in range(0, S, kb):
            x = logits(qc, t0, t1, s0, min(S, s0 + kb))
            m_new = torch.maximum(m, x.amax(-1, keepdim=True))
            safe = torch.where(torch.isfinite(m_new), m_new, 0.0)
            den = den * torch.exp(m - safe) + torch.exp(x - safe).sum(-1, keepdim=True)
            m = m_new
        lse = torch.where(den > 0, m + torch.log(den.clamp(min=1e-38)), float("inf"))  # queries that see nothing
        for s0 in range(0, S, kb):
            s1 = min(S, s0 + kb)
            out[:, :, s0:s1] += torch.exp(logits(qc, t0, t1, s0, s1) - lse).sum(3).reshape(B, H_q, s1 - s0)
    return out


# --------------------------------------------------------------------------------------------------
# Kernels (rows aligned: every row's chunk starts at slot ``start``, no padding)


def _kernels():
    if interpret_mode():
        interpreter_compat()
    from . import _ragged_triton as K

    return K


def _launch(**options: int) -> dict[str, int]:
    return {} if interpret_mode() else options


def prefill_attention_lse_reference(q: Tensor, k: Tensor, v: Tensor, *, start: int, scaling: float
                                    ) -> tuple[Tensor, Tensor]:
    """q (B, H_q, T, D) at slots start..start+T-1 over k, v (B, H_kv, >= start+T, D) -> output (B, T, H_q, D)
    and each query's lse (B, H_q, T) float32 in log2 units."""
    from .attention import prefill_attention_reference

    B, H_q, T, D = q.shape
    S = start + T
    kf = k[:, :, :S].float().repeat_interleave(H_q // k.shape[1], dim=1)  # (B, H_q, S, D)
    s = torch.einsum("bhtd,bhsd->bhts", q.float(), kf) * scaling
    allowed = torch.arange(S, device=q.device)[None, :] <= (start + torch.arange(T, device=q.device))[:, None]
    lse = torch.logsumexp(s.masked_fill(~allowed, float("-inf")), dim=-1) * LOG2E  # (B, H_q, T)
    return prefill_attention_reference(q, k, v, start=start, scaling=scaling), lse


def prefill_attention_lse(q: Tensor, k: Tensor, v: Tensor, *, start: int, scaling: float) -> tuple[Tensor, Tensor]:
    """Fused :func:`prefill_attention_lse_reference` (one kernel: the output and the lse)."""
    B, H_q, T, D = q.shape
    H_kv = k.shape[1]
    out = torch.empty(B, T, H_q, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H_q, T, dtype=torch.float32, device=q.device)
    block_m = 64 if D <= 128 else 32
    block_n = 64 if D <= 128 else 32
    K = _kernels()
    K.prefill_lse[(-(-T // block_m), B * H_q)](
        q, k, v, out, lse, float(scaling) * LOG2E, int(start), T, H_q,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(),
        G=H_q // H_kv, BLOCK_M=block_m, BLOCK_N=block_n, D=D, IEEE=q.dtype == torch.float32,
        **_launch(num_warps=4, num_stages=2),
    )
    return out, lse


def accumulate_mass(q: Tensor, k: Tensor, lse: Tensor, mass: Tensor, *, start: int, scaling: float) -> None:
    """mass (B, H_q, >= start+T) float32 += the attention each slot receives from the chunk's queries q
    (B, H_q, T, D) at slots start..start+T-1 (causal), given their lse (B, H_q, T) from
    :func:`prefill_attention_lse`. k (B, H_kv, >= start+T, D). In place, no (T, S) temporary."""
    B, H_q, T, D = q.shape
    H_kv = k.shape[1]
    block_m = 64
    block_n = 64 if D <= 128 else 32
    K = _kernels()
    K.mass_accumulate[(-(-(start + T) // block_n), B * H_q)](
        q, k, lse, mass, float(scaling) * LOG2E, int(start), T, H_q,
        *q.stride(), *k.stride(), *lse.stride(), *mass.stride(),
        G=H_q // H_kv, BLOCK_M=block_m, BLOCK_N=block_n, D=D, IEEE=q.dtype == torch.float32,
        **_launch(num_warps=4, num_stages=2),
    )
