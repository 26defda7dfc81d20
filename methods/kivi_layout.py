"""The KIVI cache layout (Liu, Yuan et al., ICML 2024; :mod:`methods.kivi`): keys quantized per channel over
groups of G tokens, values per token, the latest tokens in full-precision rings. The store
(:class:`methods.kivi.KiviStore`) and its kernel's plain-torch reference (:mod:`methods.kernels.kivi_attention`)
both read and write it through these functions, so neither imports the other.
"""

from __future__ import annotations

import torch
from torch import Tensor

from methods.quantizers import UniformQuantizer

__all__ = ["key_encode", "key_decode", "read_dense"]


def key_encode(q: UniformQuantizer, x: Tensor, *, meta_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel quantization over groups of G tokens: x (B, H, n*G, D) ->
    codes (B, H, n, D*G*bits/8), scale (B, H, n, D), zero (B, H, n, D)."""
    B, H, T, D = x.shape
    G = q.group_size
    xg = x.reshape(B, H, T // G, G, D).transpose(-1, -2)  # (B, H, n, D, G)
    codes, scale, zero = q.encode(xg, meta_dtype=meta_dtype)  # (B, H, n, D, G*bits/8), (B, H, n, D, 1)
    return codes.reshape(B, H, T // G, -1), scale[..., 0], zero[..., 0]


def key_decode(q: UniformQuantizer, codes: Tensor, scale: Tensor, zero: Tensor, *, dtype: torch.dtype) -> Tensor:
    """Inverse of :func:`key_encode` -> (B, H, n*G, D)."""
    B, H, n, D = scale.shape
    x = q.decode(codes.reshape(B, H, n, D, -1), scale[..., None], zero[..., None], dtype=dtype)  # (B, H, n, D, G)
    return x.transpose(-1, -2).reshape(B, H, -1, D)


def read_dense(k_codes: Tensor, k_scale: Tensor, k_zero: Tensor, k_res: Tensor, v_codes: Tensor, v_scale: Tensor,
               v_zero: Tensor, v_res: Tensor, lengths: Tensor, n_slots: int, *, kq: UniformQuantizer,
               vq: UniformQuantizer, residual: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Dense K, V (B, H, n_slots, D) of a :class:`KiviStore`'s fields as stored for rows holding ``lengths``
    (B,) tokens: keys below floor(L / R) R and values below L - R dequantized, the rest from the rings."""
    R, G = residual, kq.group_size
    ng = -(-n_slots // G)
    k = key_decode(kq, k_codes[:, :, :ng], k_scale[:, :, :ng], k_zero[:, :, :ng], dtype=dtype)[:, :, :n_slots]
    v = vq.decode(v_codes[:, :, :n_slots], v_scale[:, :, :n_slots], v_zero[:, :, :n_slots], dtype=dtype)
    slots = torch.arange(n_slots, device=lengths.device)  # (S,)
    ring_of = slots % R
    L = lengths[:, None]  # (B, 1)
    nq_k, nq_v = torch.div(L, R, rounding_mode="floor") * R, (L - R).clamp_min(0)
    in_k = ((slots >= nq_k) & (slots < L))[:, None, :, None]  # (B, 1, S, 1)
    in_v = ((slots >= nq_v) & (slots < L))[:, None, :, None]
    k = torch.where(in_k, k_res[:, :, ring_of], k)  # (B, H, S, D)
    v = torch.where(in_v, v_res[:, :, ring_of], v)
    return k, v
