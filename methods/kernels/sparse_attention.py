"""Sparse-read decode attention: Quest's page selection and Louver's grid gate as device kernels (issue 21).

A decode step of a sparse-read store (:class:`methods.stores.SparseReadStore`) reads the *indexed* slots
``0 .. idx_end[b]-1`` of a row only where a gate lets them through, and every *buffer* slot ``idx_end[b] ..
lengths[b]-1``. The kernels keep the store's layout ``(B, H_kv, capacity, D)`` in place and are CUDA-graph safe:
their grids depend on shapes and capacity only, every length, page count, budget and threshold stays on the device.

- :func:`sparse_decode_attention`: flash-decoding (as :func:`methods.kernels.attention.decode_attention`) in which
  a program of (slot range, row, kv head) evaluates the gate on each tile of ``BLOCK_N`` slots, loads K/V only of
  the slots some query head of the group reads (a masked load moves no bytes for the others; a tile nobody reads
  costs its gate only) and keeps one online softmax per query head over *its own* survivors. K/V of a slot are read
  once per kv head, however many of its query heads read it. A second kernel merges the ranges and books the step's
  reads (indexed slots read, buffer slots, indexed slots there, steps) into a per-row counter, so the row's
  ``kv_bytes_read_per_step`` is measured on the device without a host sync. Gates:
  ``pages`` (Quest): one selection bit per (page, query head), from :func:`quest_select`;
  ``grid`` (Louver, ``index=grid``): the slot is read by query head g iff sum_d w_gd code_d + |q_g| err >= thr_g,
  an upper bound of q_g . k against the threshold (:func:`grid_gate_params`), from the key's 8-bit grid codes;
  ``dense``: every slot (a layer a method leaves dense).
- :func:`quest_page_scores` + :func:`quest_select`: each page's upper bound q+ . max + q- . min (= sum_d
  max(q_d min_d, q_d max_d)) per query head or summed over the group, then the top ``budget[n_pages]`` pages per
  score row by an exact k-th-largest search (bisection over the float order, 32 rounds of counting), ties to the
  lower page. No sort, no host sync, a fixed grid.
- :func:`grid_gate_params`: per query head the threshold t (the ``kth[m]``-th largest score over the m valid keys
  of the store's key sample, as :func:`methods.louver.thresholds` in ``budget`` mode) and the gate's operands.
- :func:`quest_append` / :func:`grid_append`: the decode step's append of K/V (as
  :func:`methods.kernels.append.append_decode`) plus the index's own update: Quest closes a page when the row's
  tokens fill it; Louver's grid encodes the new key and moves ``idx_end`` every ``merge_every`` steps.

Each has a plain-torch reference (``*_reference``), held to the kernel by tests/test_sparse_kernels.py on CPU under
``TRITON_INTERPRET=1`` and on the GPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import interpret_mode, interpreter_compat
from .attention import HEAD_DIMS, LOG2E, decode_splits, triton_next_pow2

GATES = {"pages": 0, "grid": 1, "dense": 2}
SPARSE_CONFIG = {"block_n": 64, "per_sm": 8, "num_warps": 4, "num_stages": 2}  # scripts/bench_sparse.py --tune
LEVELS = 255  # grid codes: 8 bits per channel


# --------------------------------------------------------------------------------------------------
# References


def sortable_key(x: Tensor) -> Tensor:
    """fp32 -> int64 in the floats' order (what the kernels compare)."""
    bits = x.float().contiguous().view(torch.int32)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()


