"""Dense grouped-query attention over a store's slot buffers: the decode step and chunked prefill.

Both read K/V where :class:`methods.stores.DenseStore` keeps them, ``(B, H_kv, capacity, D)``, in place:
no copy, no repeat of K/V per query head, no dense mask.

- :func:`decode_attention`, one new query per row over the first ``lengths[b]`` slots: flash-decoding
  (Dao et al., 2023). The slots are split into ``n_splits`` ranges; one program per (row, kv head, range)
  loads the range's keys and values once for the kv head's whole query group (GQA: K/V of a head are
  read once per step, not once per query head), keeps an online softmax in fp32 and writes its partial
  output and log-sum-exp; a second kernel merges the ranges. ``n_splits`` depends on the batch, the
  heads, the capacity and the GPU only, not on ``lengths`` (device tensor, never read on the host), so
  a CUDA graph captures the step once and replays it at every length.
- :func:`prefill_attention`, T new queries per row at slots ``start .. start+T-1`` over slots
  ``0 .. start+T-1`` with the causal rule "slot <= own slot": FlashAttention-2-style tiles with an online
  softmax, the causal offset applied per tile (no (T, S) mask is built, so a 2,048-token chunk over a 128K
  context costs no mask memory). Rows must share ``start`` (the store falls back to its reference path
  otherwise).

Each has a plain-torch reference (``*_reference``) the tests compare the kernels with, on CPU under
``TRITON_INTERPRET=1`` and on the GPU. fp32 inputs use IEEE fp32 dot products (no TF32), so fp32 runs
match the reference to ~1e-6; bf16/fp16 inputs accumulate in fp32 as FlashAttention does.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import interpret_mode, interpreter_compat

LOG2E = 1.4426950408889634
HEAD_DIMS = (16, 32, 64, 128, 256)  # tl.arange needs a power of two


# --------------------------------------------------------------------------------------------------
# References


def decode_attention_reference(q: Tensor, k: Tensor, v: Tensor, lengths: Tensor, *, scaling: float) -> Tensor:
    """q (B, H_q, D); k, v (B, H_kv, S, D); lengths (B,) slots each row attends to -> (B, H_q, D)."""
    B, H_q, D = q.shape
    H_kv, S = k.shape[1], k.shape[2]
    G = H_q // H_kv
    qf = q.float().reshape(B, H_kv, G, D)
    s = torch.einsum("bhgd,bhsd->bhgs", qf, k.float()) * scaling  # (B, H_kv, G, S)
    seen = torch.arange(S, device=q.device)[None, :] < lengths[:, None]  # (B, S)
    s = s.masked_fill(~seen[:, None, None, :], float("-inf"))
    out = torch.einsum("bhgs,bhsd->bhgd", torch.softmax(s, dim=-1), v.float())  # (B, H_kv, G, D)
    return out.reshape(B, H_q, D).to(q.dtype)


def prefill_attention_reference(q: Tensor, k: Tensor, v: Tensor, *, start: int, scaling: float) -> Tensor:
    """q (B, H_q, T, D) at slots start..start+T-1; k, v (B, H_kv, >= start+T, D) -> (B, T, H_q, D)."""
    B, H_q, T, D = q.shape
    H_kv = k.shape[1]
    S = start + T
    kf = k[:, :, :S].float().repeat_interleave(H_q // H_kv, dim=1)  # (B, H_q, S, D)
    vf = v[:, :, :S].float().repeat_interleave(H_q // H_kv, dim=1)
    s = torch.einsum("bhtd,bhsd->bhts", q.float(), kf) * scaling  # (B, H_q, T, S)
    allowed = torch.arange(S, device=q.device)[None, :] <= (start + torch.arange(T, device=q.device))[:, None]
    s = s.masked_fill(~allowed, float("-inf"))
    out = torch.einsum("bhts,bhsd->bhtd", torch.softmax(s, dim=-1), vf)
    return out.transpose(1, 2).to(q.dtype)


# --------------------------------------------------------------------------------------------------
# Triton kernels (methods/kernels/_attention_triton.py, imported on first use)


def _kernels():
    """The jit-compiled kernels (Triton imported on first use)."""
    if interpret_mode():
        interpreter_compat()
    from . import _attention_triton as K

    return K.decode_split, K.decode_combine, K.prefill


# --------------------------------------------------------------------------------------------------
# Launchers


def _launch(**options: int) -> dict[str, int]:
    """Compiler launch options (warps, pipeline stages); the interpreter takes none."""
    return {} if interpret_mode() else options


def _n_programs_target(device: torch.device) -> int:
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # the interpreter: a few programs keep tests fast


def decode_splits(batch: int, n_kv_heads: int, capacity: int, device: torch.device, block_n: int,
                  per_sm: int = 4) -> int:
    """Ranges the slots are split into: enough programs to fill the GPU (``per_sm`` per SM), none shorter
    than a tile. A function of shapes only (CUDA-graph safe)."""
    target = _n_programs_target(torch.device(device)) * per_sm // 4
    want = -(-target // max(1, batch * n_kv_heads))
    return max(1, min(want, -(-capacity // block_n)))


def _block_n(D: int) -> int:
    return 64 if D <= 128 else 32


DECODE_CONFIG = {"per_sm": 4, "num_warps": 4, "num_stages": 2}  # tuned by scripts/bench_attention.py --tune


def decode_attention(q: Tensor, k: Tensor, v: Tensor, lengths: Tensor, *, scaling: float,
                     n_splits: int | None = None, block_n: int | None = None, per_sm: int | None = None,
                     num_warps: int | None = None, num_stages: int | None = None) -> Tensor:
    """Fused :func:`decode_attention_reference`: q (B, H_q, D); k, v (B, H_kv, S, D); lengths (B,) -> (B, H_q, D).

    No host synchronisation: ``lengths`` stays on the device. The keyword tunables default to
    ``DECODE_CONFIG`` (and :func:`_block_n`)."""
    B, H_q, D = q.shape
    H_kv, S = k.shape[1], k.shape[2]
    G = H_q // H_kv
    block_n = block_n or _block_n(D)
    ns = n_splits or decode_splits(B, H_kv, S, q.device, block_n, per_sm or DECODE_CONFIG["per_sm"])
    split = -(-S // ns)
    split = -(-split // block_n) * block_n  # whole tiles per range
    ns = -(-S // split)
    mid_o = torch.empty(B, H_q, ns, D, dtype=torch.float32, device=q.device)
    mid_l = torch.empty(B, H_q, ns, dtype=torch.float32, device=q.device)
    out = torch.empty(B, H_q, D, dtype=q.dtype, device=q.device)
    split_k, combine, _ = _kernels()
    ieee = q.dtype == torch.float32
    split_k[(ns, B * H_kv)](
        q, k, v, lengths, mid_o, mid_l, float(scaling) * LOG2E, H_kv,
        *q.stride(), *k.stride(), *v.stride(), *mid_o.stride(), *mid_l.stride(),
        G=G, SPLIT=split, BLOCK_G=max(16, triton_next_pow2(G)), BLOCK_N=block_n, D=D, IEEE=ieee,
        **_launch(num_warps=num_warps or DECODE_CONFIG["num_warps"],
                  num_stages=num_stages or DECODE_CONFIG["num_stages"]),
    )
    combine[(B * H_q,)](
        mid_o, mid_l, out, ns, H_q, *mid_o.stride(), *mid_l.stride(), *out.stride(),
        NS=max(2, triton_next_pow2(ns)), D=D, **_launch(num_warps=4),
    )
    return out


def prefill_attention(q: Tensor, k: Tensor, v: Tensor, *, start: int, scaling: float) -> Tensor:
    """Fused :func:`prefill_attention_reference`: q (B, H_q, T, D) at slots start..start+T-1 over
    k, v (B, H_kv, >= start+T, D) -> (B, T, H_q, D)."""
    B, H_q, T, D = q.shape
    H_kv = k.shape[1]
    out = torch.empty(B, T, H_q, D, dtype=q.dtype, device=q.device)
    block_m = 64 if D <= 128 else 32
    block_n = _block_n(D)
    _, _, kernel = _kernels()
    grid = (-(-T // block_m), B * H_q)
    kernel[grid](
        q, k, v, out, float(scaling) * LOG2E, int(start), T, H_q,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        G=H_q // H_kv, BLOCK_M=block_m, BLOCK_N=block_n, D=D, IEEE=q.dtype == torch.float32,
        **_launch(num_warps=4, num_stages=2),
    )
    return out


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))