def sparse_decode_attention_reference(q: Tensor, k: Tensor, v: Tensor, lengths: Tensor, idx_end: Tensor,
                                      read: Tensor, *, scaling: float) -> tuple[Tensor, Tensor]:
    """q (B, H_q, D); k, v (B, H_kv, S, D); lengths, idx_end (B,); read (B, H_kv, G, S) bool: indexed slots each
    query head reads (slots >= idx_end are the buffer: always read) -> (out (B, H_q, D), indexed slots read per row
    (B,) int64, a slot counted once per kv head)."""
    B, H_q, D = q.shape
    H_kv, S = k.shape[1], k.shape[2]
    G = H_q // H_kv
    slots = torch.arange(S, device=q.device)
    indexed = slots[None] < idx_end[:, None]  # (B, S)
    buffer = (slots[None] >= idx_end[:, None]) & (slots[None] < lengths[:, None])
    sel = (read & indexed[:, None, None]) | buffer[:, None, None]  # (B, H_kv, G, S)
    s = torch.einsum("bhgd,bhsd->bhgs", q.float().reshape(B, H_kv, G, D), k.float()) * scaling
    s = s.masked_fill(~sel, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    out = torch.einsum("bhgs,bhsd->bhgd", p, v.float()).reshape(B, H_q, D).to(q.dtype)
    n_read = (read & indexed[:, None, None]).any(2).sum((1, 2))  # (B,)
    return out, n_read


def select_pages_reference(scores: Tensor, n_pages: Tensor, budget: Tensor) -> Tensor:
    """The top ``budget[n_pages[b]]`` of each score row among its first n_pages pages, ties to the lower page.
    scores (B, R, P) fp32; n_pages (B,); budget (P_cap + 1,) -> (B, R, P) bool."""
    B, R, P = scores.shape
    ok = torch.arange(P, device=scores.device)[None] < n_pages[:, None]  # (B, P)
    key = torch.where(ok[:, None], sortable_key(scores), torch.full_like(scores, -(2**31), dtype=torch.long))
    order = key.sort(dim=-1, descending=True, stable=True).indices  # stable: equal keys keep page order
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(P, device=scores.device).expand_as(order))
    k = torch.minimum(budget.to(scores.device)[n_pages.long()], n_pages.long())  # (B,)
    return (rank < k[:, None, None]) & ok[:, None]


def page_bits_reference(sel: Tensor, n_kv_heads: int, groups: int) -> Tensor:
    """Selection rows -> bits: sel (B, H_kv * G, P) one row per query head (bit g = row h * G + g), or
    (B, H_kv, P) one row per kv head (the group's G bits) -> (B, H_kv, P) int32."""
    B, R, P = sel.shape
    if R == n_kv_heads:
        return sel.to(torch.int32) * ((1 << groups) - 1)
    G = groups
    w = (1 << torch.arange(G, device=sel.device, dtype=torch.int32))  # (G,)
    return (sel.view(B, n_kv_heads, G, P).to(torch.int32) * w[None, None, :, None]).sum(2).to(torch.int32)


def quest_append_reference(k: Tensor, v: Tensor, K: Tensor, V: Tensor, lengths: Tensor, seen: Tensor, valid: Tensor,
                           idx_end: Tensor, kmin: Tensor | None, kmax: Tensor | None, *, page_size: int) -> None:
    """idx_end = each row's tokens in whole pages; a row whose tokens fill whole pages (re)computes the key min/max
    of its last page (kmin, kmax None: a dense layer, idx_end only); then k, v (B, H_kv, D) go to slot lengths[b]
    and lengths, seen += valid. In place, no host sync."""
    B, H, D = k.shape
    n = lengths.long()
    if kmin is not None:
        full = (n % page_size == 0) & (n > 0)  # (B,)
        start = (n - page_size).clamp(min=0)
        slots = start[:, None] + torch.arange(page_size, device=k.device)  # (B, ps)
        page = K.gather(2, slots[:, None, :, None].expand(B, H, page_size, D))  # (B, H_kv, ps, D)
        p = (n // page_size - 1).clamp(min=0)[:, None, None, None].expand(B, H, 1, D)
        for meta, val in ((kmin, page.amin(2, keepdim=True)), (kmax, page.amax(2, keepdim=True))):
            meta.scatter_(2, p, torch.where(full[:, None, None, None], val.to(meta.dtype), meta.gather(2, p)))
    idx_end.copy_((n // page_size) * page_size)
    bi = torch.arange(B, device=k.device)
    K[bi, :, n] = k.to(K.dtype)
    V[bi, :, n] = v.to(V.dtype)
    lengths.add_(valid.long())
    seen.add_(valid.long())


def grid_encode_reference(keys: Tensor, lo: Tensor, inv: Tensor, step: Tensor) -> tuple[Tensor, Tensor]:
    """Louver's grid codes of keys (..., N, D) (as stored) with per-channel lo, inv = 1 / step, step (..., D) fp32:
    code = clamp(floor((k - lo) inv + 1/2), 0, 255) (uint8) and err = |k - (lo + code step)| (fp32)."""
    kf = keys.float()
    code = torch.floor((kf - lo[..., None, :]) * inv[..., None, :] + 0.5).clamp(0, LEVELS)
    err = (kf - (lo[..., None, :] + code * step[..., None, :])).norm(dim=-1)
    return code.to(torch.uint8), err


def grid_append_reference(k: Tensor, v: Tensor, K: Tensor, V: Tensor, lengths: Tensor, seen: Tensor, valid: Tensor,
                          idx_end: Tensor, steps: Tensor, codes: Tensor, err: Tensor, lo: Tensor, inv: Tensor,
                          step: Tensor, kmax: Tensor, *, merge_every: int) -> None:
    """Every merge_every decode steps idx_end = lengths; append k, v (B, H_kv, D) at slot lengths[b] with its grid
    code and error; kmax grows with the key's norm (valid rows); lengths, seen += valid; steps += 1. In place."""
    B = k.shape[0]
    n = lengths.long()
    merge = (steps > 0) & (steps % merge_every == 0)
    idx_end.copy_(torch.where(merge, n, idx_end))
    bi = torch.arange(B, device=k.device)
    K[bi, :, n] = k.to(K.dtype)
    V[bi, :, n] = v.to(V.dtype)
    stored = K[bi, :, n]  # (B, H_kv, D) as stored
    c, e = grid_encode_reference(stored[:, :, None], lo, inv, step)  # (B, H_kv, 1, D), (B, H_kv, 1)
    codes[bi, :, n] = c[:, :, 0]
    err[bi, :, n] = e[:, :, 0]
    kmax.copy_(torch.where(valid[:, None], torch.maximum(kmax, stored.float().norm(dim=-1)), kmax))
    lengths.add_(valid.long())
    seen.add_(valid.long())
    steps.add_(1)


def grid_gate_params_reference(qg: Tensor, sample: Tensor, sample_valid: Tensor, kth: Tensor, lo: Tensor,
                               step: Tensor, kmax: Tensor, *, gate_eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """qg (B, H_kv, G, D) -> (t, w = q * step (B, H_kv, G, D), thr = t - gate_eps |q| kmax - q . lo, |q|), each
    (B, H_kv, G) but w. t is the kth[m]-th largest score of the m valid sample keys (-inf if none)."""
    qf = qg.float()
    s = torch.einsum("bhgd,bhmd->bhgm", qf, sample.float())  # (B, H_kv, G, M)
    key = torch.where(sample_valid[:, :, None], sortable_key(s), torch.full_like(s, -(2**31), dtype=torch.long))
    m = sample_valid.sum(-1)  # (B, H_kv)
    k = kth.to(qg.device)[m].clamp(min=1)  # (B, H_kv)
    srt = key.sort(-1, descending=True)
    pos = (k - 1)[:, :, None, None].expand(*s.shape[:3], 1)
    t = s.gather(-1, srt.indices.gather(-1, pos))[..., 0]  # (B, H_kv, G)
    t = torch.where(m[:, :, None] > 0, t, torch.full_like(t, float("-inf")))
    qn = qf.norm(dim=-1)
    thr = t - gate_eps * qn * kmax[:, :, None] - (qf * lo[:, :, None]).sum(-1)
    return t, qf * step[:, :, None], thr, qn


def grid_read_reference(w: Tensor, thr: Tensor, qn: Tensor, codes: Tensor, err: Tensor) -> Tensor:
    """Which keys pass the grid gate: sum_d w_d code_d + |q| err >= thr. w (B, H_kv, G, D); thr, qn (B, H_kv, G);
    codes (B, H_kv, S, D) uint8; err (B, H_kv, S) -> (B, H_kv, G, S) bool."""
    u = torch.einsum("bhgd,bhsd->bhgs", w, codes.float()) + qn[..., None] * err[:, :, None]
    return u >= thr[..., None]


# --------------------------------------------------------------------------------------------------
# Launchers


def _kernels():
    if interpret_mode():
        interpreter_compat()
    from . import _sparse_triton as K

    return K


def _launch(**options: int) -> dict[str, int]:
    return {} if interpret_mode() else options


def sparse_decode_attention(q: Tensor, k: Tensor, v: Tensor, lengths: Tensor, idx_end: Tensor, *, scaling: float,
                            gate: str, acc: Tensor, valid: Tensor, page_size: int = 16, bits: Tensor | None = None,
                            codes: Tensor | None = None, err: Tensor | None = None, w: Tensor | None = None,
                            thr: Tensor | None = None, qn: Tensor | None = None, n_splits: int | None = None,
                            block_n: int | None = None, per_sm: int | None = None, num_warps: int | None = None,
                            num_stages: int | None = None, combine_heads: int | None = None,
                            combine_chunk: int = 64) -> Tensor:
    """Fused sparse-read decode attention (module docstring): q (B, H_q, D); k, v (B, H_kv, S, D); lengths, idx_end
    (B,) int64 (unit stride); acc (B, 4) int64 books (indexed slots read, buffer slots read, indexed slots there,
    steps) for ``valid`` (B,) rows. ``pages``: bits (B, H_kv, P) int32, pages of ``page_size`` slots; ``grid``:
    codes (B, H_kv, S, D) uint8, err (B, H_kv, S) fp32, w (B, H_q, D), thr and qn (B, H_q) fp32. -> (B, H_q, D).
    The tunables default to ``SPARSE_CONFIG``; the grid depends on shapes and capacity only."""
    B, H_q, D = q.shape
    H_kv, S = k.shape[1], k.shape[2]
    G = H_q // H_kv
    mode = GATES[gate]
    cfg = SPARSE_CONFIG
    block_n = block_n or (256 if interpret_mode() else cfg["block_n"] if D <= 128 else 32)  # interpreter: few tiles
    if mode == 0:
        block_n = max(block_n, min(page_size, 128))
    ns = n_splits or decode_splits(B, H_kv, S, q.device, block_n, per_sm or cfg["per_sm"])
    split = -(-S // ns)
    split = -(-split // block_n) * block_n
    ns = -(-S // split)
    dev = q.device
    mid_o = torch.empty(B, H_q, ns, D, dtype=torch.float32, device=dev)
    mid_l = torch.empty(B, H_q, ns, dtype=torch.float32, device=dev)
    mid_c = torch.empty(B, H_kv, ns, dtype=torch.int32, device=dev)
    out = torch.empty(B, H_q, D, dtype=q.dtype, device=dev)
    i32 = torch.zeros(1, 1, 1, dtype=torch.int32, device=dev)
    f32 = torch.zeros(1, 1, 1, dtype=torch.float32, device=dev)
    u8 = torch.zeros(1, 1, 1, 1, dtype=torch.uint8, device=dev)
    bits = bits if bits is not None else i32
    codes = codes if codes is not None else u8
    err = err if err is not None else f32
    w = w if w is not None else f32
    thr = thr if thr is not None else f32[0]
    qn = qn if qn is not None else f32[0]
    K = _kernels()
    K.sparse_split[(ns, B * H_kv)](
        q, k, v, lengths, idx_end, mid_o, mid_l, mid_c, bits, codes, err, w, thr, qn, float(scaling) * LOG2E, H_kv,
        split, *q.stride(), *k.stride(), *v.stride(), *mid_o.stride(), *mid_l.stride(), *mid_c.stride(),
        *bits.stride(), *codes.stride(), *err.stride(), *w.stride(), *thr.stride(),
        G=G, BLOCK_G=max(16, triton_next_pow2(G)), BLOCK_N=block_n, D=D, IEEE=q.dtype == torch.float32,
        GATE=mode, PAGE=int(page_size),
        **_launch(num_warps=num_warps or cfg["num_warps"], num_stages=num_stages or cfg["num_stages"]),
    )
    bg = combine_heads or (triton_next_pow2(G) if interpret_mode() else 1)  # GPU: a program per query head
    K.sparse_combine[(B * H_kv * -(-G // bg),)](
        mid_o, mid_l, mid_c, out, lengths, idx_end, valid, acc, ns, H_kv,
        *mid_o.stride(), *mid_l.stride(), *mid_c.stride(), *out.stride(), *acc.stride(), valid.stride(0),
        G=G, BLOCK_G=bg, CH=combine_chunk, D=D, **_launch(num_warps=4),
    )
    return out


def quest_page_scores(q: Tensor, kmin: Tensor, kmax: Tensor, idx_end: Tensor, *, group: bool, page_size: int = 1,
                      out: Tensor | None = None, block_p: int = 64) -> Tensor:
    """Page upper bounds: q (B, H_q, D); kmin, kmax (B, H_kv, P, D); the first idx_end[b] // page_size pages of a
    row are indexed -> (B, H_q, P) fp32 per query head, or (B, H_kv, P) summed over each group (``group``); -inf
    past a row's pages."""
    B, H_q, D = q.shape
    H_kv, P = kmin.shape[1], kmin.shape[2]
    G = H_q // H_kv
    rows = H_kv if group else H_q
    if out is None:
        out = torch.empty(B, rows, P, dtype=torch.float32, device=q.device)
    _kernels().quest_scores[(-(-P // block_p), B * H_kv)](
        q, kmin, kmax, idx_end, out, H_kv, P, *q.stride(), *kmin.stride(), *out.stride(),
        G=G, BLOCK_G=max(16, triton_next_pow2(G)), BLOCK_P=block_p, D=D, IEEE=q.dtype == torch.float32,
        GROUP=bool(group), PAGE=int(page_size), **_launch(num_warps=4),
    )
    return out


def quest_select(scores: Tensor, idx_end: Tensor, budget: Tensor, *, n_kv_heads: int, groups: int,
                 page_size: int = 1, out: Tensor | None = None, rank: bool | None = None, radix_bits: int = 4) -> Tensor:
    """Top ``budget[n]`` of the n = idx_end[b] // page_size pages of each score row (B, R, P) as bits
    (B, H_kv, P) int32: R = H_kv * G rows (bit g per query head) or R = H_kv (the group's G bits). A program per
    row; up to 64 pages (``rank`` None) a page's rank is counted directly, beyond by a radix search for the k-th
    largest score (``radix_bits`` a round, 1: bisection)."""
    B, R, P = scores.shape
    rows = R // n_kv_heads
    if out is None:
        out = (torch.zeros if rows > 1 else torch.empty)(B, n_kv_heads, P, dtype=torch.int32, device=scores.device)
    elif rows > 1:
        out.zero_()
    block = max(16, triton_next_pow2(P))
    _kernels().quest_select[(B * R,)](
        scores, idx_end, budget, out, n_kv_heads, P, *scores.stride(), *out.stride(),
        G=groups, ROWS=rows, BLOCK_P=block, PAGE=int(page_size), RANK=block <= 64 if rank is None else bool(rank),
        BITS=int(radix_bits), **_launch(num_warps=8 if block >= 2048 else 4),
    )
    return out


def grid_gate_params(q: Tensor, sample: Tensor, sample_valid: Tensor, kth: Tensor, lo: Tensor, step: Tensor,
                     kmax: Tensor, *, gate_eps: float, w: Tensor, thr: Tensor, qn: Tensor,
                     method: str | None = None, radix_bits: int = 4) -> None:
    """Fused :func:`grid_gate_params_reference` for q (B, H_q, D): writes w (B, H_q, D), thr, qn (B, H_q); a
    program per query head. The sample size M is a power of two; its k-th largest score by counted ranks
    (``method="rank"``, the default up to 64 keys), a sort (``"sort"``, the default beyond) or a radix search
    (``"bisect"``, ``radix_bits`` a round)."""
    B, H_q, D = q.shape
    H_kv, M = sample.shape[1], sample.shape[2]
    method = method or ("rank" if M <= 64 else "sort")
    _kernels().grid_gate_params[(B * H_q,)](
        q, sample, sample_valid, kth, lo, step, kmax, w, thr, qn, H_kv, float(gate_eps),
        *q.stride(), *sample.stride(), *sample_valid.stride(), *lo.stride(), *kmax.stride(), *w.stride(),
        *thr.stride(), G=H_q // H_kv, M=M, D=D, KTH={"rank": 0, "bisect": 1, "sort": 2}[method],
        BITS=int(radix_bits), **_launch(num_warps=8 if M * D > 8192 else 4),
    )


def quest_append(k: Tensor, v: Tensor, K: Tensor, V: Tensor, lengths: Tensor, seen: Tensor, valid: Tensor,
                 idx_end: Tensor, kmin: Tensor | None, kmax: Tensor | None, *, page_size: int) -> None:
    """Fused :func:`quest_append_reference` (kmin, kmax None: a dense layer, idx_end only)."""
    B, H_kv, D = k.shape
    meta = kmin is not None
    if not meta:
        kmin = kmax = K
    _kernels().quest_append[(B,)](
        k, v, K, V, lengths, seen, valid, idx_end, kmin, kmax, H_kv, valid.stride(0),
        *k.stride(), *v.stride(), *K.stride(), *V.stride(), *kmin.stride(),
        BLOCK_H=triton_next_pow2(H_kv), D=D, PAGE=int(page_size), META=meta, **_launch(num_warps=4),
    )


def grid_append(k: Tensor, v: Tensor, K: Tensor, V: Tensor, lengths: Tensor, seen: Tensor, valid: Tensor,
                idx_end: Tensor, steps: Tensor, codes: Tensor, err: Tensor, lo: Tensor, inv: Tensor, step: Tensor,
                kmax: Tensor, *, merge_every: int) -> None:
    """Fused :func:`grid_append_reference`."""
    B, H_kv, D = k.shape
    _kernels().grid_append[(B,)](
        k, v, K, V, lengths, seen, valid, idx_end, steps, codes, err, lo, inv, step, kmax, H_kv, valid.stride(0),
        *k.stride(), *v.stride(), *K.stride(), *V.stride(), *codes.stride(), *err.stride(), *lo.stride(),
        *kmax.stride(), BLOCK_H=triton_next_pow2(H_kv), D=D, MERGE=int(merge_every), LEVELS=LEVELS,
        **_launch(num_warps=4),
    )


def supports(head_dim: int, n_q_heads: int, n_kv_heads: int) -> str | None:
    """Why the sparse kernels cannot serve a layer, or None."""
    if head_dim not in HEAD_DIMS:
        return f"head_dim {head_dim} is not one of {HEAD_DIMS}"
    if n_q_heads % n_kv_heads:
        return f"{n_q_heads} query heads are not a multiple of {n_kv_heads} kv heads"
    if n_q_heads // n_kv_heads > 31:
        return f"groups of {n_q_heads // n_kv_heads} query heads exceed the 31 selection bits of a page"
    return None
